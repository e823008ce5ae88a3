//! `hone data prepare`, `hone data inspect` and `hone data raft`: the data stage from the command
//! line.
//!
//! `prepare` resolves a [`DataConfig`] (the config file's `[data]` table, then flags), runs
//! [`hone_data::prepare_with`] (with a token counter over the model's tokenizer when
//! `--tokenizer` is given) and writes the curated files atomically. `inspect` reads them back:
//! the removed examples listed in `report.json`, or one example token by token with its loss
//! mask, tokenized by the same [`Encoder`] training uses. `raft` makes retrieval-aware training
//! examples with [`hone_rag::build_raft`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use hone_data::{
    check_output_dir, summary_table, write_prepared_with, DataConfig, DataError, FormatChoice,
    OnError, Overwrite, RecordError, RemovalReason, Report, TokenCounter, REPORT_FILE, TRAIN_FILE,
    VAL_FILE,
};
use hone_model::Tokenizer;
use hone_tokenize::{
    format_masked_text, format_tokens, ChatTemplate, Encoder, Example, TokenizeConfig,
    TokenizerSpec,
};
use serde::Deserialize;

use crate::args::{
    DataCommand, DataInspectArgs, DataPrepareArgs, DataRaftArgs, DedupeArg, FormatArg, OnErrorArg,
    SplitArg, WithoutGoldArg,
};

/// Bad records listed in an error message before "and N more".
const ERRORS_SHOWN: usize = 20;

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Prepare(args) => prepare(args),
        DataCommand::Inspect(args) => inspect(args),
        DataCommand::Raft(args) => raft(args),
    }
}

/// Files `hone data raft` writes.
const RAFT_FILES: [&str; 3] = [TRAIN_FILE, "heldout.jsonl", REPORT_FILE];

fn raft(args: DataRaftArgs) -> Result<()> {
    let options = hone_rag::RaftOptions {
        k: args.k,
        gold_share: args.gold_share,
        without_gold: match args.without_gold {
            WithoutGoldArg::Answer => hone_rag::WithoutGold::Answer,
            WithoutGoldArg::Abstain => hone_rag::WithoutGold::Abstain,
        },
        heldout_fraction: args.heldout_fraction,
        closed_book: args.closed_book,
        unanswerable_share: args.unanswerable_share,
        seed: args.seed,
    };
    // Before any work: an --out that holds an input is refused, and one holding other files
    // than a previous output of this command unless --force.
    let mut inputs = hone_data::reader::expand_inputs(&args.corpus)?;
    inputs.push(args.questions.clone());
    check_output_dir(&args.out, &inputs, Overwrite::Any)?;
    if !args.force && !is_previous_raft_output(&args.out) {
        bail!(
            "--out {}: exists and holds other files than a previous `hone data raft` output \
             (pass --force to replace it)",
            args.out.display()
        );
    }
    let questions = hone_rag::read_questions(&args.questions)?;
    let corpus = hone_rag::read_corpus(&args.corpus, OnError::Fail)?.documents;
    let scratch = tempfile::tempdir().context("creating a directory for the BM25 index")?;
    let index_dir = match &args.index {
        Some(dir) => dir.clone(),
        None => {
            let dir = scratch.path().join("index");
            hone_rag::build_index(&hone_rag::BuildOptions {
                inputs: args.corpus.clone(),
                out: dir.clone(),
                chunking: hone_rag::ChunkConfig::default(),
                tokenizer: None,
                embedder: None,
                vectors: Default::default(),
                on_error: OnError::Fail,
                force: false,
            })?;
            dir
        }
    };
    let index = hone_rag::RagIndex::open(&index_dir)?;
    let raft = hone_rag::build_raft(&questions, &corpus, &index, &options)?;

    let staged = hone_io::StagedDir::new(&args.out)?;
    let write = |name: &str, text: String| {
        let path = staged.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    let mut train = String::new();
    for example in &raft.train {
        train.push_str(&serde_json::to_string(example)?);
        train.push('\n');
    }
    write(TRAIN_FILE, train)?;
    let mut heldout = String::new();
    for q in &raft.heldout {
        heldout.push_str(&serde_json::to_string(q)?);
        heldout.push('\n');
    }
    write(RAFT_FILES[1], heldout)?;
    let report = serde_json::json!({
        "raft": raft.report,
        "options": options,
        "corpus": args.corpus,
        "questions": args.questions,
        "index": args.index,
    });
    write(REPORT_FILE, serde_json::to_string_pretty(&report)? + "\n")?;
    staged.commit()?;
    let r = &raft.report;
    println!(
        "{} questions: {} training examples ({} with gold passages, {} without, {} unanswerable{}), \
         {} held out; distractors {} from the index, {} random; wrote {}",
        r.questions,
        raft.train.len(),
        r.with_gold,
        r.without_gold,
        r.unanswerable,
        if r.unanswerable_dropped > 0 {
            format!("; {} unanswerable left out by --unanswerable-share", r.unanswerable_dropped)
        } else {
            String::new()
        },
        r.heldout_questions,
        r.hard_distractors,
        r.random_distractors,
        args.out.display()
    );
    if r.missing_gold > 0 {
        eprintln!(
            "warning: {} gold passage ids are not in the corpus (those questions were shown \
             without them)",
            r.missing_gold
        );
    }
    Ok(())
}

/// Whether `dir` is absent, empty, or holds only what `hone data raft` writes (its report
/// says `raft`).
fn is_previous_raft_output(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.is_empty()
        || (names.iter().all(|n| RAFT_FILES.contains(&n.as_str()))
            && std::fs::read_to_string(dir.join(REPORT_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v.get("raft").is_some()))
}

/// A config file as far as this command is concerned: its `[data]` table. Other top-level
/// tables (`[model]`, `[train]`, ...) belong to other commands and are not looked at here.
#[derive(Deserialize)]
struct ConfigFile {
    data: Option<DataConfig>,
    #[serde(flatten)]
    other: BTreeMap<String, toml::Value>,
}

/// Reads the `[data]` table of a TOML file; unknown keys in it are errors naming the key.
pub fn read_data_config(path: &Path) -> Result<DataConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let file: ConfigFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), e.to_string().trim_end()))?;
    match file.data {
        Some(data) => Ok(data),
        None if file.other.is_empty() => bail!("config {}: has no [data] table", path.display()),
        None => bail!(
            "config {}: has no [data] table (it has {})",
            path.display(),
            file.other
                .keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl FormatArg {
    fn choice(self) -> FormatChoice {
        match self {
            FormatArg::Auto => FormatChoice::Auto,
            FormatArg::Alpaca => FormatChoice::Alpaca,
            FormatArg::Sharegpt => FormatChoice::Sharegpt,
            FormatArg::Messages => FormatChoice::Messages,
            FormatArg::Completion => FormatChoice::Completion,
            FormatArg::Text => FormatChoice::Text,
        }
    }
}

impl OnErrorArg {
    fn policy(self) -> OnError {
        match self {
            OnErrorArg::Skip => OnError::Skip,
            OnErrorArg::Fail => OnError::Fail,
        }
    }
}

/// The config file (or defaults) with the flags applied over it, validated.
fn resolve_config(args: &DataPrepareArgs) -> Result<DataConfig> {
    let mut config = match &args.config {
        Some(path) => read_data_config(path)?,
        None => DataConfig::default(),
    };
    if !args.inputs.is_empty() {
        config.inputs = args.inputs.clone();
    }
    if let Some(format) = args.format {
        config.format = format.choice();
    }
    if let Some(on_error) = args.on_error {
        config.on_error = on_error.policy();
    }
    if let Some(fraction) = args.val_fraction {
        config.split.val_fraction = fraction;
    }
    if let Some(dedupe) = args.dedupe {
        config.dedupe.exact = dedupe != DedupeArg::None;
        config.dedupe.near.enabled = dedupe == DedupeArg::Minhash;
    }
    if !args.eval_files.is_empty() {
        config.decontaminate.eval_files = args.eval_files.clone();
    }
    if config.inputs.is_empty() {
        bail!("no input: give --input FILE or `inputs` in the config's [data] table");
    }
    config.validate()?;
    Ok(config)
}

/// "file:line: message" per bad record, at most [`ERRORS_SHOWN`] of them.
fn list_errors(errors: &[RecordError]) -> String {
    let mut lines: Vec<String> = errors
        .iter()
        .take(ERRORS_SHOWN)
        .map(ToString::to_string)
        .collect();
    if errors.len() > ERRORS_SHOWN {
        lines.push(format!("... and {} more", errors.len() - ERRORS_SHOWN));
    }
    lines.join("\n")
}

fn prepare(args: DataPrepareArgs) -> Result<()> {
    let config = resolve_config(&args).map_err(|e| crate::UsageError(e.into()))?;
    let overwrite = if args.force {
        Overwrite::Any
    } else {
        Overwrite::Prepared
    };
    // Before any work: an --out that holds an input, or foreign files, is refused.
    let mut inputs = hone_data::reader::expand_inputs(&config.inputs)?;
    if !config.decontaminate.eval_files.is_empty() {
        inputs.extend(hone_data::reader::expand_inputs(
            &config.decontaminate.eval_files,
        )?);
    }
    check_output_dir(&args.out, &inputs, overwrite)?;
    let tokenizer = match &args.tokenizer {
        Some(dir) => Some(
            Tokenizer::from_dir(dir)
                .with_context(|| format!("loading the tokenizer of {}", dir.display()))?,
        ),
        None => None,
    };

    // The counter cannot return an error; the first failure is kept and reported after.
    let encode_failure: Mutex<Option<String>> = Mutex::new(None);
    let count = |tokenizer: &Tokenizer, text: &str| match tokenizer.inner().encode(text, false) {
        Ok(encoding) => encoding.len(),
        Err(e) => {
            let mut failure = encode_failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| e.to_string());
            0
        }
    };
    let counter = tokenizer.as_ref().map(|t| move |text: &str| count(t, text));
    let counter: Option<&TokenCounter<'_>> = counter.as_ref().map(|c| c as &TokenCounter<'_>);

    let prepared = match hone_data::prepare_with(&config, counter) {
        Ok(prepared) => prepared,
        // The typed error stays in the chain (exit code 4, data rejected); the message lists
        // every bad record.
        Err(DataError::InvalidRecords { errors }) => {
            let message = format!(
                "{} bad record{} (nothing was written; --on-error skip skips them and lists \
                 them in {REPORT_FILE}):\n{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                list_errors(&errors)
            );
            return Err(anyhow::Error::new(DataError::InvalidRecords { errors }).context(message));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(message) = encode_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        bail!("the tokenizer failed to encode a text (nothing was written): {message}");
    }
    write_prepared_with(&prepared, &args.out, overwrite)?;

    let report = &prepared.report;
    if !report.errors.is_empty() {
        eprintln!(
            "skipped {} bad record{}:\n{}",
            report.errors.len(),
            if report.errors.len() == 1 { "" } else { "s" },
            list_errors(&report.errors)
        );
    }
    print!("{}", summary_table(report));
    println!(
        "wrote     {}: {TRAIN_FILE}, {VAL_FILE}, {REPORT_FILE} ({:.2} s)",
        args.out.display(),
        report.seconds
    );
    Ok(())
}

fn read_report(dir: &Path) -> Result<Report> {
    let path = dir.join(REPORT_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a directory written by `hone data prepare`?)",
            path.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a data report", path.display()))
}

fn inspect(args: DataInspectArgs) -> Result<()> {
    if args.tokens {
        return inspect_tokens(&args);
    }
    let report = read_report(&args.dir)?;
    print!("{}", removed_listing(&report, args.reason));
    Ok(())
}

/// Indents every line of `text` by `indent`.
fn indented(text: &str, indent: &str) -> String {
    text.lines()
        .map(|l| format!("{indent}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The removed examples of `report` per reason (only `only`, if given), then skipped records.
fn removed_listing(report: &Report, only: Option<RemovalReason>) -> String {
    let mut out = String::new();
    let reasons: Vec<RemovalReason> = match only {
        Some(reason) => vec![reason],
        None => RemovalReason::ALL.to_vec(),
    };
    for reason in reasons {
        let count = report.removed.get(&reason).copied().unwrap_or(0);
        if count == 0 && only.is_none() {
            continue;
        }
        let samples = report
            .removed_examples
            .get(&reason)
            .map(Vec::as_slice)
            .unwrap_or_default();
        out.push_str(&format!(
            "{}: {count} removed{}\n",
            reason.as_str(),
            if samples.len() < count {
                format!(", {} shown", samples.len())
            } else {
                String::new()
            }
        ));
        for sample in samples {
            out.push_str(&format!(
                "  {}:{}  {}\n{}\n",
                sample.file,
                sample.line,
                sample.detail,
                indented(&sample.text, "    | ")
            ));
        }
    }
    if only.is_none() {
        if out.is_empty() {
            out.push_str("no example was removed\n");
        }
        if !report.errors.is_empty() {
            out.push_str(&format!(
                "skipped bad records: {}\n{}\n",
                report.errors.len(),
                indented(&list_errors(&report.errors), "  ")
            ));
        }
    }
    out
}

/// Example `index` of the curated file, parsed as the tokenization stage reads it.
fn read_example(path: &Path, index: usize) -> Result<Example> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut seen = 0;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if seen == index {
            return serde_json::from_str(&line)
                .with_context(|| format!("{}:{}", path.display(), n + 1));
        }
        seen += 1;
    }
    bail!(
        "--index {index} is out of range: {} holds {seen} example{}",
        path.display(),
        if seen == 1 { "" } else { "s" }
    )
}

fn inspect_tokens(args: &DataInspectArgs) -> Result<()> {
    let Some(model) = &args.model else {
        bail!("--tokens needs --model MODEL_DIR (its tokenizer and chat template)");
    };
    let file = match args.split {
        SplitArg::Train => TRAIN_FILE,
        SplitArg::Val => VAL_FILE,
    };
    let path = args.dir.join(file);
    let example = read_example(&path, args.index)?;
    let tokenizer = Tokenizer::from_dir(model)
        .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
    let template = ChatTemplate::load(&args.template, model)
        .with_context(|| format!("chat template `{}` of {}", args.template, model.display()))?;
    let config = TokenizeConfig {
        template: args.template.clone(),
        ..TokenizeConfig::default()
    };
    let spec = TokenizerSpec::from_special_tokens(tokenizer.inner(), template.special_tokens());
    let encoder = Encoder::new(spec, Some(&template), &config);
    let encoded = encoder
        .encode(&example)
        .with_context(|| format!("example {} of {}", args.index, path.display()))?;
    let row = encoded.to_row();
    println!(
        "example {} of {} ({}), template {}, tokenizer {}",
        args.index,
        path.display(),
        example.kind(),
        template.name(),
        model.join("tokenizer.json").display()
    );
    print!("{}", format_tokens(&row, tokenizer.inner()));
    println!("\ntext, with the tokens in the loss between [[ and ]]:");
    println!("{}", format_masked_text(&row, tokenizer.inner()));
    Ok(())
}
