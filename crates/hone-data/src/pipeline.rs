//! The data stage end to end: read -> convert -> clean -> filter -> exact dedupe -> token
//! filter -> decontaminate -> near dedupe -> split, with a [`Report`].
//!
//! Cheap steps run first so that expensive ones (token counting, MinHash) see fewer examples.
//! Every step keeps the first occurrence in input order and records why each removed example
//! went, so the result is deterministic for a given config and input.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::clean::clean_example;
use crate::config::{DataConfig, OnError};
use crate::decontam::EvalIndex;
use crate::dedupe::{content_hash, find_exact_duplicates};
use crate::error::{DataError, RecordError};
use crate::example::{Example, Source, SourcedExample};
use crate::format::{detect, Format, Layout};
use crate::minhash::{find_near_duplicates, MinHasher};
use crate::reader::{expand_inputs, read_records, read_records_limited, FileRecords};
use crate::report::{
    Cleaned, DecontamReport, FileReport, Kept, LengthStats, RemovalReason, RemovedExample, Report,
    PREVIEW_CHARS, SAMPLES_PER_REASON,
};
use crate::shingle::Scratch;
use crate::split::assign_validation;

/// Counts the tokens of a text (e.g. a tokenizer's `encode(text).len()`); given by the caller
/// so that this crate needs no tokenizer.
pub type TokenCounter<'a> = dyn Fn(&str) -> usize + Sync + 'a;

/// The curated data set: training and validation examples in input order, and the report.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub train: Vec<SourcedExample>,
    pub val: Vec<SourcedExample>,
    pub report: Report,
}

impl Prepared {
    /// The training and validation examples without their sources: what tokenization reads.
    pub fn examples(&self) -> (Vec<Example>, Vec<Example>) {
        let strip = |v: &[SourcedExample]| v.iter().map(|e| e.example.clone()).collect();
        (strip(&self.train), strip(&self.val))
    }
}

/// Runs the data stage without token counting.
pub fn prepare(config: &DataConfig) -> Result<Prepared, DataError> {
    prepare_with(config, None)
}

/// Runs the data stage; `counter` enables the token filters and token-length statistics.
pub fn prepare_with(
    config: &DataConfig,
    counter: Option<&TokenCounter<'_>>,
) -> Result<Prepared, DataError> {
    let started = Instant::now();
    config.validate()?;
    if config.filter.needs_tokens() && counter.is_none() {
        let key = if config.filter.min_tokens.is_some() {
            "filter.min_tokens"
        } else {
            "filter.max_tokens"
        };
        return Err(DataError::config(
            key,
            "token bounds need a token counter (a tokenizer)",
        ));
    }

    // Read and convert every input, and the evaluation files.
    let mut examples: Vec<SourcedExample> = Vec::new();
    let mut errors: Vec<RecordError> = Vec::new();
    let mut files = Vec::new();
    let mut formats: Vec<Format> = Vec::new();
    for path in expand_inputs(&config.inputs)? {
        let loaded = load_file(&path, config)?;
        examples.extend(loaded.examples);
        errors.extend(loaded.errors);
        if let Some(f) = loaded.format {
            if !formats.contains(&f) {
                formats.push(f);
            }
        }
        files.push(loaded.report);
    }
    let eval = match config.decontaminate.eval_files.is_empty() {
        true => None,
        false => Some(load_eval(config, &mut errors)?),
    };
    if config.on_error == OnError::Fail && !errors.is_empty() {
        return Err(DataError::InvalidRecords { errors });
    }
    let input_records = files.iter().map(|f| f.records).sum();

    // Clean.
    let outcomes: Vec<_> = examples
        .par_iter_mut()
        .map(|ex| clean_example(&mut ex.example, &config.clean))
        .collect();
    let cleaned = Cleaned {
        nfc: outcomes.iter().filter(|o| o.nfc_changed).count(),
        whitespace: outcomes.iter().filter(|o| o.whitespace_changed).count(),
    };

    let n = examples.len();
    let mut removed: Vec<Option<(RemovalReason, String)>> = vec![None; n];

    // Structure and character bounds.
    let chars: Vec<usize> = examples.par_iter().map(|e| e.example.char_len()).collect();
    let verdicts: Vec<_> = examples
        .par_iter()
        .zip(chars.par_iter())
        .map(|(ex, &c)| config.filter.check_chars(&ex.example, c))
        .collect();
    apply(&mut removed, (0..n).zip(verdicts));

    // Exact duplicates.
    let hashes: Vec<u128> = examples
        .par_iter()
        .map(|e| content_hash(&e.example))
        .collect();
    if config.dedupe.exact {
        let alive = alive(&removed);
        let alive_hashes: Vec<u128> = alive.iter().map(|&i| hashes[i]).collect();
        let dups = find_exact_duplicates(&alive_hashes);
        let verdicts = alive.iter().zip(dups).map(|(&i, d)| {
            let v = d.map(|j| {
                let of = &examples[alive[j]].source;
                (RemovalReason::ExactDuplicate, format!("same text as {of}"))
            });
            (i, v)
        });
        let verdicts: Vec<_> = verdicts.collect();
        apply(&mut removed, verdicts);
    }

    // Tokens.
    let mut tokens: Vec<Option<usize>> = vec![None; n];
    if let Some(count) = counter {
        let alive = alive(&removed);
        let counted: Vec<usize> = alive
            .par_iter()
            .map(|&i| examples[i].example.parts().map(|(_, c)| count(c)).sum())
            .collect();
        let verdicts: Vec<_> = alive
            .iter()
            .zip(counted)
            .map(|(&i, t)| {
                tokens[i] = Some(t);
                (i, config.filter.check_tokens(t))
            })
            .collect();
        apply(&mut removed, verdicts);
    }

    // Decontamination.
    if let Some(index) = &eval {
        let alive = alive(&removed);
        let ngram = config.decontaminate.ngram;
        let verdicts: Vec<_> = alive
            .par_iter()
            .map_init(Scratch::default, |scratch, &i| {
                let hit = index
                    .find(&examples[i].example.joined(), scratch)
                    .map(|src| {
                        (
                            RemovalReason::Contaminated,
                            format!("shares a {ngram}-word span with eval record {src}"),
                        )
                    });
                (i, hit)
            })
            .collect();
        apply(&mut removed, verdicts);
    }

    // Near duplicates (before the split, so none can straddle train and validation).
    let near = &config.dedupe.near;
    if near.enabled {
        let t = Instant::now();
        let alive = alive(&removed);
        let texts: Vec<Cow<'_, str>> = alive
            .par_iter()
            .map(|&i| examples[i].example.joined())
            .collect();
        let sigs = MinHasher::new(near).signatures(&texts);
        drop(texts);
        let t_sig = t.elapsed().as_secs_f64();
        let matches = find_near_duplicates(&sigs, near.bands, near.threshold);
        tracing::debug!(
            signatures_s = t_sig,
            lsh_s = t.elapsed().as_secs_f64() - t_sig,
            "minhash phases"
        );
        let verdicts: Vec<_> = alive
            .iter()
            .zip(matches)
            .map(|(&i, m)| {
                let v = m.map(|m| {
                    let of = &examples[alive[m.of]].source;
                    (
                        RemovalReason::NearDuplicate,
                        format!(
                            "near-duplicate of {of} (estimated Jaccard {:.2})",
                            m.similarity
                        ),
                    )
                });
                (i, v)
            })
            .collect();
        apply(&mut removed, verdicts);
        tracing::info!(
            examples = alive.len(),
            seconds = t.elapsed().as_secs_f64(),
            "minhash near-dedupe"
        );
    }

    // Split.
    let alive = alive(&removed);
    let keys: Vec<u64> = alive
        .iter()
        .map(|&i| (hashes[i] as u64) ^ ((hashes[i] >> 64) as u64))
        .collect();
    let is_val_alive = assign_validation(&keys, &config.split);
    let mut is_val = vec![false; n];
    for (&i, v) in alive.iter().zip(is_val_alive) {
        is_val[i] = v;
    }

    // Report.
    let char_length =
        LengthStats::from_values(&alive.iter().map(|&i| chars[i]).collect::<Vec<_>>());
    let token_length = counter.and_then(|_| {
        LengthStats::from_values(&alive.iter().filter_map(|&i| tokens[i]).collect::<Vec<_>>())
    });
    let mut removed_counts: BTreeMap<RemovalReason, usize> =
        RemovalReason::ALL.iter().map(|&r| (r, 0)).collect();
    let mut removed_examples: BTreeMap<RemovalReason, Vec<RemovedExample>> = BTreeMap::new();
    for (ex, r) in examples.iter().zip(&removed) {
        if let Some((reason, detail)) = r {
            *removed_counts.entry(*reason).or_default() += 1;
            let samples = removed_examples.entry(*reason).or_default();
            if samples.len() < SAMPLES_PER_REASON {
                samples.push(RemovedExample {
                    file: ex.source.file.to_string(),
                    line: ex.source.line,
                    detail: detail.clone(),
                    text: preview(&ex.example.joined()),
                });
            }
        }
    }
    let detected_format = match formats.as_slice() {
        [] => "none".to_string(),
        [one] => one.to_string(),
        _ => "mixed".to_string(),
    };
    let decontamination = eval.as_ref().map(|index| DecontamReport {
        eval_files: config.decontaminate.eval_files.clone(),
        eval_records: index.records,
        ngram: config.decontaminate.ngram,
        distinct_ngrams: index.len(),
    });

    let mut train = Vec::new();
    let mut val = Vec::new();
    for ((ex, r), v) in examples.into_iter().zip(&removed).zip(is_val) {
        match (r, v) {
            (Some(_), _) => {}
            (None, true) => val.push(ex),
            (None, false) => train.push(ex),
        }
    }
    let report = Report {
        input_records,
        detected_format,
        files,
        kept: Kept {
            train: train.len(),
            val: val.len(),
        },
        removed: removed_counts,
        cleaned,
        errors,
        char_length,
        token_length,
        removed_examples,
        decontamination,
        seconds: started.elapsed().as_secs_f64(),
        config: config.clone(),
    };
    tracing::info!(
        input = report.input_records,
        train = report.kept.train,
        val = report.kept.val,
        removed = report.total_removed(),
        errors = report.errors.len(),
        seconds = report.seconds,
        "data prepared"
    );
    Ok(Prepared { train, val, report })
}

/// Indices of examples not removed yet.
fn alive(removed: &[Option<(RemovalReason, String)>]) -> Vec<usize> {
    removed
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.is_none().then_some(i))
        .collect()
}

fn apply(
    removed: &mut [Option<(RemovalReason, String)>],
    verdicts: impl IntoIterator<Item = (usize, Option<(RemovalReason, String)>)>,
) {
    for (i, v) in verdicts {
        if let Some(v) = v {
            removed[i] = Some(v);
        }
    }
}

fn preview(text: &str) -> String {
    match text.char_indices().nth(PREVIEW_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

struct LoadedFile {
    report: FileReport,
    format: Option<Format>,
    examples: Vec<SourcedExample>,
    errors: Vec<RecordError>,
}

fn load_file(path: &Path, config: &DataConfig) -> Result<LoadedFile, DataError> {
    let FileRecords {
        path: file,
        records,
        mut errors,
    } = read_records_limited(path, config.max_record_bytes)?;
    let total = records.len() + errors.len();
    let (layout, detection) = match config.format.format() {
        Some(format) => (
            Some(Layout::resolve(format, &config.fields)),
            "explicit".to_string(),
        ),
        None if records.is_empty() => (None, "auto: no readable record".to_string()),
        None => match detect(records.iter().map(|r| &r.value), &config.fields) {
            Ok(d) => (Some(d.layout), d.reason),
            Err(message) => {
                return Err(DataError::Detect {
                    file: file.to_string(),
                    message,
                })
            }
        },
    };
    let mut examples = Vec::with_capacity(records.len());
    if let Some(layout) = &layout {
        let converted: Vec<Result<SourcedExample, RecordError>> = records
            .into_par_iter()
            .map(|r| convert(layout, &file, r.line, &r.value))
            .collect();
        for c in converted {
            match c {
                Ok(ex) => examples.push(ex),
                Err(e) => errors.push(e),
            }
        }
    }
    errors.sort_by_key(|e| e.line);
    if let Some(layout) = &layout {
        tracing::info!(file = %file, format = %layout, detection = %detection, records = total, errors = errors.len(), "read input");
    }
    Ok(LoadedFile {
        report: FileReport {
            path: file.to_string(),
            format: layout.as_ref().map(ToString::to_string),
            detection,
            records: total,
            errors: errors.len(),
        },
        format: layout.as_ref().map(Layout::format),
        examples,
        errors,
    })
}

fn convert(
    layout: &Layout,
    file: &Arc<str>,
    line: usize,
    value: &serde_json::Value,
) -> Result<SourcedExample, RecordError> {
    match layout.convert(value) {
        Ok(example) => Ok(SourcedExample {
            example,
            source: Source {
                file: file.clone(),
                line,
            },
        }),
        Err(e) => Err(RecordError {
            file: file.to_string(),
            line,
            key: e.key,
            message: e.message,
        }),
    }
}

fn load_eval(config: &DataConfig, errors: &mut Vec<RecordError>) -> Result<EvalIndex, DataError> {
    let mut index = EvalIndex::new(config.decontaminate.ngram);
    for path in expand_inputs(&config.decontaminate.eval_files)? {
        let fr = read_records_limited(&path, config.max_record_bytes)?;
        index.add(&fr.path, &fr.records);
        errors.extend(fr.errors);
    }
    tracing::info!(
        records = index.records,
        ngrams = index.len(),
        "indexed evaluation n-grams"
    );
    Ok(index)
}

/// Reads a curated JSONL file (`train.jsonl`, `val.jsonl`) back into examples: each line is an
/// [`Example`] in its JSON form (`{"messages"}`, `{"text"}` or `{"prompt", "completion"}`;
/// the old `text`-role form of raw text reads as text, see [`crate::example`]).
pub fn read_curated(path: &Path) -> Result<Vec<SourcedExample>, DataError> {
    let fr = read_records(path)?;
    if !fr.errors.is_empty() {
        return Err(DataError::InvalidRecords { errors: fr.errors });
    }
    let mut out = Vec::with_capacity(fr.records.len());
    let mut errors = Vec::new();
    for r in fr.records {
        match serde_json::from_value::<Example>(r.value) {
            Ok(example) => out.push(SourcedExample {
                example,
                source: Source {
                    file: fr.path.clone(),
                    line: r.line,
                },
            }),
            Err(e) => errors.push(RecordError {
                file: fr.path.to_string(),
                line: r.line,
                key: None,
                message: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(DataError::InvalidRecords { errors })
    }
}
