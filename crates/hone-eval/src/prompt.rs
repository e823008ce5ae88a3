//! Prompt construction: [`PromptTemplate`] (a string with `{question}`, `{choices}`,
//! `{choice}`, `{label}` placeholders, `{{`/`}}` for literal braces), few-shot prefixes, and
//! [`PromptEncoder`], which turns a prompt (plain text, or a conversation wrapped in the model's
//! chat template) into token ids the way lm-evaluation-harness does for log-likelihood
//! requests: the continuation's tokens are those of `context + continuation` after the
//! context's own tokens.

use hone_model::Tokenizer;
use hone_tokenize::{ChatTemplate, ExtraContext, Message};

use crate::error::{EvalError, Result};

/// A placeholder of a prompt template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The question text.
    Question,
    /// The choices, one per line: `A. first\nB. second`.
    Choices,
    /// One choice's text (continuation templates).
    Choice,
    /// One choice's label (continuation templates).
    Label,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Question => "question",
            Field::Choices => "choices",
            Field::Choice => "choice",
            Field::Label => "label",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(Field),
}

/// A parsed prompt template.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTemplate {
    source: String,
    pieces: Vec<Piece>,
}

/// Values substituted into a template.
#[derive(Debug, Clone, Copy, Default)]
pub struct Values<'a> {
    pub question: &'a str,
    pub choices: &'a str,
    pub choice: &'a str,
    pub label: &'a str,
}

impl PromptTemplate {
    /// Parses `source`, accepting only the placeholders in `allowed`.
    pub fn parse(source: &str, allowed: &[Field]) -> Result<Self> {
        let err = |message: String| EvalError::Template {
            template: source.to_string(),
            message,
        };
        let all = [Field::Question, Field::Choices, Field::Choice, Field::Label];
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(err(format!(
                                    "`{{{name}` is not closed (write `{{{{` for a literal brace)"
                                )))
                            }
                        }
                    }
                    let allowed_names: Vec<String> = allowed
                        .iter()
                        .map(|f| format!("{{{}}}", f.name()))
                        .collect();
                    let field = all
                        .into_iter()
                        .find(|f| f.name() == name.trim())
                        .filter(|f| allowed.contains(f))
                        .ok_or_else(|| {
                            err(format!(
                                "unknown placeholder `{{{name}}}`: expected {}",
                                allowed_names.join(" or ")
                            ))
                        })?;
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(field));
                }
                '}' => return Err(err("unmatched `}` (write `}}` for a literal brace)".into())),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self {
            source: source.to_string(),
            pieces,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Substitutes `values`.
    pub fn render(&self, values: &Values<'_>) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(Field::Question) => out.push_str(values.question),
                Piece::Field(Field::Choices) => out.push_str(values.choices),
                Piece::Field(Field::Choice) => out.push_str(values.choice),
                Piece::Field(Field::Label) => out.push_str(values.label),
            }
        }
        out
    }
}

/// The `{choices}` text: `LABEL. TEXT` lines.
pub fn choices_block(labels: &[String], choices: &[String]) -> String {
    labels
        .iter()
        .zip(choices)
        .map(|(l, c)| format!("{l}. {c}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Text between a few-shot prompt and its answer.
pub const FEWSHOT_TARGET_DELIMITER: &str = " ";
/// Text after each few-shot example.
pub const FEWSHOT_SEPARATOR: &str = "\n\n";

/// A prompt before encoding: one user turn, preceded by solved (user, assistant) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub shots: Vec<(String, String)>,
    pub user: String,
}

impl Prompt {
    /// The prompt as plain text: each shot as `prompt + " " + answer + "\n\n"`, then the
    /// user turn (lm-evaluation-harness' default delimiters).
    pub fn plain_text(&self) -> String {
        let mut text = String::new();
        for (q, a) in &self.shots {
            text.push_str(q);
            text.push_str(FEWSHOT_TARGET_DELIMITER);
            text.push_str(a);
            text.push_str(FEWSHOT_SEPARATOR);
        }
        text.push_str(&self.user);
        text
    }

    /// The prompt as a conversation (shots as user/assistant turns).
    pub fn messages(&self) -> Vec<Message> {
        let mut messages = Vec::with_capacity(2 * self.shots.len() + 1);
        for (q, a) in &self.shots {
            messages.push(Message::user(q.clone()));
            messages.push(Message::assistant(a.clone()));
        }
        messages.push(Message::user(self.user.clone()));
        messages
    }
}

/// Turns prompts into token ids: plain text through the tokenizer (BOS as the model wants it),
/// or a conversation through the chat template with a generation prompt (encoded without
/// added special tokens: the template writes them).
pub struct PromptEncoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
    pub extra: ExtraContext,
}

/// Ids of a context and a continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextContinuation {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

impl PromptEncoder<'_> {
    /// The text the model is conditioned on.
    pub fn context_text(&self, prompt: &Prompt) -> Result<String> {
        match self.chat {
            Some(template) => Ok(template.render(&prompt.messages(), true, &self.extra)?),
            None => Ok(prompt.plain_text()),
        }
    }

    /// Encodes a full context text.
    pub fn encode_context(&self, text: &str) -> Result<Vec<u32>> {
        match self.chat {
            Some(_) => self.encode_raw(text),
            None => Ok(self.tokenizer.encode_prompt(text)?),
        }
    }

    fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .inner()
            .encode(text, false)
            .map_err(|e| EvalError::Tokenize {
                task: "prompt".into(),
                index: 0,
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Context and continuation ids: the continuation is what `context + continuation`
    /// encodes to after the context's ids; when the tokenizer merges across the boundary (the
    /// whole does not start with the context's ids) the continuation is encoded alone.
    pub fn split(&self, context_text: &str, continuation: &str) -> Result<ContextContinuation> {
        let context = self.encode_context(context_text)?;
        let whole = self.encode_context(&format!("{context_text}{continuation}"))?;
        let continuation = if whole.len() > context.len() && whole[..context.len()] == context[..] {
            whole[context.len()..].to_vec()
        } else {
            self.encode_raw(continuation)?
        };
        Ok(ContextContinuation {
            context,
            continuation,
        })
    }
}
