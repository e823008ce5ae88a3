//! `hone rag`'s arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use hone_rag::SearchOptions;

use super::OnErrorArg;

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
    /// Dense search: exact (every vector scored), hnsw (an approximate graph proposes
    /// candidates, scored exactly), or auto (hnsw from --hnsw-threshold chunks). Recorded in
    /// the index; `hone rag add`/`remove` follow it.
    #[arg(long, value_enum, default_value = "auto")]
    pub vector_search: VectorModeArg,
    /// Chunks from which --vector-search auto builds the HNSW graph.
    #[arg(long, default_value_t = hone_rag::dense::DEFAULT_HNSW_THRESHOLD)]
    pub hnsw_threshold: usize,
    #[command(flatten)]
    pub hnsw: HnswArgs,
}

/// The HNSW graph's parameters (`hone rag index`, `hone bench rag`).
#[derive(Args, Debug)]
pub struct HnswArgs {
    /// HNSW: neighbours kept per point and layer (M, 2 to 256).
    #[arg(long, default_value_t = hone_rag::hnsw::HnswParams::default().m)]
    pub hnsw_m: usize,
    /// HNSW: candidate list length while building (efConstruction).
    #[arg(long, default_value_t = hone_rag::hnsw::HnswParams::default().ef_construction)]
    pub hnsw_ef_construction: usize,
    /// HNSW: candidate list length while searching (ef; at least k).
    #[arg(long, default_value_t = hone_rag::hnsw::HnswParams::default().ef_search)]
    pub hnsw_ef_search: usize,
}

impl HnswArgs {
    pub fn params(&self) -> hone_rag::hnsw::HnswParams {
        hone_rag::hnsw::HnswParams {
            m: self.hnsw_m,
            ef_construction: self.hnsw_ef_construction,
            ef_search: self.hnsw_ef_search,
        }
    }
}

/// How the dense vectors are searched.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorModeArg {
    Auto,
    Exact,
    Hnsw,
}

impl RagIndexArgs {
    /// The vector search policy these flags ask for.
    pub fn vector_policy(&self) -> hone_rag::dense::VectorPolicy {
        use hone_rag::dense::{VectorMode, VectorPolicy};
        VectorPolicy {
            mode: match self.vector_search {
                VectorModeArg::Auto => VectorMode::Auto,
                VectorModeArg::Exact => VectorMode::Exact,
                VectorModeArg::Hnsw => VectorMode::Hnsw,
            },
            hnsw_threshold: self.hnsw_threshold,
            hnsw: self.hnsw.params(),
        }
    }
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
