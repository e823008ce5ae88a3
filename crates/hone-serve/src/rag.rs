//! Retrieval for chat requests (`hone serve --rag DIR`): a request opts in with an extra body
//! field `"rag": {"k": 5}` (or `true`; `false` opts out where the server retrieves by default),
//! the server searches the index for the last user message, shows the passages through the
//! one retrieval prompt of [`hone_rag::prompt`] (numbered `[1]..[k]`, the system prompt that
//! asks for citations by number), and answers with `sources`: for each number, the chunk id,
//! its document id, title, score and offsets in the document, and its text.
//!
//! The index is opened once; before each search the manifest on disk is read, and a newer
//! generation (written by `hone rag add|remove` in another process) reopens it, so the next
//! request sees the change. Searches run one at a time on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use hone_rag::prompt::{self, Passage};
use hone_rag::{Hit, Manifest, RagIndex, SearchOptions};
use hone_tokenize::Message;
use serde_json::{json, Value};

use crate::error::{ApiError, Result, ServeError};

/// The largest `k` a request may ask for.
pub const MAX_K: usize = 50;

/// Retrieval settings of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RagSettings {
    /// The index directory (`hone rag index --out DIR`).
    pub dir: PathBuf,
    /// Passages per request when the request does not say.
    pub k: usize,
    /// Whether requests without a `rag` field retrieve.
    pub by_default: bool,
}

impl RagSettings {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            k: 5,
            by_default: false,
        }
    }
}

/// An opened index and the generation it was opened at.
struct Opened {
    index: RagIndex,
    generation: u64,
}

/// The server's retrieval index.
pub(crate) struct Rag {
    settings: RagSettings,
    opened: Mutex<Opened>,
}

fn open_error(dir: &Path, e: hone_rag::RagError) -> ServeError {
    ServeError::Config {
        key: "rag",
        message: format!("cannot open the retrieval index {}: {e}", dir.display()),
    }
}

impl Rag {
    /// Opens the index of `settings` (an error names the directory).
    pub fn open(settings: RagSettings) -> Result<Self> {
        if settings.k == 0 || settings.k > MAX_K {
            return Err(ServeError::Config {
                key: "rag_k",
                message: format!("expected 1 to {MAX_K} passages, found {}", settings.k),
            });
        }
        let index = RagIndex::open(&settings.dir).map_err(|e| open_error(&settings.dir, e))?;
        let generation = index.manifest().generation;
        Ok(Self {
            settings,
            opened: Mutex::new(Opened { index, generation }),
        })
    }

    /// The `k` best chunks for `query`, from the newest generation of the index on disk.
    pub fn search(&self, query: &str, k: usize) -> std::result::Result<Vec<Hit>, ApiError> {
        let dir = &self.settings.dir;
        let failed = |e: hone_rag::RagError| {
            ApiError::internal(format!("retrieval from {} failed: {e}", dir.display()))
        };
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        let on_disk = Manifest::read(dir).map_err(failed)?.generation;
        if on_disk != opened.generation {
            let index = RagIndex::open(dir).map_err(failed)?;
            tracing::info!(
                "{}: index generation {} -> {}, reopened",
                dir.display(),
                opened.generation,
                index.manifest().generation
            );
            opened.generation = index.manifest().generation;
            opened.index = index;
        }
        opened
            .index
            .search_with(query, k, &SearchOptions::default())
            .map_err(failed)
    }
}

/// How many passages a request asks for: its `rag` field (`true`, `false`, `{"k": N}`, or
/// absent: the server's default), `None` for no retrieval.
pub(crate) fn requested_k(
    object: &Value,
    rag: Option<&Rag>,
) -> std::result::Result<Option<usize>, ApiError> {
    let field = object.get("rag").filter(|v| !v.is_null());
    let no_index = || {
        ApiError::bad_param(
            "rag",
            "this server has no retrieval index: start it with `hone serve --rag DIR`",
        )
    };
    let expected = "expected true, false or an object {\"k\": N}";
    let k = match field {
        None => return Ok(rag.filter(|r| r.settings.by_default).map(|r| r.settings.k)),
        Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => rag.ok_or_else(no_index)?.settings.k,
        Some(Value::Object(options)) => {
            let rag = rag.ok_or_else(no_index)?;
            if let Some(key) = options.keys().find(|k| k.as_str() != "k") {
                return Err(ApiError::bad_param(
                    "rag",
                    format!("unknown key `rag.{key}`: {expected}"),
                ));
            }
            match options.get("k") {
                None | Some(Value::Null) => rag.settings.k,
                Some(v) => match v.as_u64() {
                    Some(k) if (1..=MAX_K as u64).contains(&k) => k as usize,
                    _ => {
                        return Err(ApiError::bad_param(
                            "rag",
                            format!("`rag.k` must be an integer from 1 to {MAX_K}, found {v}"),
                        ))
                    }
                },
            }
        }
        Some(other) => {
            return Err(ApiError::bad_param(
                "rag",
                format!("{expected}, found {other}"),
            ))
        }
    };
    Ok(Some(k))
}

/// What retrieval added to a request.
pub(crate) struct Retrieved {
    /// The `sources` of the response.
    pub sources: Value,
    pub seconds: f64,
}

/// The passages a hit list shows, in rank order.
fn passages(hits: &[Hit]) -> Vec<Passage> {
    hits.iter()
        .map(|h| Passage {
            id: h.chunk.id.clone(),
            title: h.chunk.title.clone(),
            text: h.chunk.text.clone(),
        })
        .collect()
}

/// `sources`: one entry per passage, numbered as the prompt shows them.
pub(crate) fn sources(hits: &[Hit]) -> Value {
    Value::Array(
        hits.iter()
            .enumerate()
            .map(|(i, h)| {
                let c = &h.chunk;
                json!({
                    "index": i + 1,
                    "id": c.id,
                    "doc_id": c.doc_id,
                    "title": c.title,
                    "source": c.source,
                    "score": h.score,
                    "start_char": c.span.start_char,
                    "end_char": c.span.end_char,
                    "start_byte": c.span.start_byte,
                    "end_byte": c.span.end_byte,
                    "text": c.text,
                })
            })
            .collect(),
    )
}

/// The chunk ids of the sources an answer cites by number (`[2]`), in order.
pub(crate) fn cited(answer: &str, sources: &Value) -> Value {
    let list = sources.as_array().map(Vec::as_slice).unwrap_or_default();
    Value::Array(
        prompt::cited_labels(answer, list.len())
            .into_iter()
            .map(|n| list[n - 1]["id"].clone())
            .collect(),
    )
}

/// Retrieves `k` passages for the last user message of `messages` and rewrites the
/// conversation into the retrieval prompt: that message becomes the numbered passages and the
/// question, and [`prompt::SYSTEM_PROMPT`] leads unless the client sent a system message.
pub(crate) async fn augment(
    rag: &std::sync::Arc<Rag>,
    messages: &mut Vec<Message>,
    k: usize,
) -> std::result::Result<Retrieved, ApiError> {
    let Some(last_user) = messages.iter().rposition(|m| m.role == "user") else {
        return Err(ApiError::bad_param(
            "messages",
            "retrieval searches for the last user message, and there is none",
        ));
    };
    let question = messages[last_user].content.clone();
    if question.trim().is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            format!("messages[{last_user}]: retrieval needs a question, the content is empty"),
        ));
    }
    let started = Instant::now();
    let hits = {
        let (rag, query) = (rag.clone(), question.clone());
        tokio::task::spawn_blocking(move || rag.search(&query, k))
            .await
            .map_err(|e| ApiError::internal(format!("retrieval panicked: {e}")))??
    };
    let seconds = started.elapsed().as_secs_f64();
    messages[last_user].content = prompt::user_message(&question, &passages(&hits));
    if !messages.iter().any(|m| m.role == "system") {
        messages.insert(0, Message::new("system", prompt::SYSTEM_PROMPT));
    }
    Ok(Retrieved {
        sources: sources(&hits),
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cited_numbers_map_to_the_ids_of_the_sources_shown() {
        let sources = json!([{"index": 1, "id": "a#0"}, {"index": 2, "id": "b#3"}]);
        assert_eq!(
            cited("Paris [2], also [1] [2] [7]", &sources),
            json!(["b#3", "a#0"])
        );
        assert_eq!(cited("no citation", &sources), json!([]));
        assert_eq!(cited("[1]", &json!([])), json!([]));
    }
}
