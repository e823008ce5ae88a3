//! The calls every retrieval store serves: [`Retriever`] for search, [`IndexUpdate`] for
//! in-place changes. [`crate::RagIndex`] (BM25 + exact or HNSW dense search, fused by
//! [`crate::hybrid`]) implements both; an external engine for corpora that outgrow one machine
//! plugs in behind the same traits (the README's "Retrieval" section says how).

use serde::Serialize;

use crate::chunk::Chunk;
use crate::document::Document;
use crate::error::Result;

/// One retrieved chunk and its score (higher is better; scales differ between stores).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hit {
    #[serde(flatten)]
    pub chunk: Chunk,
    pub score: f32,
}

/// Searches a store of chunks.
pub trait Retriever {
    /// The `k` best chunks for `query`, best first.
    fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>>;
}

/// What [`IndexUpdate::add`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AddReport {
    /// Documents new to the index.
    pub added: usize,
    /// Documents whose id was already indexed: their old chunks were replaced.
    pub replaced: usize,
    /// Chunks written.
    pub chunks: usize,
}

/// What [`IndexUpdate::remove`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoveReport {
    pub documents: usize,
    pub chunks: usize,
}

/// Changes a store in place; each call is atomic for readers, and the next search sees it.
pub trait IndexUpdate {
    /// Adds documents; a document whose id is indexed already replaces the old version.
    fn add(&mut self, documents: &[Document]) -> Result<AddReport>;
    /// Removes every chunk of the documents `ids`; an id not in the index is an error and
    /// nothing changes.
    fn remove(&mut self, ids: &[String]) -> Result<RemoveReport>;
}
