//! OpenAI's request and response bodies for `/v1/completions` and `/v1/chat/completions`
//! (<https://platform.openai.com/docs/api-reference>), with vLLM's extensions `top_k`,
//! `repetition_penalty` and `ignore_eos`. Requests are parsed leniently (unknown fields are
//! ignored, as OpenAI's clients send many) but every value hone uses is validated, and features
//! hone does not implement (several choices, log-probabilities, penalties on presence or
//! frequency, logit bias, echo, tool and function calling, non-text content parts) are refused
//! with a 400 naming the field rather than ignored.
//!
//! Message `content` may be a string, `null` (empty) or a list of content parts, whose text
//! parts are joined with `"\n"` as vLLM does for text-only models
//! ([`flatten_message_content`]); templates then always see a string.

use std::sync::atomic::{AtomicU64, Ordering};

use hone_model::{FinishReason, SamplingConfig};
use hone_tokenize::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::Usage;
use crate::error::ApiError;

/// Longest accepted stop string, in bytes.
const MAX_STOP_BYTES: usize = 1024;

/// A completion prompt: text, token ids, or a one-element list of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Parameters shared by both endpoints (read from the same JSON object as the endpoint's own
/// fields).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopInput>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub top_logprobs: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
}

/// Validated generation settings of a request.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub sampling: SamplingConfig,
    /// Requested `max_tokens` (checked against the context later).
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
}

/// A seed for requests that give none: distinct per request.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

fn is_set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

impl CommonParams {
    /// Checks and converts the sampling parameters; `max_tokens` is the effective field.
    pub fn resolve(
        &self,
        max_tokens: Option<i64>,
        max_stop_strings: usize,
    ) -> Result<Resolved, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad_param("n", "only n = 1 is supported"));
            }
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_param(
                    name,
                    format!("{name} is not supported (use repetition_penalty)"),
                ));
            }
        }
        if is_set(&self.logprobs) {
            return Err(ApiError::bad_param(
                "logprobs",
                "logprobs are not supported",
            ));
        }
        if is_set(&self.logit_bias) {
            return Err(ApiError::bad_param(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ApiError::bad_param(
                "temperature",
                format!("temperature must be >= 0, found {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_param(
                "top_p",
                format!("top_p must be in (0, 1], found {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("top_k must be positive, or -1 / 0 for off; found {k}"),
                ))
            }
        };
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::bad_param(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, found {repetition_penalty}"),
            ));
        }
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    format!("max_tokens must be at least 1, found {m}"),
                ))
            }
        };
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        if stops.len() > max_stop_strings {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "at most {max_stop_strings} stop strings, found {}",
                    stops.len()
                ),
            ));
        }
        if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_param(
                "stop",
                format!("stop strings are limited to {MAX_STOP_BYTES} bytes"),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Resolved {
            sampling: SamplingConfig {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed: self.seed.map(|s| s as u64).unwrap_or_else(fresh_seed),
            },
            max_tokens,
            stops,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .is_some_and(|o| o.include_usage),
        })
    }
}

impl CompletionRequest {
    /// Refuses the completion-only features hone lacks.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::bad_param("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_param("suffix", "suffix is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::bad_param(
                "best_of",
                "only best_of = 1 is supported",
            ));
        }
        Ok(())
    }
}

impl ChatRequest {
    /// Refuses the chat-only features hone lacks: log-probabilities, tool and function calling.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "logprobs are not supported",
            ));
        }
        let listed = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        let chosen = |v: &Option<Value>| {
            !matches!(v, None | Some(Value::Null))
                && v.as_ref().and_then(Value::as_str) != Some("none")
        };
        for (param, set) in [
            ("tools", listed(&self.tools)),
            ("tool_choice", chosen(&self.tool_choice)),
            ("functions", listed(&self.functions)),
            ("function_call", chosen(&self.function_call)),
        ] {
            if set {
                return Err(ApiError::bad_param(
                    param,
                    format!(
                        "`{param}`: tool and function calling are not supported by this server"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Gives every message a string `content` for the template: `null` becomes empty, a list of
/// content parts the text of its `text` parts joined with `"\n"` (vLLM's rule for text-only
/// models). Other parts (`image_url`, `input_audio`, ...) are refused naming the part.
pub fn flatten_message_content(messages: &mut [Message]) -> Result<(), ApiError> {
    for (i, message) in messages.iter_mut().enumerate() {
        let bad = |j: usize, why: String| {
            ApiError::bad_param("messages", format!("messages[{i}].content[{j}]: {why}"))
        };
        match message.extra.shift_remove("content") {
            None => {}
            Some(Value::Null) => message.content.clear(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text").and_then(Value::as_str) {
                            Some(text) => texts.push(text),
                            None => {
                                return Err(bad(j, "a `text` part needs a string `text`".into()))
                            }
                        },
                        Some(other) => {
                            return Err(bad(
                                j,
                                format!(
                                    "content parts of type `{other}` are not supported: this \
                                     server reads text only"
                                ),
                            ))
                        }
                        None => return Err(bad(j, "a content part needs a string `type`".into())),
                    }
                }
                message.content = texts.join("\n");
            }
            Some(other) => {
                return Err(ApiError::bad_param(
                    "messages",
                    format!(
                        "messages[{i}].content must be a string, null or a list of parts, found {other}"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Which endpoint a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The retrieved passages (`--rag`): a `sources` field beside `choices`, in the whole
    /// response and in the first streamed chunk.
    pub sources: Option<Value>,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

impl Meta {
    /// The whole (non-streamed) response.
    pub fn response(&self, text: &str, usage: &Usage) -> Value {
        let finish = finish_str(usage.finish_reason);
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage_json(usage),
            }),
            Kind::Chat => {
                let mut response = json!({
                    "id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish,
                    }],
                    "usage": usage_json(usage),
                });
                if let Some(sources) = &self.sources {
                    response["choices"][0]["message"]["cited"] = crate::rag::cited(text, sources);
                    response["sources"] = sources.clone();
                }
                response
            }
        }
    }

    /// A streamed chunk carrying `text` (chat: as `delta.content`), and the finish reason on
    /// the last one.
    pub fn chunk(&self, text: &str, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_str);
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                self.chat_chunk(delta, finish)
            }
        }
    }

    /// The first chat chunk: the assistant role with empty content.
    pub fn role_chunk(&self) -> Value {
        let mut chunk = self.chat_chunk(json!({"role": "assistant", "content": ""}), None);
        if let Some(sources) = &self.sources {
            chunk["sources"] = sources.clone();
        }
        chunk
    }

    fn chat_chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// The final chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": usage_json(usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let p: CommonParams = serde_json::from_value(json!({"n": 2})).unwrap();
        assert_eq!(p.resolve(None, 4).unwrap_err().param.as_deref(), Some("n"));
        let p: CommonParams = serde_json::from_value(json!({"presence_penalty": 0.5})).unwrap();
        assert_eq!(
            p.resolve(None, 4).unwrap_err().param.as_deref(),
            Some("presence_penalty")
        );
        let p: CommonParams = serde_json::from_value(json!({"logprobs": false, "n": 1})).unwrap();
        assert!(p.resolve(None, 4).is_ok());
    }

    fn messages(v: Value) -> Vec<Message> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn content_parts_and_null_content_become_text_as_vllm_joins_them() {
        let mut m = messages(json!([
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "plain"},
        ]));
        flatten_message_content(&mut m).unwrap();
        let texts: Vec<&str> = m.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["Be brief.", "a\nb", "", "plain"]);
        for m in &m {
            assert_eq!(m.template_content(), Value::String(m.content.clone()));
        }
    }

    #[test]
    fn image_parts_and_malformed_parts_are_refused_naming_the_part() {
        for (parts, needle) in [
            (
                json!([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}}]),
                "content[1]: content parts of type `image_url`",
            ),
            (json!([{"type": "text"}]), "content[0]: a `text` part"),
            (json!([{"text": "x"}]), "content[0]: a content part needs"),
        ] {
            let mut m = messages(json!([{"role": "user", "content": parts}]));
            let err = flatten_message_content(&mut m).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("messages"));
            assert!(err.message.contains(needle), "{}", err.message);
        }
    }

    #[test]
    fn tools_and_functions_are_refused_but_empty_or_none_values_pass() {
        let chat = |extra: Value| {
            let mut body = json!({"messages": []});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<ChatRequest>(body)
                .unwrap()
                .check_unsupported()
        };
        for (extra, param) in [
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (
                json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "tool_choice",
            ),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
        ] {
            let err = chat(extra.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{extra}");
        }
        for extra in [
            json!({"tools": null, "tool_choice": "none"}),
            json!({"tools": [], "functions": [], "function_call": "none"}),
        ] {
            chat(extra.clone()).unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one: CommonParams = serde_json::from_value(json!({"stop": "\n"})).unwrap();
        assert_eq!(one.resolve(None, 4).unwrap().stops, vec!["\n"]);
        let many: CommonParams = serde_json::from_value(json!({"stop": ["a", "b"]})).unwrap();
        assert_eq!(many.resolve(None, 4).unwrap().stops, vec!["a", "b"]);
        let too_many: CommonParams =
            serde_json::from_value(json!({"stop": ["a", "b", "c"]})).unwrap();
        assert!(too_many.resolve(None, 2).is_err());
    }
}
