//! Chat templates: conversations -> the exact text a model was trained on.
//!
//! Follows Hugging Face `transformers` (`PreTrainedTokenizerBase.apply_chat_template` and
//! `utils/chat_template_utils.py`): the template is Jinja2 text stored in
//! `tokenizer_config.json` (or `chat_template.jinja`), rendered with `trim_blocks` and
//! `lstrip_blocks`, the globals `raise_exception` and `strftime_now`, a `tojson` filter that
//! does not HTML-escape, and the special tokens as variables. The golden fixtures in
//! `tests/fixtures/chat_templates` hold renderings produced by transformers itself.
//!
//! * [`ChatTemplate`] loads a template (from a model directory, a `tokenizer_config.json`, a
//!   built-in) and renders it with [`ChatTemplate::render`].
//! * [`BuiltinTemplate`] and [`TemplateSource`] are the config-level choice of template.
//! * [`ChatTemplate::render_with_assistant_spans`] and [`token_mask_from_offsets`] give loss masks.
//!
//! The conversation's [`Message`] type is hone-data's (the data contract between the stages).

mod builtin;
mod config;
mod env;
mod error;
mod mask;
mod pyjson;
mod template;
mod value;

pub use builtin::{BuiltinTemplate, TemplateSource};
pub use config::SpecialTokens;
pub use error::TemplateError;
pub use hone_data::Message;
pub use mask::{token_mask_from_offsets, AssistantSpan, RenderedConversation};
pub use template::{ChatTemplate, ExtraContext};
