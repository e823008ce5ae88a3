//! hone-rag: retrieval for retrieval-augmented generation.
//!
//! ```text
//! JSONL records / Markdown / text files, dirs, globs     document
//!   -> chunks by tokens along paragraphs, with overlap    chunk
//!      (ids `{doc_id}#{position}`, byte + char offsets)
//!   -> BM25 index (tantivy) in DIR/lexical                lexical
//!   -> DIR/manifest.json (version, generation, counts)    manifest
//! search: Retriever::search -> ranked Hits               retriever, index
//! change: IndexUpdate::add / remove, in place, atomic    index
//! fusion of ranked lists (reciprocal rank fusion)        hybrid
//! sentence embeddings (BERT in burn, mean pooling)       embed
//! dense vectors in DIR/dense-NNNNNN (exact cosine)       dense
//! the prompt with numbered passages and citations        prompt
//! retrieval-aware training examples (RAFT)               raft
//! ```
//!
//! ```no_run
//! use hone_rag::{build_index, BuildOptions, ChunkConfig, RagIndex, Retriever};
//! build_index(&BuildOptions {
//!     inputs: vec!["docs/".into()],
//!     out: "idx".into(),
//!     chunking: ChunkConfig::default(),
//!     tokenizer: None,
//!     embedder: None,
//!     vectors: Default::default(),
//!     on_error: hone_data::OnError::Fail,
//!     force: false,
//! })?;
//! let index = RagIndex::open(std::path::Path::new("idx"))?;
//! for hit in index.search("what is a turing machine", 5)? {
//!     println!("{} {:.3} {}", hit.chunk.id, hit.score, hit.chunk.text);
//! }
//! # Ok::<(), hone_rag::RagError>(())
//! ```

pub mod chunk;
pub mod dense;
pub mod document;
pub mod embed;
pub mod error;
pub mod hnsw;
pub mod hybrid;
pub mod index;
pub mod lexical;
pub mod manifest;
pub mod prompt;
pub mod raft;
pub mod retriever;

pub use chunk::{chunk_id, Chunk, ChunkConfig, Chunker, Span, Tokenization};
pub use document::{read_corpus, Corpus, Document};
pub use embed::{EmbedderId, Embeddings, SentenceEmbedder};
pub use error::{RagError, Result};
pub use hybrid::{fuse_hits, reciprocal_rank_fusion, FusionConfig, RRF_K};
pub use index::{
    build_index, BuildOptions, BuildReport, OpenOptions, RagIndex, SearchMode, SearchOptions,
    TOKENIZER_FILE,
};
pub use manifest::{DenseManifest, Manifest, VectorSearch, FORMAT_VERSION, MANIFEST_FILE};
pub use prompt::Passage;
pub use raft::{build_raft, read_questions, Question, Raft, RaftOptions, RaftReport, WithoutGold};
pub use retriever::{AddReport, Hit, IndexUpdate, RemoveReport, Retriever};
