//! Task data -> model requests, once per evaluation (every column sees the same tokens):
//!
//! * perplexity: hone-tokenize's [`Encoder`] with the training conventions (chat template,
//!   assistant-only labels unless `all_tokens`, EOS after text, truncation to `max_seq_len`),
//!   one example per row, the same tokenizer spec as hone-train;
//! * multiple choice: one row per choice, `context + continuation` with the continuation's
//!   tokens as targets ([`PromptEncoder::split`]); contexts too long lose their left part;
//! * generation: prompt ids (few-shot prefix, optional chat template), left-truncated so that
//!   prompt plus `max_new_tokens` fit.

use hone_model::Tokenizer;
use hone_tokenize::{
    ChatTemplate, Encoder, Example, ExtraContext, Fitted, TokenizeConfig, TokenizerSpec,
    TruncationPolicy,
};

use crate::config::{TaskKind, TaskSpec};
use crate::data::{read_generation, read_lm, read_multiple_choice, GenItem, Loaded, McItem};
use crate::error::{EvalError, Result};
use crate::prompt::{choices_block, Field, Prompt, PromptEncoder, PromptTemplate, Values};
use crate::report::{GenerationReport, PromptReport};
use crate::score::ScoreRow;

/// A task's records, read before the model is loaded.
#[derive(Clone)]
pub(crate) enum TaskData {
    Lm(Loaded<(usize, Example)>),
    Mc(Loaded<McItem>),
    Gen {
        data: Loaded<GenItem>,
        shots: Vec<GenItem>,
    },
}

impl TaskData {
    /// Whether tokenizing this data needs a chat template.
    pub(crate) fn has_conversations(&self) -> bool {
        match self {
            TaskData::Lm(d) => d.items.iter().any(|(_, e)| matches!(e, Example::Chat(_))),
            _ => false,
        }
    }
}

/// Reads the records of `spec` (and its few-shot examples).
pub(crate) fn load_task_data(spec: &TaskSpec) -> Result<TaskData> {
    Ok(match spec.kind {
        TaskKind::Perplexity => TaskData::Lm(read_lm(&spec.path, spec.limit)?),
        TaskKind::MultipleChoice => TaskData::Mc(read_multiple_choice(&spec.path, spec.limit)?),
        TaskKind::Generation => {
            let shots = match (&spec.fewshot_path, spec.fewshot) {
                (Some(path), k) if k > 0 => {
                    let shots = read_generation(path, Some(k))?.items;
                    if shots.len() < k {
                        return Err(EvalError::config(
                            format!("tasks.{}.fewshot", spec.name),
                            format!(
                                "{} holds {} examples, fewer than {k}",
                                path.display(),
                                shots.len()
                            ),
                        ));
                    }
                    shots
                }
                _ => Vec::new(),
            };
            TaskData::Gen {
                data: read_generation(&spec.path, spec.limit)?,
                shots,
            }
        }
    })
}

/// What a task asks of the model.
/// One record is one row (perplexity), one row per choice (multiple choice, consecutive) or
/// one prompt (generation).
pub(crate) enum Work {
    Perplexity {
        rows: Vec<ScoreRow>,
        /// Line in the data file of each row's example.
        lines: Vec<usize>,
    },
    MultipleChoice {
        rows: Vec<ScoreRow>,
        items: Vec<McItem>,
        /// Characters of each choice's continuation text (for `acc_norm`).
        choice_chars: Vec<Vec<usize>>,
        /// Each question's context text, as the model saw it.
        contexts: Vec<String>,
    },
    Generation {
        prompts: Vec<Vec<u32>>,
        items: Vec<GenItem>,
        stop_ids: Vec<u32>,
        /// Each prompt's text, as the model saw it (before any left truncation).
        texts: Vec<String>,
    },
}

/// A task ready to run.
pub(crate) struct PreparedTask {
    pub spec: TaskSpec,
    pub available: usize,
    pub evaluated: usize,
    pub prompt: PromptReport,
    pub generation: Option<GenerationReport>,
    pub truncated: usize,
    pub skipped: usize,
    pub work: Work,
}

impl PreparedTask {
    /// Units of progress per column (rows or prompts).
    pub(crate) fn total(&self) -> usize {
        match &self.work {
            Work::Perplexity { rows, .. } | Work::MultipleChoice { rows, .. } => rows.len(),
            Work::Generation { prompts, .. } => prompts.len(),
        }
    }
}

/// Shared inputs of preparation.
pub(crate) struct Context<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub max_len: usize,
    pub batch_size: usize,
}

fn base_prompt_report(
    spec: &TaskSpec,
    template: Option<&ChatTemplate>,
    chat: bool,
) -> PromptReport {
    PromptReport {
        template: spec.prompt.clone(),
        choice_format: spec.choice_format.clone(),
        chat,
        chat_template: template.filter(|_| chat).map(|t| t.name().to_string()),
        fewshot: spec.fewshot,
        fewshot_path: spec.fewshot_path.clone(),
        fewshot_lines: Vec::new(),
        example: String::new(),
    }
}

/// Keeps the last `max_len` tokens of a row (at least one target stays when possible).
fn truncate_left(row: ScoreRow, max_len: usize) -> (ScoreRow, bool) {
    if row.ids.len() <= max_len {
        return (row, false);
    }
    let cut = row.ids.len() - max_len;
    let mut labels = row.labels[cut..].to_vec();
    labels[0] = hone_model::loss::IGNORE_INDEX;
    (
        ScoreRow {
            ids: row.ids[cut..].to_vec(),
            labels,
        },
        true,
    )
}

/// Tokenizes `data` for `spec`.
pub(crate) fn prepare_task(
    spec: &TaskSpec,
    data: TaskData,
    ctx: &Context<'_>,
) -> Result<PreparedTask> {
    let chat_template = if spec.chat {
        Some(ctx.template.ok_or_else(|| {
            EvalError::config(
                format!("tasks.{}.chat", spec.name),
                "no chat template could be loaded",
            )
        })?)
    } else {
        None
    };
    let mut prompt = base_prompt_report(spec, ctx.template, spec.chat);
    let encoder = PromptEncoder {
        tokenizer: ctx.tokenizer,
        chat: chat_template,
        extra: ExtraContext::new(),
    };
    let tokenize_err = |index: usize, message: String| EvalError::Tokenize {
        task: spec.name.clone(),
        index,
        message,
    };
    match data {
        TaskData::Lm(loaded) => {
            let config = TokenizeConfig {
                train_on_inputs: spec.all_tokens,
                max_seq_len: ctx.max_len,
                truncation: TruncationPolicy::Truncate,
                packing: false,
                add_eos: true,
                ..TokenizeConfig::default()
            };
            let tok_spec = match ctx.template {
                Some(t) => {
                    TokenizerSpec::from_special_tokens(ctx.tokenizer.inner(), t.special_tokens())
                }
                None => TokenizerSpec {
                    tokenizer: ctx.tokenizer.inner(),
                    bos_id: ctx.tokenizer.bos_id,
                    eos_id: ctx.tokenizer.eos_ids.first().copied(),
                    pad_id: None,
                },
            };
            if loaded
                .items
                .iter()
                .any(|(_, e)| matches!(e, Example::Chat(_)))
            {
                prompt.chat_template = ctx.template.map(|t| t.name().to_string());
            }
            let lm_encoder = Encoder::new(tok_spec, ctx.template, &config);
            let (mut rows, mut lines, mut truncated, mut skipped) = (Vec::new(), Vec::new(), 0, 0);
            for (index, (line, example)) in loaded.items.iter().enumerate() {
                let fitted = lm_encoder
                    .encode_fitted(example)
                    .map_err(|e| tokenize_err(index, e.to_string()))?;
                let Fitted::Kept {
                    example: tokens,
                    truncated: cut,
                    ..
                } = fitted
                else {
                    skipped += 1;
                    continue;
                };
                let row = ScoreRow {
                    ids: tokens.input_ids,
                    labels: tokens.labels.iter().map(|&l| l as i64).collect(),
                };
                if row.targets() == 0 {
                    skipped += 1;
                    continue;
                }
                truncated += usize::from(cut);
                rows.push(row);
                lines.push(*line);
            }
            if rows.is_empty() {
                return Err(EvalError::EmptyData {
                    path: spec.path.clone(),
                    detail: " (no example has a token in the loss; try all_tokens)".into(),
                });
            }
            Ok(PreparedTask {
                spec: spec.clone(),
                available: loaded.available,
                evaluated: loaded.items.len() - skipped,
                prompt,
                generation: None,
                truncated,
                skipped,
                work: Work::Perplexity { rows, lines },
            })
        }
        TaskData::Mc(loaded) => {
            let template = PromptTemplate::parse(&spec.prompt, &[Field::Question, Field::Choices])?;
            let choice_template =
                PromptTemplate::parse(&spec.choice_format, &[Field::Choice, Field::Label])?;
            let (mut rows, mut choice_chars, mut truncated) = (Vec::new(), Vec::new(), 0);
            let mut contexts = Vec::with_capacity(loaded.items.len());
            for (index, item) in loaded.items.iter().enumerate() {
                let choices = choices_block(&item.labels, &item.choices);
                let user = template.render(&Values {
                    question: &item.question,
                    choices: &choices,
                    ..Values::default()
                });
                let context = encoder.context_text(&Prompt {
                    shots: Vec::new(),
                    user,
                })?;
                if index == 0 {
                    prompt.example = context.clone();
                }
                let mut chars = Vec::with_capacity(item.choices.len());
                for (choice, label) in item.choices.iter().zip(&item.labels) {
                    let continuation = choice_template.render(&Values {
                        choice,
                        label,
                        ..Values::default()
                    });
                    let split = encoder
                        .split(&context, &continuation)
                        .map_err(|e| tokenize_err(index, e.to_string()))?;
                    if split.continuation.is_empty() {
                        return Err(tokenize_err(
                            index,
                            format!(
                                "choice {continuation:?} (line {}) encodes to no token",
                                item.line
                            ),
                        ));
                    }
                    let (row, cut) = truncate_left(
                        ScoreRow::continuation(&split.context, &split.continuation),
                        ctx.max_len,
                    );
                    truncated += usize::from(cut);
                    rows.push(row);
                    chars.push(continuation.chars().count());
                }
                choice_chars.push(chars);
                contexts.push(context);
            }
            Ok(PreparedTask {
                spec: spec.clone(),
                available: loaded.available,
                evaluated: loaded.items.len(),
                prompt,
                generation: None,
                truncated,
                skipped: 0,
                work: Work::MultipleChoice {
                    rows,
                    items: loaded.items,
                    choice_chars,
                    contexts,
                },
            })
        }
        TaskData::Gen { data, shots } => {
            let template = PromptTemplate::parse(&spec.prompt, &[Field::Question])?;
            let render = |q: &str| {
                template.render(&Values {
                    question: q,
                    ..Values::default()
                })
            };
            let shot_pairs: Vec<(String, String)> = shots
                .iter()
                .map(|s| (render(&s.question), s.answer.clone()))
                .collect();
            prompt.fewshot_lines = shots.iter().map(|s| s.line).collect();
            let budget = ctx.max_len.saturating_sub(spec.max_new_tokens).max(1);
            let (mut prompts, mut texts, mut truncated) = (Vec::new(), Vec::new(), 0);
            for (index, item) in data.items.iter().enumerate() {
                let text = encoder.context_text(&Prompt {
                    shots: shot_pairs.clone(),
                    user: render(&item.question),
                })?;
                if index == 0 {
                    prompt.example = text.clone();
                }
                let mut ids = encoder
                    .encode_context(&text)
                    .map_err(|e| tokenize_err(index, e.to_string()))?;
                if ids.len() > budget {
                    ids.drain(..ids.len() - budget);
                    truncated += 1;
                }
                prompts.push(ids);
                texts.push(text);
            }
            let mut stop_ids = ctx.tokenizer.eos_ids.clone();
            if let Some(eos) = chat_template
                .and_then(|t| t.special_tokens().eos_token.as_deref())
                .and_then(|t| ctx.tokenizer.inner().token_to_id(t))
            {
                if !stop_ids.contains(&eos) {
                    stop_ids.push(eos);
                }
            }
            let generation = GenerationReport {
                decoding: "greedy".into(),
                max_new_tokens: spec.max_new_tokens,
                stop_strings: spec.stop.clone(),
                stop_ids: stop_ids.clone(),
                batch_size: ctx.batch_size,
            };
            Ok(PreparedTask {
                spec: spec.clone(),
                available: data.available,
                evaluated: data.items.len(),
                prompt,
                generation: Some(generation),
                truncated,
                skipped: 0,
                work: Work::Generation {
                    prompts,
                    items: data.items,
                    stop_ids,
                    texts,
                },
            })
        }
    }
}
