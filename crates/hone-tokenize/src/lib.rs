//! hone-tokenize: examples -> token rows.
//!
//! This crate turns normalised examples into what a model trains on.
//!
//! * [`chat`]: Hugging Face chat templates rendered with a Jinja environment that behaves like
//!   the one `transformers` builds in `apply_chat_template`, built-in templates for models that
//!   ship none, and byte spans of assistant turns for loss masks.
//! * [`Encoder`]: one [`Example`] (conversation, prompt/completion, raw text) -> token ids and
//!   unshifted labels (-100 outside the loss), with the truncation policy ([`fit_to_length`]).
//!   [`Example`] and [`Message`] are hone-data's types (re-exported here): curated files are
//!   read as they are, with the kind (`messages`, `prompt`/`completion`, `text`) stated by
//!   their keys.
//! * [`pack`] / [`one_per_row`]: examples -> [`Row`]s with position ids restarting per example
//!   and segment ids for a block-diagonal causal mask; [`Batch::collate`] pads rows.
//! * [`tokenize_examples`] / [`tokenize_cached`]: the whole stage with its [`TokenizeReport`],
//!   optionally through a [`ShardCache`] keyed by a hash of data, tokenizer, template and
//!   settings.
//! * [`format_tokens`]: a token-by-token view for checking masks; [`special_token_warnings`]:
//!   template markers the tokenizer would split into pieces.

pub mod chat;

mod cache;
mod config;
mod dataset;
mod encode;
mod error;
mod inspect;
mod pack;
mod row;
mod special;

pub use cache::{CacheKey, CacheStatus, ShardCache, DEFAULT_ROWS_PER_SHARD, ROW_FORMAT_VERSION};
pub use chat::{
    token_mask_from_offsets, AssistantSpan, BuiltinTemplate, ChatTemplate, ExtraContext, Message,
    RenderedConversation, SpecialTokens, TemplateError, TemplateSource,
};
pub use config::{TokenizeConfig, TruncationPolicy, DEFAULT_MAX_SEQ_LEN};
pub use dataset::{tokenize_cached, tokenize_examples, TokenizedDataset};
pub use encode::{fit_to_length, Encoder, Fitted, TokenizedExample, TokenizerSpec};
pub use error::{ExampleError, TokenizeError};
pub use hone_data::Example;
pub use inspect::{format_masked_text, format_tokens};
pub use pack::{one_per_row, pack, TokenizeReport};
pub use row::{Batch, PadTo, Row, IGNORE_INDEX, PAD_SEGMENT};
pub use special::{marker_candidates, special_token_warnings, SpecialTokenWarning};
