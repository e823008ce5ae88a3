//! One example -> token ids and labels ([`Encoder`]), and the truncation policy.
//!
//! * **Chat**: the conversation is rendered with the template
//!   ([`ChatTemplate::render_with_assistant_spans`]) and the text is encoded with
//!   `add_special_tokens = false`, as `transformers`' `apply_chat_template(tokenize=True)`
//!   does: templates write BOS themselves, so the tokenizer's post-processor must not add a
//!   second one.
//! * **Completion** (`prompt + completion`) and **text** are encoded as `tokenizer(text)` does
//!   (`add_special_tokens = true`, so a BOS comes from the tokenizer's post-processor when the
//!   model uses one); if the text itself started with the BOS string, the doubled BOS is
//!   removed. With `add_eos`, the EOS id is appended (unless the post-processor already ended
//!   the sequence with it).
//!
//! **Which tokens are in the loss.** A token counts when its byte range (the tokenizer's
//! offsets into the text) *overlaps* a trained byte range: an assistant span (content and the
//! end-of-turn marker the template writes after it), the completion, or all of a text. A token
//! that straddles a boundary (its bytes partly in the prompt, e.g. `]Hello` after `[/INST]`
//! when the tokenizer merges them) is therefore in the loss. This is the rule of
//! `transformers`' `return_assistant_tokens_mask`, which marks every token from the one holding
//! the span's first character to the one holding its last; it never drops the first token of
//! an answer. Tokens with empty offsets (added by post-processing, such as BOS) are not in the
//! loss, appended EOS tokens are. With `train_on_inputs`, every token with a non-empty offset
//! is. Finally the first label of every example is set to -100 (see [`crate::row`]).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::chat::{token_mask_from_offsets, AssistantSpan, ChatTemplate, Message, SpecialTokens};
use crate::config::{TokenizeConfig, TruncationPolicy};
use crate::error::ExampleError;
use crate::row::{Row, IGNORE_INDEX};
use hone_data::Example;

/// A tokenizer with the ids this stage needs; the ids are explicit so that the caller decides
/// (usually from the model's `tokenizer_config.json`).
#[derive(Debug, Clone, Copy)]
pub struct TokenizerSpec<'a> {
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Beginning-of-sequence id, if the model uses one (kept by `truncate_left`).
    pub bos_id: Option<u32>,
    /// End-of-sequence id appended to completion and text examples when `add_eos` is set.
    pub eos_id: Option<u32>,
    /// Id written into padding slots (never attended to nor in the loss); defaults to the EOS
    /// id, else 0.
    pub pad_id: Option<u32>,
}

impl<'a> TokenizerSpec<'a> {
    /// A spec whose ids are those of the special-token strings (`bos_token`, `eos_token`,
    /// `pad_token`, as a template sees them) that the tokenizer knows.
    pub fn from_special_tokens(
        tokenizer: &'a tokenizers::Tokenizer,
        tokens: &SpecialTokens,
    ) -> Self {
        let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
        Self {
            tokenizer,
            bos_id: id(&tokens.bos_token),
            eos_id: id(&tokens.eos_token),
            pad_id: id(&tokens.pad_token),
        }
    }

    /// The id used for padding slots.
    pub fn padding_id(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }
}

/// One example's tokens before packing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Unshifted labels: the id where the token is in the loss, -100 elsewhere.
    pub labels: Vec<i32>,
}

impl TokenizedExample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens in the loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// The example alone in a row (segment 1, positions from 0), e.g. for [`crate::format_tokens`].
    pub fn to_row(&self) -> Row {
        let mut row = Row::default();
        row.push_example(&self.input_ids, &self.labels);
        row
    }

    /// Ignores the first label: it is never a target inside its own example, and after the
    /// model's shift it would be the target of the previous packed example's last token.
    fn ignore_first_label(&mut self) {
        if let Some(first) = self.labels.first_mut() {
            *first = IGNORE_INDEX;
        }
    }
}

/// What the truncation policy made of an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted {
    /// It fits (`truncated`: after cutting).
    Kept {
        /// The tokens.
        example: TokenizedExample,
        /// Whether tokens were cut off.
        truncated: bool,
        /// Its length before truncation.
        original_len: usize,
    },
    /// Too long under [`TruncationPolicy::Drop`].
    TooLong {
        /// Its length in tokens.
        len: usize,
    },
}

/// Applies `policy` to an example of any length; `bos_id` is kept in front by `truncate_left`.
/// The first label of the result is -100.
pub fn fit_to_length(
    mut example: TokenizedExample,
    max_len: usize,
    policy: TruncationPolicy,
    bos_id: Option<u32>,
) -> Fitted {
    let len = example.len();
    if len <= max_len {
        example.ignore_first_label();
        return Fitted::Kept {
            example,
            truncated: false,
            original_len: len,
        };
    }
    match policy {
        TruncationPolicy::Drop => return Fitted::TooLong { len },
        TruncationPolicy::Truncate => {
            example.input_ids.truncate(max_len);
            example.labels.truncate(max_len);
        }
        TruncationPolicy::TruncateLeft => {
            let keep_bos = bos_id.is_some() && example.input_ids.first().copied() == bos_id;
            let head = usize::from(keep_bos && max_len > 1);
            let cut = head..len - (max_len - head);
            example.input_ids.drain(cut.clone());
            example.labels.drain(cut);
        }
    }
    example.ignore_first_label();
    Fitted::Kept {
        example,
        truncated: true,
        original_len: len,
    }
}

/// Encodes examples with one tokenizer, template and config.
#[derive(Debug, Clone)]
pub struct Encoder<'a> {
    tokenizer: Cow<'a, tokenizers::Tokenizer>,
    spec: TokenizerSpec<'a>,
    template: Option<&'a ChatTemplate>,
    config: &'a TokenizeConfig,
}

impl<'a> Encoder<'a> {
    /// An encoder; `template` is needed only for chat examples. A tokenizer that carries its
    /// own truncation or padding settings is used through a copy without them (this stage
    /// truncates and pads itself).
    pub fn new(
        spec: TokenizerSpec<'a>,
        template: Option<&'a ChatTemplate>,
        config: &'a TokenizeConfig,
    ) -> Self {
        let tokenizer = if spec.tokenizer.get_truncation().is_some()
            || spec.tokenizer.get_padding().is_some()
        {
            let mut plain = spec.tokenizer.clone();
            plain.with_padding(None);
            // Removing truncation cannot fail (only invalid parameters can).
            let _ = plain.with_truncation(None);
            Cow::Owned(plain)
        } else {
            Cow::Borrowed(spec.tokenizer)
        };
        Self {
            tokenizer,
            spec,
            template,
            config,
        }
    }

    /// The tokenizer spec.
    pub fn spec(&self) -> &TokenizerSpec<'a> {
        &self.spec
    }

    /// Token ids and labels of `example`, whole (not yet truncated: see [`fit_to_length`]).
    /// The first label is always -100.
    pub fn encode(&self, example: &Example) -> Result<TokenizedExample, ExampleError> {
        match example {
            Example::Chat(messages) => self.encode_chat(messages),
            Example::Completion { prompt, completion } => {
                let text = format!("{prompt}{completion}");
                let trained = AssistantSpan {
                    message_index: 0,
                    start: prompt.len(),
                    end: text.len(),
                };
                self.encode_plain(&text, Some(trained), "completion")
            }
            Example::Text(text) => self.encode_plain(text, None, "text"),
        }
    }

    /// [`Self::encode`] then [`fit_to_length`] with the config's length and policy.
    pub fn encode_fitted(&self, example: &Example) -> Result<Fitted, ExampleError> {
        let encoded = self.encode(example)?;
        Ok(fit_to_length(
            encoded,
            self.config.max_seq_len,
            self.config.truncation,
            self.spec.bos_id,
        ))
    }

    fn encode_chat(&self, messages: &[Message]) -> Result<TokenizedExample, ExampleError> {
        let template = self.template.ok_or(ExampleError::NoTemplate)?;
        let rendered =
            template.render_with_assistant_spans(messages, &self.config.template_vars)?;
        let encoding = self.encode_text(&rendered.text, false)?;
        let offsets = encoding.get_offsets();
        let mask = if self.config.train_on_inputs {
            offsets.iter().map(|&(s, e)| s < e).collect()
        } else {
            token_mask_from_offsets(&rendered.assistant_spans, offsets)
        };
        Ok(labelled(encoding.get_ids(), &mask))
    }

    /// Completion (`trained` = the completion's bytes) or text (`None`: all bytes).
    fn encode_plain(
        &self,
        text: &str,
        trained: Option<AssistantSpan>,
        format: &'static str,
    ) -> Result<TokenizedExample, ExampleError> {
        let encoding = self.encode_text(text, true)?;
        let mut ids = encoding.get_ids().to_vec();
        let offsets = encoding.get_offsets();
        let mut mask: Vec<bool> = match trained {
            Some(span) if !self.config.train_on_inputs => token_mask_from_offsets(&[span], offsets),
            _ => offsets.iter().map(|&(s, e)| s < e).collect(),
        };
        if let Some(bos) = self.spec.bos_id {
            // The post-processor's BOS (empty offsets) before a BOS written in the text.
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
                mask.remove(0);
            }
        }
        if self.config.add_eos {
            let eos = self
                .spec
                .eos_id
                .ok_or(ExampleError::MissingEos { format })?;
            if ids.last() == Some(&eos) {
                if let Some(last) = mask.last_mut() {
                    *last = true;
                }
            } else {
                ids.push(eos);
                mask.push(true);
            }
        }
        Ok(labelled(&ids, &mask))
    }

    fn encode_text(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<tokenizers::Encoding, ExampleError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ExampleError::Encode {
                message: e.to_string(),
            })
    }
}

fn labelled(ids: &[u32], mask: &[bool]) -> TokenizedExample {
    let labels = ids
        .iter()
        .zip(mask)
        .map(|(&id, &trained)| {
            if trained {
                // Vocabularies are far below 2^31; an id that is not would be a corrupt
                // tokenizer, and is kept out of the loss rather than wrapped.
                i32::try_from(id).unwrap_or(IGNORE_INDEX)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    let mut example = TokenizedExample {
        input_ids: ids.to_vec(),
        labels,
    };
    example.ignore_first_label();
    example
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(n: u32) -> TokenizedExample {
        TokenizedExample {
            input_ids: (1..=n).collect(),
            labels: (1..=n as i32).collect(),
        }
    }

    #[test]
    fn truncation_policies_keep_the_right_tokens() {
        let fitted = fit_to_length(example(6), 4, TruncationPolicy::Truncate, Some(1));
        let Fitted::Kept {
            example: e,
            truncated: true,
            ..
        } = fitted
        else {
            panic!("{fitted:?}")
        };
        assert_eq!(e.input_ids, [1, 2, 3, 4]);
        assert_eq!(e.labels, [IGNORE_INDEX, 2, 3, 4]);

        let fitted = fit_to_length(example(6), 4, TruncationPolicy::TruncateLeft, Some(1));
        let Fitted::Kept {
            example: e,
            truncated: true,
            ..
        } = fitted
        else {
            panic!("{fitted:?}")
        };
        assert_eq!(e.input_ids, [1, 4, 5, 6], "BOS stays in front");
        assert_eq!(e.labels, [IGNORE_INDEX, 4, 5, 6]);

        let fitted = fit_to_length(example(6), 4, TruncationPolicy::TruncateLeft, None);
        let Fitted::Kept { example: e, .. } = fitted else {
            panic!("{fitted:?}")
        };
        assert_eq!(e.input_ids, [3, 4, 5, 6]);
        assert_eq!(e.labels, [IGNORE_INDEX, 4, 5, 6]);

        assert_eq!(
            fit_to_length(example(6), 4, TruncationPolicy::Drop, None),
            Fitted::TooLong { len: 6 }
        );
        let fitted = fit_to_length(example(4), 4, TruncationPolicy::Drop, None);
        assert!(matches!(
            fitted,
            Fitted::Kept {
                truncated: false,
                ..
            }
        ));
    }
}
