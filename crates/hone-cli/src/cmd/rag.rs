//! `hone rag index|add|remove|query`: build a retrieval index from documents, change it in
//! place, and search it (hone-rag; BM25 for now).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hone_rag::{build_index, BuildOptions, ChunkConfig, IndexUpdate, RagIndex, Retriever};

use crate::args::OnErrorArg;

#[derive(Subcommand, Debug)]
pub enum RagCommand {
    /// Build an index from documents: JSONL records ({id, title, text}), Markdown and text
    /// files, directories and globs. Written completely or not at all.
    Index(RagIndexArgs),
    /// Add documents to an index in place; a document whose id is indexed is replaced.
    Add(RagAddArgs),
    /// Remove documents (all their chunks) from an index in place.
    Remove(RagRemoveArgs),
    /// Search an index: ranked chunks with ids and scores.
    Query(RagQueryArgs),
}

#[derive(Args, Debug)]
pub struct RagIndexArgs {
    /// Documents: files (.jsonl/.ndjson/.json, .md/.markdown, .txt), directories, glob patterns.
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    pub docs: Vec<String>,
    /// The index directory (created; an existing index there is replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A Hugging Face tokenizer.json whose tokens chunk sizes count (copied into the index);
    /// without it, words and punctuation marks are counted (an approximation).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Most tokens in one chunk.
    #[arg(long, default_value_t = ChunkConfig::default().max_tokens)]
    pub max_tokens: usize,
    /// Tokens a chunk repeats from the end of the previous one (below max-tokens / 2).
    #[arg(long, default_value_t = ChunkConfig::default().overlap_tokens)]
    pub overlap: usize,
    /// What to do with a malformed document (default fail).
    #[arg(long, value_enum, default_value = "fail")]
    pub on_error: OnErrorArg,
    /// Replace DIR even if it is a non-empty directory that holds no index.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct RagAddArgs {
    /// The index directory.
    pub dir: PathBuf,
    /// Documents to add (as for `hone rag index`).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    pub docs: Vec<String>,
    /// What to do with a malformed document (default fail).
    #[arg(long, value_enum, default_value = "fail")]
    pub on_error: OnErrorArg,
}

#[derive(Args, Debug)]
pub struct RagRemoveArgs {
    /// The index directory.
    pub dir: PathBuf,
    /// Document id to remove with all its chunks; repeatable. An unknown id changes nothing.
    #[arg(long = "id", value_name = "ID", required = true)]
    pub ids: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RagQueryArgs {
    /// The index directory.
    pub dir: PathBuf,
    /// The question or keywords.
    pub query: String,
    /// Number of chunks to return.
    #[arg(short, long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub k: u32,
    /// One JSON object per line: id, doc_id, position, title, source, text, byte and char
    /// offsets, score, rank.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: RagCommand) -> Result<()> {
    match command {
        RagCommand::Index(args) => index(args),
        RagCommand::Add(args) => add(args),
        RagCommand::Remove(args) => remove(args),
        RagCommand::Query(args) => query(args),
    }
}

fn policy(arg: OnErrorArg) -> hone_data::OnError {
    match arg {
        OnErrorArg::Skip => hone_data::OnError::Skip,
        OnErrorArg::Fail => hone_data::OnError::Fail,
    }
}

fn print_skipped(skipped: &[hone_data::RecordError]) {
    for error in skipped {
        eprintln!("skipped: {error}");
    }
}

fn index(args: RagIndexArgs) -> Result<()> {
    let options = BuildOptions {
        inputs: args.docs,
        out: args.out.clone(),
        chunking: ChunkConfig {
            max_tokens: args.max_tokens,
            overlap_tokens: args.overlap,
        },
        tokenizer: args.tokenizer,
        on_error: policy(args.on_error),
        force: args.force,
    };
    let report = build_index(&options)?;
    print_skipped(&report.skipped);
    println!(
        "indexed {} documents as {} chunks ({} skipped) into {} in {:.2} s \
         (read + chunk {:.2} s, index {:.2} s)",
        report.documents,
        report.chunks,
        report.skipped.len(),
        args.out.display(),
        report.read_seconds + report.index_seconds,
        report.read_seconds,
        report.index_seconds
    );
    Ok(())
}

fn summary(index: &RagIndex) -> String {
    let m = index.manifest();
    format!(
        "{} now holds {} documents, {} chunks (generation {})",
        index.dir().display(),
        m.documents,
        m.chunks,
        m.generation
    )
}

fn add(args: RagAddArgs) -> Result<()> {
    let mut index = RagIndex::open(&args.dir)?;
    let (report, skipped) = index.add_inputs(&args.docs, policy(args.on_error))?;
    print_skipped(&skipped);
    println!(
        "added {} and replaced {} documents ({} chunks, {} skipped); {}",
        report.added,
        report.replaced,
        report.chunks,
        skipped.len(),
        summary(&index)
    );
    Ok(())
}

fn remove(args: RagRemoveArgs) -> Result<()> {
    let mut index = RagIndex::open(&args.dir)?;
    let report = index.remove(&args.ids)?;
    println!(
        "removed {} documents ({} chunks); {}",
        report.documents,
        report.chunks,
        summary(&index)
    );
    Ok(())
}

fn query(args: RagQueryArgs) -> Result<()> {
    let index = RagIndex::open(&args.dir)?;
    let hits = index.search(&args.query, args.k as usize)?;
    if hits.is_empty() {
        eprintln!("no chunk matches the query");
    }
    for (i, hit) in hits.iter().enumerate() {
        let rank = i + 1;
        if args.json {
            let mut value = serde_json::to_value(hit).context("serialising a hit")?;
            value["rank"] = rank.into();
            println!("{value}");
        } else {
            let c = &hit.chunk;
            println!(
                "{rank}. {}  score {:.3}  [{}] {} chars {}..{}",
                c.id, hit.score, c.title, c.source, c.span.start_char, c.span.end_char
            );
            println!("   {}", c.text.replace('\n', "\n   "));
        }
    }
    Ok(())
}
