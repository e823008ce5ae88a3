//! [`TokenizeConfig`]: the `[tokenize]` settings of a run, with their defaults.
//!
//! ```toml
//! [tokenize]
//! template = "model"          # model | model:NAME | chatml | llama3 | alpaca
//! template_vars = {}          # extra template variables, e.g. { date_string = "26 Jul 2024" }
//! train_on_inputs = false     # true: prompts are in the loss too
//! max_seq_len = 2048          # tokens per row
//! truncation = "truncate"     # truncate | truncate_left | drop
//! packing = true              # false: one example per row, padded at batch time
//! add_eos = true              # completion and text examples end with EOS
//! ```
//!
//! Every field takes part in the cache key of the tokenized shards.

use serde::{Deserialize, Serialize};

use crate::chat::{ExtraContext, TemplateSource};
use crate::error::TokenizeError;

/// What to do with an example longer than `max_seq_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationPolicy {
    /// Keep the first `max_seq_len` tokens (the end of the last turn is lost, so it is
    /// trained without its end-of-turn token).
    #[default]
    Truncate,
    /// Keep the last `max_seq_len` tokens; a leading BOS is kept in front of them.
    TruncateLeft,
    /// Leave the example out (counted in the report).
    Drop,
}

/// Settings of the tokenization stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeConfig {
    /// Where the chat template comes from. Default `model` (the base model's own template).
    pub template: TemplateSource,
    /// Extra variables for the template (`apply_chat_template(**kwargs)`), e.g. `date_string`
    /// so that Llama 3.x templates do not print today's date. Default none.
    pub template_vars: ExtraContext,
    /// Put prompt tokens (system, user, tool turns; the prompt of a completion) in the loss
    /// too. Default false: only assistant turns and completions (with their end-of-turn/EOS
    /// token) are trained on.
    pub train_on_inputs: bool,
    /// Tokens per row (and the longest example kept whole). Default 2048.
    pub max_seq_len: usize,
    /// Handling of examples longer than `max_seq_len`. Default `truncate`.
    pub truncation: TruncationPolicy,
    /// Pack several examples into each row of exactly `max_seq_len` tokens, with positions
    /// restarting per example and attention kept inside each example. Default true. When
    /// false, each row holds one example and batches are padded (see `Batch::collate`).
    pub packing: bool,
    /// Append the EOS token to `completion` and `text` examples (chat templates write their
    /// own end-of-turn tokens). Default true.
    pub add_eos: bool,
}

/// Default tokens per row.
pub const DEFAULT_MAX_SEQ_LEN: usize = 2048;

impl Default for TokenizeConfig {
    fn default() -> Self {
        Self {
            template: TemplateSource::default(),
            template_vars: ExtraContext::new(),
            train_on_inputs: false,
            max_seq_len: DEFAULT_MAX_SEQ_LEN,
            truncation: TruncationPolicy::default(),
            packing: true,
            add_eos: true,
        }
    }
}

impl TokenizeConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), TokenizeError> {
        if self.max_seq_len < 2 {
            return Err(TokenizeError::InvalidConfig {
                field: "max_seq_len",
                message: format!(
                    "must be at least 2 (a token and the one it predicts), found {}",
                    self.max_seq_len
                ),
            });
        }
        if u32::try_from(self.max_seq_len).is_err() {
            return Err(TokenizeError::InvalidConfig {
                field: "max_seq_len",
                message: format!("must fit in 32 bits, found {}", self.max_seq_len),
            });
        }
        for key in ["messages", "add_generation_prompt"] {
            if self.template_vars.contains_key(key) {
                return Err(TokenizeError::InvalidConfig {
                    field: "template_vars",
                    message: format!("`{key}` is set by the renderer and cannot be overridden"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_missing_fields_and_unknown_fields_are_rejected() {
        let config: TokenizeConfig = serde_json::from_str(r#"{"max_seq_len": 512}"#).unwrap();
        assert_eq!(
            config,
            TokenizeConfig {
                max_seq_len: 512,
                ..TokenizeConfig::default()
            }
        );
        assert!(config.packing && config.add_eos && !config.train_on_inputs);
        let err = serde_json::from_str::<TokenizeConfig>(r#"{"max_len": 512}"#).unwrap_err();
        assert!(err.to_string().contains("max_len"), "{err}");
        let parsed: TokenizeConfig = serde_json::from_str(
            r#"{"truncation": "truncate_left", "template": "chatml", "packing": false}"#,
        )
        .unwrap();
        assert_eq!(parsed.truncation, TruncationPolicy::TruncateLeft);
        assert!(serde_json::from_str::<TokenizeConfig>(r#"{"truncation": "left"}"#).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let config = TokenizeConfig {
            max_seq_len: 1,
            ..TokenizeConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("max_seq_len"), "{err}");
        let mut config = TokenizeConfig::default();
        config
            .template_vars
            .insert("messages".into(), serde_json::Value::Null);
        assert!(config.validate().is_err());
    }
}
