//! `POST /v1/completions` and `POST /v1/chat/completions`: parse and validate, build the prompt
//! (the tokenizer for text, the chat template for messages), check it against the limits and
//! the context, take a place in the queue (429 when there is none), hand the request to the
//! worker, and answer with one JSON body or a stream of server-sent events in OpenAI's chunk
//! format ending in `data: [DONE]`. Dropping the response (a client that disconnects) drops the
//! event receiver, which stops the generation.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use hone_tokenize::ExtraContext;
use tokio::sync::mpsc;

use crate::engine::{Event, GenRequest, Usage};
use crate::error::ApiError;
use crate::http::{from_object, parse_object, read_body, resolve_model, AppState, Shared};
use crate::openai::{
    flatten_message_content, ChatRequest, CommonParams, CompletionRequest, Kind, Meta, PromptInput,
    Resolved,
};

/// `max_tokens` when a completion request gives none (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// `max_tokens` when a chat request gives none (also bounded by the context).
const DEFAULT_CHAT_TOKENS: usize = 1024;

pub(crate) async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = completion_inner(&state, &headers, body).await;
    respond(&state, "/v1/completions", result)
}

pub(crate) async fn chat(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let result = chat_inner(&state, &headers, body).await;
    respond(&state, "/v1/chat/completions", result)
}

fn respond(state: &AppState, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state
        .metrics
        .record_request(endpoint, response.status().as_u16());
    response
}

async fn completion_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let object = parse_object(&read_body(state, headers, body).await?)?;
    let common: CommonParams = from_object(&object)?;
    let req: CompletionRequest = from_object(&object)?;
    req.check_unsupported()?;
    if object
        .get("rag")
        .is_some_and(|v| !v.is_null() && *v != false)
    {
        return Err(ApiError::bad_param(
            "rag",
            "retrieval applies to /v1/chat/completions (it rewrites the last user message)",
        ));
    }
    let limits = state.engine.limits();
    let resolved = common.resolve(common.max_tokens, limits.max_stop_strings)?;
    let (model, adapter) = resolve_model(state, common.model.as_deref()).await?;
    let tokenizer = state.engine.tokenizer();
    let bad_prompt = |m: String| ApiError::bad_param("prompt", m);
    let prompt = match req.prompt {
        PromptInput::Text(text) => tokenizer
            .encode_prompt(&text)
            .map_err(|e| bad_prompt(e.to_string()))?,
        PromptInput::Tokens(ids) => ids,
        PromptInput::Texts(mut v) if v.len() == 1 => tokenizer
            .encode_prompt(&v.remove(0))
            .map_err(|e| bad_prompt(e.to_string()))?,
        PromptInput::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(bad_prompt(
                "one prompt per request is supported (send several requests: they are batched)"
                    .into(),
            ))
        }
    };
    let meta = Meta {
        kind: Kind::Completion,
        id: next_id(state, "cmpl"),
        created: hone_io::unix_now(),
        model,
        sources: None,
    };
    run(
        state,
        meta,
        prompt,
        adapter,
        resolved,
        DEFAULT_COMPLETION_TOKENS,
        Vec::new(),
        received,
    )
    .await
}

async fn chat_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let object = parse_object(&read_body(state, headers, body).await?)?;
    let common: CommonParams = from_object(&object)?;
    let mut req: ChatRequest = from_object(&object)?;
    req.check_unsupported()?;
    flatten_message_content(&mut req.messages)?;
    let limits = state.engine.limits();
    let max_tokens = req.max_completion_tokens.or(common.max_tokens);
    let resolved = common.resolve(max_tokens, limits.max_stop_strings)?;
    let (model, adapter) = resolve_model(state, common.model.as_deref()).await?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    let template = state
        .template
        .as_ref()
        .map_err(|why| ApiError::bad_request(why.clone()))?;
    let sources = match crate::rag::requested_k(&object, state.rag.as_deref())? {
        Some(k) => {
            let rag = state.rag.as_ref().expect("requested_k checks the index");
            let retrieved = crate::rag::augment(rag, &mut req.messages, k).await?;
            state.metrics.retrieval.observe(retrieved.seconds);
            Some(retrieved.sources)
        }
        None => None,
    };
    let text = template
        .render(&req.messages, true, &ExtraContext::new())
        .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    // As transformers' apply_chat_template(tokenize=True): the template writes any BOS itself.
    let tokenizer = state.engine.tokenizer();
    let prompt = tokenizer
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| ApiError::bad_param("messages", format!("cannot tokenize: {e}")))?
        .get_ids()
        .to_vec();
    // The template's end-of-turn token ends the reply: as an id when the tokenizer has it,
    // else as text.
    let eot = template
        .special_tokens()
        .eos_token
        .clone()
        .filter(|t| !t.is_empty());
    let eot_id = eot
        .as_deref()
        .and_then(|t| tokenizer.inner().token_to_id(t));
    let mut resolved = resolved;
    if let (Some(text), None, false) = (&eot, eot_id, resolved.ignore_eos) {
        resolved.stops.push(text.clone());
    }
    let meta = Meta {
        kind: Kind::Chat,
        id: next_id(state, "chatcmpl"),
        created: hone_io::unix_now(),
        model,
        sources,
    };
    run(
        state,
        meta,
        prompt,
        adapter,
        resolved,
        DEFAULT_CHAT_TOKENS,
        eot_id.into_iter().collect(),
        received,
    )
    .await
}

fn next_id(state: &AppState, prefix: &str) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:08x}", state.created)
}

/// Checks the prompt against the limits, queues it and answers.
#[allow(clippy::too_many_arguments)]
async fn run(
    state: &AppState,
    meta: Meta,
    prompt: Vec<u32>,
    adapter: Option<String>,
    resolved: Resolved,
    default_max_tokens: usize,
    extra_stop_ids: Vec<u32>,
    received: Instant,
) -> Result<Response, ApiError> {
    let engine = &state.engine;
    let info = engine.info();
    let param = match meta.kind {
        Kind::Completion => "prompt",
        Kind::Chat => "messages",
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_param(param, "the prompt has no tokens"));
    }
    let max_prompt = engine
        .limits()
        .max_prompt_tokens
        .unwrap_or(info.max_positions)
        .min(info.max_positions);
    if prompt.len() > max_prompt {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad_param(
                param,
                format!(
                    "the prompt has {} tokens, more than the limit of {max_prompt}",
                    prompt.len()
                ),
            )
        });
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= info.vocab_size) {
        return Err(ApiError::bad_param(
            param,
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                info.vocab_size
            ),
        ));
    }
    let room = info.max_positions - prompt.len();
    if room == 0 {
        return Err(ApiError::bad_param(
            param,
            "the prompt fills the whole context: no room for a completion",
        ));
    }
    let max_tokens = match resolved.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad_param(
                    "max_tokens",
                    format!(
                        "max_tokens = {m} with a {}-token prompt exceeds the context of {} tokens",
                        prompt.len(),
                        info.max_positions
                    ),
                )
            })
        }
        Some(m) => m,
        None => default_max_tokens.min(room),
    };
    let mut stop_ids = if resolved.ignore_eos {
        Vec::new()
    } else {
        engine.tokenizer().eos_ids.clone()
    };
    if !resolved.ignore_eos {
        stop_ids.extend(extra_stop_ids);
    }
    let ticket = engine.try_admit().ok_or_else(|| {
        state
            .metrics
            .rejected_queue_full
            .fetch_add(1, Ordering::Relaxed);
        ApiError::overloaded(engine.capacity())
    })?;
    let (events, rx) = mpsc::unbounded_channel();
    engine.submit(GenRequest {
        prompt,
        adapter,
        max_tokens,
        sampling: resolved.sampling,
        stop_ids,
        stop_strings: resolved.stops,
        events,
        ticket,
        received,
        submitted: Instant::now(),
    })?;
    state.metrics.record_model(&meta.model);
    if resolved.stream {
        Ok(stream(meta, rx, resolved.include_usage))
    } else {
        collect(meta, rx).await
    }
}

/// Waits for the whole generation.
async fn collect(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Token { text: piece }) => text.push_str(&piece),
            Some(Event::Done(usage)) => {
                return Ok(Json(meta.response(&text, &usage)).into_response())
            }
            Some(Event::Error(e)) => return Err(e),
            None => return Err(ApiError::internal("the model worker dropped the request")),
        }
    }
}

/// Where a stream is.
enum Phase {
    Start,
    Body,
    Ended,
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    phase: Phase,
    /// Whether a token chunk went out (the first is sent even when empty, so that a client
    /// sees the first token's time).
    sent_token: bool,
}

fn data(value: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

impl StreamState {
    /// The events that follow; `None` at the end.
    async fn next(&mut self) -> Option<Vec<SseEvent>> {
        match self.phase {
            Phase::Ended => None,
            Phase::Start => {
                self.phase = Phase::Body;
                Some(match self.meta.kind {
                    Kind::Chat => vec![data(&self.meta.role_chunk())],
                    Kind::Completion => Vec::new(),
                })
            }
            Phase::Body => Some(match self.rx.recv().await {
                Some(Event::Token { text }) => {
                    if text.is_empty() && self.sent_token {
                        Vec::new()
                    } else {
                        self.sent_token = true;
                        vec![data(&self.meta.chunk(&text, None))]
                    }
                }
                Some(Event::Done(usage)) => self.end(Some(usage), None),
                Some(Event::Error(e)) => self.end(None, Some(e)),
                None => self.end(
                    None,
                    Some(ApiError::internal("the model worker dropped the request")),
                ),
            }),
        }
    }

    fn end(&mut self, usage: Option<Usage>, error: Option<ApiError>) -> Vec<SseEvent> {
        self.phase = Phase::Ended;
        let mut out = Vec::new();
        if let Some(e) = error {
            out.push(data(&e.body()));
        }
        if let Some(usage) = usage {
            out.push(data(&self.meta.chunk("", Some(usage.finish_reason))));
            if self.include_usage {
                out.push(data(&self.meta.usage_chunk(&usage)));
            }
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }
}

fn stream(meta: Meta, rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let state = StreamState {
        meta,
        rx,
        include_usage,
        phase: Phase::Start,
        sent_token: false,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        let batch = st.next().await?;
        Some((batch, st))
    })
    .flat_map(|batch| futures_util::stream::iter(batch.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
