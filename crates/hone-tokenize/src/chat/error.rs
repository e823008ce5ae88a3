//! Typed errors of chat-template loading and rendering.

use std::path::PathBuf;

/// What went wrong while loading or rendering a chat template.
///
/// Variants name the template (its origin, e.g. `Qwen/tokenizer_config.json` or `builtin:chatml`)
/// and what failed, so that a message reaching the user is actionable on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (tokenizer_config.json, chat_template.json) is not valid JSON.
    /// A GGUF model file's metadata could not be read (the error names the file and key).
    #[error(transparent)]
    Gguf(#[from] hone_model::gguf::GgufError),

    #[error("{origin}: invalid JSON: {source}")]
    Json {
        /// Where the JSON came from.
        origin: String,
        /// The parse error (with line and column).
        #[source]
        source: serde_json::Error,
    },

    /// A field has the wrong JSON type.
    #[error("{origin}: field `{field}`: expected {expected}, found {found}")]
    InvalidField {
        /// Where the JSON came from.
        origin: String,
        /// Dotted path of the field.
        field: String,
        /// What was expected.
        expected: &'static str,
        /// What was found (a JSON type name).
        found: String,
    },

    /// The model ships no chat template.
    #[error(
        "{origin}: no chat template found (looked for {searched}); \
         choose a built-in template instead (chatml, llama3, alpaca)"
    )]
    MissingTemplate {
        /// The model directory or file.
        origin: String,
        /// What was looked at.
        searched: String,
    },

    /// A named template was asked for and is not there.
    #[error("{origin}: no chat template named `{wanted}`; available: {}", .available.join(", "))]
    UnknownTemplateName {
        /// The model directory or file.
        origin: String,
        /// The name asked for.
        wanted: String,
        /// The names present.
        available: Vec<String>,
    },

    /// Several named templates and none called `default` (transformers refuses this too).
    #[error(
        "{origin}: several chat templates and none named `default`; choose one of: {}",
        .available.join(", ")
    )]
    NoDefaultTemplate {
        /// The model directory or file.
        origin: String,
        /// The names present.
        available: Vec<String>,
    },

    /// The template text is not valid Jinja.
    #[error("chat template `{template}`: syntax error{}: {message}", line_suffix(*.line))]
    Syntax {
        /// The template's name.
        template: String,
        /// 1-based line in the template text, when known.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },

    /// The template called `raise_exception(message)`, e.g. "System role not supported".
    #[error("chat template `{template}` rejected the conversation: {message}")]
    Raised {
        /// The template's name.
        template: String,
        /// The message given to `raise_exception`, verbatim.
        message: String,
    },

    /// Rendering failed for another reason (undefined attribute, bad operand types, ...).
    #[error("chat template `{template}`: rendering failed{}: {message}", line_suffix(*.line))]
    Render {
        /// The template's name.
        template: String,
        /// 1-based line in the template text, when known.
        line: Option<usize>,
        /// The engine's message.
        message: String,
    },

    /// An extra context key collides with an argument the renderer sets itself.
    #[error(
        "extra context key `{key}` is reserved (set by the renderer: messages, add_generation_prompt)"
    )]
    ReservedContextKey {
        /// The key.
        key: String,
    },

    /// A template source string (config value) was not recognised.
    #[error("unknown chat template source `{0}`; expected `model`, `model:NAME`, `chatml`, `llama3` or `alpaca`")]
    UnknownSource(String),

    /// Loss-mask spans cannot be derived: rendering a prefix of the conversation does not give
    /// a prefix of the full rendering.
    #[error(
        "chat template `{template}` is not prefix-stable at message {message_index}: {detail}"
    )]
    NotPrefixStable {
        /// The template's name.
        template: String,
        /// Index of the assistant message whose span could not be found.
        message_index: usize,
        /// What differed, with the diverging text.
        detail: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}
