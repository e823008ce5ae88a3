//! `hone bench data`: throughput of the data stages, one JSON line each on stdout.
//!
//! The source records (GSM8K by default) are repeated to `--examples` records; with
//! `--perturb` (the default) repetition K >= 1 of a record gets " (copy K)" appended to its
//! first string field, so that exact dedupe keeps the copies, while MinHash (rightly) finds them
//! to be near-duplicates. Both lines say how many examples each step removed.
//!
//! * `curate`: [`hone_data::prepare`] with the default config (auto format, cleanup, filters,
//!   exact dedupe, MinHash near-dedupe, split) over a JSONL file of the repeated records;
//!   examples/s over the input records. Reading and parsing the file is included, writing the
//!   output is not.
//! * `tokenize`: the repeated records converted to conversations, then
//!   [`hone_tokenize::tokenize_examples`]: chat template (with assistant spans for the loss
//!   mask), tokenization on every core (rayon), truncation and best-fit packing; tokens/s
//!   over the real (non-padding) tokens produced.
//!
//! `peak_rss_mb` is the process's peak resident memory during each measurement (the peak is
//! reset before each where Linux allows it, else it is the peak so far).

use std::io::{BufWriter, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hone_data::format::detect;
use hone_data::reader::read_records;
use hone_data::{prepare, DataConfig, FieldMap, RemovalReason};
use hone_model::Tokenizer;
use hone_tokenize::{tokenize_examples, ChatTemplate, Example, TokenizeConfig, TokenizerSpec};
use serde_json::{json, Value};

use crate::args::BenchDataArgs;
use crate::cmd::peak_rss_mb;

pub fn run(args: BenchDataArgs) -> Result<()> {
    if args.examples == 0 {
        bail!("--examples must be positive");
    }
    let source = read_records(&args.input)?;
    if !source.errors.is_empty() {
        bail!(
            "{} bad record(s) in the benchmark input, first: {}",
            source.errors.len(),
            source.errors[0]
        );
    }
    let records: Vec<Value> = source.records.into_iter().map(|r| r.value).collect();
    if records.is_empty() {
        bail!("{}: no records", args.input.display());
    }
    let threads = rayon::current_num_threads();

    let curate = bench_curate(&args, &records, threads)?;
    println!("{curate}");
    let tokenize = bench_tokenize(&args, &records, threads)?;
    println!("{tokenize}");
    Ok(())
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

/// Resets the peak resident memory (VmHWM) to the current one (Linux: `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn bench_curate(args: &BenchDataArgs, records: &[Value], threads: usize) -> Result<Value> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("bench_input.jsonl");
    {
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::new(file);
        for i in 0..args.examples {
            serde_json::to_writer(&mut w, &repeated(records, i, args.perturb))?;
            w.write_all(b"\n")?;
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
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
        "input": args.input.display().to_string(),
        "source_records": records.len(),
        "examples": args.examples,
        "perturb": args.perturb,
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
        "examples_per_sec": args.examples as f64 / seconds,
        "peak_rss_mb": peak,
        "threads": threads,
    }))
}

fn bench_tokenize(args: &BenchDataArgs, records: &[Value], threads: usize) -> Result<Value> {
    let tokenizer = Tokenizer::from_dir(&args.model)
        .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
    let template = ChatTemplate::load(&args.template, &args.model).with_context(|| {
        format!(
            "chat template `{}` of {}",
            args.template,
            args.model.display()
        )
    })?;
    let layout = detect(records, &FieldMap::default())
        .map_err(|message| anyhow::anyhow!("{}: {message}", args.input.display()))?
        .layout;
    let examples: Vec<Example> = (0..args.examples)
        .map(|i| {
            layout
                .convert(&repeated(records, i, args.perturb))
                .map_err(|e| anyhow::anyhow!("record {}: {}", i % records.len(), e.message))
        })
        .collect::<Result<_>>()?;
    let config = TokenizeConfig {
        template: args.template.clone(),
        max_seq_len: args.max_seq_len,
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
        "input": args.input.display().to_string(),
        "examples": args.examples,
        "perturb": args.perturb,
        "model": args.model.display().to_string(),
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
        "examples_per_sec": args.examples as f64 / seconds,
        "peak_rss_mb": peak,
        "threads": threads,
    }))
}
