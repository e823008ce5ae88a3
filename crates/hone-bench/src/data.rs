//! The data-stage benchmark behind `hone bench data`: throughput of curation and of
//! tokenization, one JSON object each.
//!
//! The source records (GSM8K by default) are repeated to `examples` records; with `perturb`
//! repetition K >= 1 of a record gets " (copy K)" appended to its first string field, so that
//! exact dedupe keeps the copies, while MinHash (rightly) finds them to be near-duplicates.
//! Both objects say how many examples each step removed.
//!
//! * `curate`: [`hone_data::prepare`] with the default config (auto format, cleanup, filters,
//!   exact dedupe, MinHash near-dedupe, split) over a JSONL file of the repeated records;
//!   examples/s over the input records. Reading and parsing the file is included, writing the
//!   output is not.
//! * `tokenize`: the repeated records converted to examples, then
//!   [`hone_tokenize::tokenize_examples`]: chat template (with assistant spans for the loss
//!   mask), tokenization on every core (rayon), truncation and best-fit packing; tokens/s
//!   over the real (non-padding) tokens produced.
//!
//! `peak_rss_mb` is the process's peak resident memory during each measurement (the peak is
//! reset before each where Linux allows it, else it is the peak so far).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_data::format::detect;
use hone_data::reader::read_records;
use hone_data::{prepare, DataConfig, FieldMap, RemovalReason};
use hone_model::Tokenizer;
use hone_tokenize::{
    tokenize_examples, ChatTemplate, Example, TemplateSource, TokenizeConfig, TokenizerSpec,
};
use serde_json::{json, Value};

use crate::error::{BenchError, Result};
use crate::memory::{peak_rss_mb, reset_peak_rss};

/// Settings of [`bench_data`].
#[derive(Debug, Clone)]
pub struct DataBench {
    /// Source records (any format `hone data prepare` reads).
    pub input: PathBuf,
    /// Examples to curate and to tokenize: the input repeated as often as needed.
    pub examples: usize,
    /// Append " (copy K)" to the first string field of the K-th repetition (K >= 1).
    pub perturb: bool,
    /// Model directory whose tokenizer the tokenization measurement uses.
    pub model: PathBuf,
    /// Chat template for the tokenization measurement.
    pub template: TemplateSource,
    /// Tokens per packed row.
    pub max_seq_len: usize,
}

/// Runs both measurements, handing each JSON object to `emit` as soon as it is made (the
/// curation line is out before tokenization starts).
pub fn bench_data(bench: &DataBench, mut emit: impl FnMut(Value)) -> Result<()> {
    if bench.examples == 0 {
        return Err(BenchError::Config {
            key: "examples",
            message: "--examples must be positive".into(),
        });
    }
    let source = read_records(&bench.input)?;
    if let Some(first) = source.errors.first() {
        return Err(input_error(
            &bench.input,
            format!(
                "{} bad record(s) in the benchmark input, first: {first}",
                source.errors.len()
            ),
        ));
    }
    let records: Vec<Value> = source.records.into_iter().map(|r| r.value).collect();
    if records.is_empty() {
        return Err(input_error(&bench.input, "no records".into()));
    }
    let threads = rayon::current_num_threads();
    emit(bench_curate(bench, &records, threads)?);
    emit(bench_tokenize(bench, &records, threads)?);
    Ok(())
}

fn input_error(path: &Path, message: String) -> BenchError {
    BenchError::Input {
        path: path.to_path_buf(),
        message,
    }
}

/// Record `i` of the repeated input: record `i % n`, perturbed by its copy number `i / n`.
fn repeated(records: &[Value], i: usize, perturb: bool) -> Value {
    let copy = i / records.len();
    let mut value = records[i % records.len()].clone();
    if perturb && copy > 0 {
        if let Value::Object(map) = &mut value {
            if let Some(Value::String(text)) = map.values_mut().find(|v| v.is_string()) {
                text.push_str(&format!(" (copy {copy})"));
            }
        }
    }
    value
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { context, source }
}

/// Writes the `examples` repeated records to `path` as JSONL.
fn write_repeated(path: &Path, records: &[Value], bench: &DataBench) -> std::io::Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    for i in 0..bench.examples {
        serde_json::to_writer(&mut w, &repeated(records, i, bench.perturb))?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

fn bench_curate(bench: &DataBench, records: &[Value], threads: usize) -> Result<Value> {
    let dir = tempfile::tempdir().map_err(io_error("creating a temporary directory".into()))?;
    let path = dir.path().join("bench_input.jsonl");
    write_repeated(&path, records, bench)
        .map_err(io_error(format!("cannot write {}", path.display())))?;
    let config = DataConfig::new([path.display().to_string()]);
    reset_peak_rss();
    let started = Instant::now();
    let prepared = prepare(&config)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = peak_rss_mb();
    let report = &prepared.report;
    let removed = |r: RemovalReason| report.removed.get(&r).copied().unwrap_or(0);
    let near = &config.dedupe.near;
    Ok(json!({
        "bench": "data",
        "stage": "curate",
        "input": bench.input.display().to_string(),
        "source_records": records.len(),
        "examples": bench.examples,
        "perturb": bench.perturb,
        "format": report.detected_format,
        "dedupe": {
            "exact": config.dedupe.exact,
            "minhash": near.enabled,
            "unit": near.unit,
            "ngram": near.ngram,
            "num_perm": near.num_perm,
            "bands": near.bands,
            "threshold": near.threshold,
        },
        "val_fraction": config.split.val_fraction,
        "removed_exact_duplicate": removed(RemovalReason::ExactDuplicate),
        "removed_near_duplicate": removed(RemovalReason::NearDuplicate),
        "removed_total": report.total_removed(),
        "kept_train": report.kept.train,
        "kept_val": report.kept.val,
        "seconds": seconds,
        "examples_per_sec": bench.examples as f64 / seconds,
        "peak_rss_mb": peak,
        "threads": threads,
    }))
}

fn bench_tokenize(bench: &DataBench, records: &[Value], threads: usize) -> Result<Value> {
    let tokenizer = Tokenizer::from_dir(&bench.model).map_err(|source| BenchError::Load {
        what: "the tokenizer of",
        path: bench.model.clone(),
        source: Box::new(source),
    })?;
    let template = ChatTemplate::load(&bench.template, &bench.model).map_err(|source| {
        BenchError::Template {
            template: bench.template.to_string(),
            model: bench.model.clone(),
            source: Box::new(source),
        }
    })?;
    let layout = detect(records, &FieldMap::default())
        .map_err(|message| input_error(&bench.input, message))?
        .layout;
    let examples: Vec<Example> = (0..bench.examples)
        .map(|i| {
            layout
                .convert(&repeated(records, i, bench.perturb))
                .map_err(|e| {
                    input_error(
                        &bench.input,
                        format!("record {}: {}", i % records.len(), e.message),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let config = TokenizeConfig {
        template: bench.template.clone(),
        max_seq_len: bench.max_seq_len,
        ..TokenizeConfig::default()
    };
    let spec = TokenizerSpec::from_special_tokens(tokenizer.inner(), template.special_tokens());
    reset_peak_rss();
    let started = Instant::now();
    let data = tokenize_examples(&examples, spec, Some(&template), &config)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = peak_rss_mb();
    let report = &data.report;
    Ok(json!({
        "bench": "data",
        "stage": "tokenize",
        "input": bench.input.display().to_string(),
        "examples": bench.examples,
        "perturb": bench.perturb,
        "model": bench.model.display().to_string(),
        "template": template.name(),
        "max_seq_len": config.max_seq_len,
        "packing": config.packing,
        "kept": report.kept,
        "truncated": report.truncated,
        "dropped_no_labels": report.dropped_no_labels,
        "rows": report.rows,
        "tokens": report.tokens,
        "label_tokens": report.label_tokens,
        "packing_efficiency": report.packing_efficiency,
        "warnings": report.warnings.len(),
        "seconds": seconds,
        "tokens_per_sec": report.tokens as f64 / seconds,
        "examples_per_sec": bench.examples as f64 / seconds,
        "peak_rss_mb": peak,
        "threads": threads,
    }))
}
