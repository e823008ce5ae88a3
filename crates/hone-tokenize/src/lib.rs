//! hone-tokenize: examples -> token rows.
//!
//! This crate turns normalised conversations into the text (and later the token ids and
//! labels) that a model is trained on. The first stage lives in [`chat`]: Hugging Face chat
//! templates rendered with a Jinja environment that behaves like the one `transformers`
//! builds in `apply_chat_template`, built-in templates for models that ship none, and byte
//! spans of assistant turns for loss masks.

pub mod chat;

pub use chat::{
    token_mask_from_offsets, AssistantSpan, BuiltinTemplate, ChatTemplate, ExtraContext, Message,
    RenderedConversation, SpecialTokens, TemplateError, TemplateSource,
};
