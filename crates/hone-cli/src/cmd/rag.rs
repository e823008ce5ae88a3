//! `hone rag index|add|remove|query`: build a retrieval index from documents, change it in
//! place, and search it (hone-rag): BM25, plus dense embeddings and hybrid ranking when the index
//! is built with `--embedder`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hone_rag::embed::EmbedderSettings;
use hone_rag::{
    build_index, BuildOptions, ChunkConfig, FusionConfig, IndexUpdate, OpenOptions, RagIndex,
    SearchMode, SearchOptions,
};

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
    /// A sentence-transformers model directory (BERT family, mean pooling, e.g.
    /// all-MiniLM-L6-v2): chunks are also embedded for dense and hybrid search, and counted in
    /// its tokenizer's tokens. Without it the index is lexical (BM25) only.
    #[arg(long, value_name = "DIR")]
    pub embedder: Option<PathBuf>,
    /// A Hugging Face tokenizer.json whose tokens chunk sizes count (copied into the index);
    /// default: the embedder's; without either, words and punctuation marks are counted (an
    /// approximation).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Most tokens in one chunk [default: 256, at most what the embedder reads less its 2
    /// special tokens].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokens a chunk repeats from the end of the previous one (below max-tokens / 2).
    /// [default: an eighth of max-tokens, 32 for 256]
    #[arg(long)]
    pub overlap: Option<usize>,
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
    /// The embedder that built the index, where it is now [default: the directory recorded in
    /// the index].
    #[arg(long, value_name = "DIR")]
    pub embedder: Option<PathBuf>,
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
    /// The embedder that built the index, where it is now [default: the directory recorded in
    /// the index].
    #[arg(long, value_name = "DIR")]
    pub embedder: Option<PathBuf>,
}

/// Which rankings `hone rag query` uses.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SearchModeArg {
    /// hybrid when the index has an embedder, else lexical
    Auto,
    /// BM25 only
    Lexical,
    /// embedding similarity only
    Dense,
    /// reciprocal rank fusion of BM25 and dense rankings
    Hybrid,
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
    /// Rankings to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: SearchModeArg,
    /// Weight of the BM25 ranking in hybrid fusion.
    #[arg(long, default_value_t = 1.0)]
    pub lexical_weight: f64,
    /// Weight of the dense ranking in hybrid fusion.
    #[arg(long, default_value_t = 1.0)]
    pub dense_weight: f64,
    /// The reciprocal rank fusion constant: score = sum of weight / (rrf_k + rank).
    #[arg(long, default_value_t = hone_rag::RRF_K)]
    pub rrf_k: f64,
    /// Candidates taken from each ranking before fusion (at least k).
    #[arg(long, default_value_t = SearchOptions::default().candidates)]
    pub candidates: usize,
    /// The embedder that built the index, where it is now [default: the directory recorded in
    /// the index].
    #[arg(long, value_name = "DIR")]
    pub embedder: Option<PathBuf>,
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
    let max_tokens = match (args.max_tokens, &args.embedder) {
        (Some(n), _) => n,
        (None, Some(dir)) => {
            let settings = EmbedderSettings::read(dir)?;
            ChunkConfig::default()
                .max_tokens
                .min(settings.max_seq_len.saturating_sub(2))
        }
        (None, None) => ChunkConfig::default().max_tokens,
    };
    let options = BuildOptions {
        inputs: args.docs,
        out: args.out.clone(),
        chunking: ChunkConfig {
            max_tokens,
            overlap_tokens: args.overlap.unwrap_or_else(|| {
                let d = ChunkConfig::default();
                d.overlap_tokens * max_tokens / d.max_tokens
            }),
        },
        tokenizer: args.tokenizer,
        embedder: args.embedder,
        on_error: policy(args.on_error),
        force: args.force,
    };
    let report = build_index(&options)?;
    print_skipped(&report.skipped);
    println!(
        "indexed {} documents as {} chunks ({} skipped) into {} in {:.2} s \
         (read + chunk {:.2} s, embed {:.2} s, index {:.2} s)",
        report.documents,
        report.chunks,
        report.skipped.len(),
        args.out.display(),
        report.read_seconds + report.embed_seconds + report.index_seconds,
        report.read_seconds,
        report.embed_seconds,
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

fn open(dir: &std::path::Path, embedder: Option<PathBuf>) -> Result<RagIndex> {
    Ok(RagIndex::open_with(dir, &OpenOptions { embedder })?)
}

fn add(args: RagAddArgs) -> Result<()> {
    let mut index = open(&args.dir, args.embedder)?;
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
    let mut index = open(&args.dir, args.embedder)?;
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
    let index = open(&args.dir, args.embedder)?;
    let options = SearchOptions {
        mode: match args.mode {
            SearchModeArg::Auto => SearchMode::Auto,
            SearchModeArg::Lexical => SearchMode::Lexical,
            SearchModeArg::Dense => SearchMode::Dense,
            SearchModeArg::Hybrid => SearchMode::Hybrid,
        },
        fusion: FusionConfig {
            k: args.rrf_k,
            weights: vec![args.lexical_weight, args.dense_weight],
        },
        candidates: args.candidates,
    };
    let hits = index.search_with(&args.query, args.k as usize, &options)?;
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
