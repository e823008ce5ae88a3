//! Decontamination: drop training examples that share a long word n-gram with any evaluation
//! example (the GPT-3 paper's 13-gram overlap test, Brown et al. 2020, appendix C).
//!
//! Evaluation files are read with the same readers as inputs (any supported file type) and are
//! format-agnostic: the text of an evaluation record is every string value in it (nested
//! objects and arrays included, keys excluded), joined by newlines. Words are lowercased
//! alphanumeric runs ([`crate::shingle`]), so case and punctuation do not hide an overlap. A text
//! shorter than `ngram` words has no n-gram and so never matches.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::DataError;
use crate::example::Source;
use crate::reader::RawRecord;
use crate::shingle::{full_word_ngrams, Scratch};

/// Decontamination settings; it runs when `eval_files` is not empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecontamConfig {
    /// Evaluation files or glob patterns.
    pub eval_files: Vec<String>,
    /// Length in words of the shared span that marks contamination.
    pub ngram: usize,
}

impl Default for DecontamConfig {
    fn default() -> Self {
        DecontamConfig {
            eval_files: Vec::new(),
            ngram: 13,
        }
    }
}

impl DecontamConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.ngram == 0 {
            return Err(DataError::config(
                "decontaminate.ngram",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The n-grams of all evaluation records, each with the first record it occurs in.
#[derive(Debug, Default)]
pub struct EvalIndex {
    ngram: usize,
    grams: HashMap<u64, Source>,
    /// Number of evaluation records indexed.
    pub records: usize,
}

/// Every string leaf of a JSON value, joined by newlines.
pub fn record_text(value: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(s);
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = String::new();
    walk(value, &mut out);
    out
}

impl EvalIndex {
    pub fn new(ngram: usize) -> Self {
        EvalIndex {
            ngram,
            ..Default::default()
        }
    }

    /// Adds the records of one evaluation file.
    pub fn add(&mut self, file: &Arc<str>, records: &[RawRecord]) {
        let n = self.ngram;
        let per_record: Vec<(usize, Vec<u64>)> = records
            .par_iter()
            .map_init(Scratch::default, |scratch, record| {
                full_word_ngrams(&record_text(&record.value), n, scratch);
                (record.line, scratch.shingles.clone())
            })
            .collect();
        for (line, grams) in per_record {
            for g in grams {
                self.grams.entry(g).or_insert_with(|| Source {
                    file: file.clone(),
                    line,
                });
            }
        }
        self.records += records.len();
    }

    /// Number of distinct n-grams indexed.
    pub fn len(&self) -> usize {
        self.grams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }

    /// The evaluation record that `text` shares an n-gram with, if any.
    pub fn find(&self, text: &str, scratch: &mut Scratch) -> Option<&Source> {
        if self.grams.is_empty() {
            return None;
        }
        full_word_ngrams(text, self.ngram, scratch);
        scratch.shingles.iter().find_map(|g| self.grams.get(g))
    }
}
