//! Chunking documents by tokens along paragraph and heading boundaries, with overlap.
//!
//! A document's text is cut into token spans (byte ranges), by a Hugging Face `tokenizer.json`
//! when one is given, else by the word approximation [`Tokenization::Words`]: a token is a run of
//! alphanumeric characters or one other non-space character (what BERT-style pre-tokenizers
//! split on; subword vocabularies give about 1.1-1.4 times as many tokens on English prose).
//!
//! Chunks hold at most `max_tokens` tokens. A chunk that does not reach the end of the document
//! ends at the last paragraph or heading start in the second half of its window, else at the
//! last sentence end there, else after `max_tokens` tokens. The next chunk starts
//! `overlap_tokens` tokens before that end, moved forward to the first sentence start in the
//! overlap if there is one. A chunk's text is exactly `text[start_byte..end_byte]` of its
//! document (from its first token's start to its last token's end), and its id is
//! `{doc_id}#{position}`, so re-indexing the same documents with the same settings gives the
//! same ids.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::document::Document;
use crate::error::{RagError, Result};

/// Chunk sizes, in tokens of the chunking tokenizer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkConfig {
    /// Most tokens in one chunk.
    pub max_tokens: usize,
    /// Tokens a chunk repeats from the end of the previous one (less when it snaps to a
    /// sentence start); below `max_tokens / 2`.
    pub overlap_tokens: usize,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        ChunkConfig {
            max_tokens: 256,
            overlap_tokens: 32,
        }
    }
}

impl ChunkConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens < 8 {
            return Err(RagError::config(
                "max_tokens",
                format!("expected at least 8, found {}", self.max_tokens),
            ));
        }
        if self.overlap_tokens * 2 >= self.max_tokens {
            return Err(RagError::config(
                "overlap_tokens",
                format!(
                    "expected below max_tokens / 2 = {}, found {}",
                    self.max_tokens / 2,
                    self.overlap_tokens
                ),
            ));
        }
        Ok(())
    }
}

/// What counts as a token when chunking (recorded in the index manifest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tokenization {
    /// Runs of alphanumerics and single other non-space characters (an approximation).
    Words,
    /// A Hugging Face `tokenizer.json`, kept in the index directory as `file`.
    HuggingFace { file: String },
}

/// Where a chunk lies in its document's text: byte and character offsets, end exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start_byte: usize,
    pub end_byte: usize,
    pub start_char: usize,
    pub end_char: usize,
}

/// One chunk of a document, with what a citation needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// `{doc_id}#{position}`.
    pub id: String,
    pub doc_id: String,
    /// 0-based index of the chunk in its document.
    pub position: usize,
    pub title: String,
    pub source: String,
    pub text: String,
    #[serde(flatten)]
    pub span: Span,
}

/// The chunk id of a document's chunk.
pub fn chunk_id(doc_id: &str, position: usize) -> String {
    format!("{doc_id}#{position}")
}

/// The name tokenizer errors during chunking are reported under.
const TOKENIZER_NAME: &str = "tokenizer.json";

/// One token of a document: its bytes, and how many tokenizer tokens it counts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub span: Range<usize>,
    pub weight: usize,
}

enum Splitter {
    Words,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// Cuts documents into chunks as [`ChunkConfig`] says.
pub struct Chunker {
    config: ChunkConfig,
    splitter: Splitter,
}

impl Chunker {
    /// A chunker counting approximate word tokens.
    pub fn words(config: ChunkConfig) -> Result<Self> {
        config.validate()?;
        Ok(Chunker {
            config,
            splitter: Splitter::Words,
        })
    }

    /// A chunker counting the tokens of a Hugging Face `tokenizer.json` (no special tokens, no
    /// truncation).
    pub fn hugging_face(config: ChunkConfig, path: &Path) -> Result<Self> {
        config.validate()?;
        let fail = |message: String| RagError::Tokenizer {
            path: PathBuf::from(path),
            message,
        };
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| fail(e.to_string()))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Chunker {
            config,
            splitter: Splitter::HuggingFace(Box::new(tokenizer)),
        })
    }

    pub fn config(&self) -> &ChunkConfig {
        &self.config
    }

    /// The tokens of `text` as sorted, non-overlapping, non-blank byte ranges on character
    /// boundaries, each with the number of tokenizer tokens it stands for: tokens sharing bytes
    /// (byte-fallback pieces of one character) are merged, and a whitespace-only token (a lone
    /// `▁`, a newline byte) is counted with the token after it, so the weights add up to the
    /// tokenizer's count and a chunk never starts or ends in whitespace.
    pub fn tokens(&self, text: &str) -> Result<Vec<Token>> {
        let raw = match &self.splitter {
            Splitter::Words => word_spans(text),
            Splitter::HuggingFace(tokenizer) => tokenizer
                .encode(text, false)
                .map_err(|e| RagError::Tokenizer {
                    path: PathBuf::from(TOKENIZER_NAME),
                    message: e.to_string(),
                })?
                .get_offsets()
                .iter()
                .map(|&(s, e)| s..e)
                .collect(),
        };
        let mut tokens: Vec<Token> = Vec::with_capacity(raw.len());
        let mut pending = 0;
        for mut span in raw {
            span.end = span.end.min(text.len());
            if span.start >= span.end {
                continue; // a special token: not in the text
            }
            while !text.is_char_boundary(span.start) {
                span.start -= 1;
            }
            while !text.is_char_boundary(span.end) {
                span.end += 1;
            }
            if text[span.clone()].trim().is_empty() {
                pending += 1;
                continue;
            }
            let weight = 1 + std::mem::take(&mut pending);
            match tokens.last_mut() {
                Some(last) if span.start < last.span.end => {
                    last.span.end = last.span.end.max(span.end);
                    last.weight += weight;
                }
                _ => tokens.push(Token { span, weight }),
            }
        }
        Ok(tokens)
    }

    /// The chunks of one document, in order.
    pub fn chunk(&self, doc: &Document) -> Result<Vec<Chunk>> {
        let text = doc.text.as_str();
        let tokens = self.tokens(text)?;
        let ranges = chunk_token_ranges(text, &tokens, &self.config);
        let mut chars = CharCursor::default();
        Ok(ranges
            .into_iter()
            .enumerate()
            .map(|(position, range)| {
                let start_byte = tokens[range.start].span.start;
                let end_byte = tokens[range.end - 1].span.end;
                let start_char = chars.advance(text, start_byte);
                let end_char = start_char + text[start_byte..end_byte].chars().count();
                Chunk {
                    id: chunk_id(&doc.id, position),
                    doc_id: doc.id.clone(),
                    position,
                    title: doc.title.clone(),
                    source: doc.source.clone(),
                    text: text[start_byte..end_byte].to_string(),
                    span: Span {
                        start_byte,
                        end_byte,
                        start_char,
                        end_char,
                    },
                }
            })
            .collect())
    }
}

/// Byte offset -> character offset, for increasing byte offsets.
#[derive(Default)]
struct CharCursor {
    byte: usize,
    chars: usize,
}

impl CharCursor {
    fn advance(&mut self, text: &str, byte: usize) -> usize {
        self.chars += text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

/// The word approximation: alphanumeric runs and single other non-space characters.
fn word_spans(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut word: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            word.get_or_insert(i);
            continue;
        }
        if let Some(start) = word.take() {
            spans.push(start..i);
        }
        if !c.is_whitespace() {
            spans.push(i..i + c.len_utf8());
        }
    }
    if let Some(start) = word {
        spans.push(start..text.len());
    }
    spans
}

/// How good a place to cut before token `i` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
    None,
    Sentence,
    Block,
}

fn break_before(text: &str, tokens: &[Token], i: usize) -> Break {
    if i == 0 || i >= tokens.len() {
        return Break::Block;
    }
    let gap = &text[tokens[i - 1].span.end..tokens[i].span.start];
    let blank_line = gap.matches('\n').count() >= 2;
    let heading = gap.contains('\n') && text[tokens[i].span.start..].starts_with('#');
    if blank_line || heading {
        return Break::Block;
    }
    let prev = &text[tokens[i - 1].span.clone()];
    if !gap.is_empty() && prev.ends_with(['.', '!', '?']) {
        return Break::Sentence;
    }
    Break::None
}

/// Token index ranges of the chunks (see the module docs), sizes counted in token weights.
fn chunk_token_ranges(text: &str, tokens: &[Token], config: &ChunkConfig) -> Vec<Range<usize>> {
    let n = tokens.len();
    // prefix[i]: the weight of tokens[..i].
    let prefix: Vec<usize> = std::iter::once(0)
        .chain(tokens.iter().scan(0, |sum, t| {
            *sum += t.weight;
            Some(*sum)
        }))
        .collect();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        // The longest run from `start` within max_tokens (at least one token).
        let limit = prefix[start] + config.max_tokens;
        let hard_end = (prefix.partition_point(|&p| p <= limit) - 1).clamp(start + 1, n);
        let end = if hard_end == n {
            n
        } else {
            // Cut points after more than half a chunk.
            let half = prefix[start] + config.max_tokens / 2;
            let first = prefix.partition_point(|&p| p <= half).max(start + 1);
            let best = |kind: Break| {
                (first..=hard_end)
                    .rev()
                    .find(|&i| break_before(text, tokens, i) >= kind)
            };
            best(Break::Block)
                .or_else(|| best(Break::Sentence))
                .unwrap_or(hard_end)
        };
        out.push(start..end);
        if end == n {
            break;
        }
        // The earliest token whose run to `end` is within overlap_tokens.
        let from = prefix[end].saturating_sub(config.overlap_tokens);
        let overlap_start = prefix.partition_point(|&p| p < from).clamp(start + 1, end);
        start = (overlap_start..end)
            .find(|&i| break_before(text, tokens, i) >= Break::Sentence)
            .unwrap_or(overlap_start);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Document {
        Document {
            id: "d".into(),
            title: "t".into(),
            source: "s".into(),
            text: text.into(),
        }
    }

    #[test]
    fn word_tokens_split_punctuation() {
        let text = "Héllo, wörld! 42x";
        let chunker = Chunker::words(ChunkConfig::default()).unwrap();
        let tokens = chunker.tokens(text).unwrap();
        assert!(tokens.iter().all(|t| t.weight == 1));
        let words: Vec<&str> = tokens.into_iter().map(|t| &text[t.span]).collect();
        assert_eq!(words, ["Héllo", ",", "wörld", "!", "42x"]);
    }

    #[test]
    fn short_document_is_one_trimmed_chunk() {
        let chunker = Chunker::words(ChunkConfig::default()).unwrap();
        let chunks = chunker.chunk(&doc("\n  Just one line.  \n")).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].id, "d#0");
        assert_eq!(chunks[0].text, "Just one line.");
        assert_eq!(
            (chunks[0].span.start_byte, chunks[0].span.start_char),
            (3, 3)
        );
    }

    #[test]
    fn long_document_cuts_at_paragraphs_with_overlap() {
        let para = |w: &str| [w; 10].join(" ") + ".";
        let text = format!(
            "# Title\n\n{}\n\n{}\n\n## Next\n\n{}",
            para("alpha"),
            para("beta"),
            para("gamma")
        );
        let config = ChunkConfig {
            max_tokens: 16,
            overlap_tokens: 4,
        };
        let chunks = Chunker::words(config).unwrap().chunk(&doc(&text)).unwrap();
        assert!(chunks.len() >= 3, "{chunks:#?}");
        for chunk in &chunks {
            assert_eq!(
                &text[chunk.span.start_byte..chunk.span.end_byte],
                chunk.text
            );
            assert!(word_spans(&chunk.text).len() <= 16);
        }
        // The first chunk ends at the paragraph boundary, before "beta".
        assert!(chunks[0].text.starts_with("# Title") && !chunks[0].text.contains("beta"));
        // Consecutive chunks overlap (each starts before the previous one ends).
        for pair in chunks.windows(2) {
            assert!(pair[1].span.start_byte < pair[0].span.end_byte);
            assert!(pair[1].span.start_byte > pair[0].span.start_byte);
        }
        assert!(chunks.last().unwrap().text.ends_with("gamma."));
    }

    #[test]
    fn config_rejects_overlap_of_half_a_chunk() {
        let config = ChunkConfig {
            max_tokens: 64,
            overlap_tokens: 32,
        };
        assert!(matches!(
            config.validate(),
            Err(RagError::Config { key, .. }) if key == "overlap_tokens"
        ));
    }
}
