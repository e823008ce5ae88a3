//! An index directory: building it from a corpus, opening it, searching it and changing it in
//! place.
//!
//! Building writes everything into a temporary directory next to the target and renames it into
//! place, so a failed build leaves nothing half-written and an existing index stays readable
//! until the new one replaces it. `add` and `remove` are one tantivy commit each (atomic for
//! readers), followed by an atomic rewrite of `manifest.json` (new generation and counts) while
//! tantivy's writer lock is still held, so concurrent writers are refused rather than
//! interleaved.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_data::{OnError, RecordError};

use crate::chunk::{Chunk, ChunkConfig, Chunker, Tokenization};
use crate::document::{read_corpus, Document};
use crate::error::{RagError, Result};
use crate::lexical::{self, LexicalIndex};
use crate::manifest::{ChunkingManifest, Manifest, LEXICAL_DIR, MANIFEST_FILE};
use crate::retriever::{AddReport, Hit, IndexUpdate, RemoveReport, Retriever};

/// The file name of the chunking tokenizer inside an index directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// What to build an index from, and where.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Files, directories and glob patterns (see [`crate::document`]).
    pub inputs: Vec<String>,
    /// The index directory: created, or replaced if it holds an index (or is empty).
    pub out: PathBuf,
    pub chunking: ChunkConfig,
    /// A Hugging Face `tokenizer.json` whose tokens chunking counts; `None`: the word
    /// approximation.
    pub tokenizer: Option<PathBuf>,
    pub on_error: OnError,
    /// Replace `out` even if it is a non-empty directory that holds no index.
    pub force: bool,
}

/// What a build did.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub documents: usize,
    pub chunks: usize,
    /// Bad records skipped (with `OnError::Skip`).
    pub skipped: Vec<RecordError>,
    /// Wall-clock seconds: reading and chunking, then indexing and committing.
    pub read_seconds: f64,
    pub index_seconds: f64,
}

/// Builds the index `options.out` from `options.inputs`.
pub fn build_index(options: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    check_output(&options.out, options.force)?;
    let chunker = match &options.tokenizer {
        Some(path) => Chunker::hugging_face(options.chunking.clone(), path)?,
        None => Chunker::words(options.chunking.clone())?,
    };
    let corpus = read_corpus(&options.inputs, options.on_error)?;
    let chunks = chunk_all(&chunker, &corpus.documents)?;
    let read_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let staged = hone_io::StagedDir::new(&options.out)?;
    let tokenization = match &options.tokenizer {
        Some(path) => {
            let copy = staged.path().join(TOKENIZER_FILE);
            std::fs::copy(path, &copy).map_err(|e| RagError::io(path, e))?;
            Tokenization::HuggingFace {
                file: TOKENIZER_FILE.into(),
            }
        }
        None => Tokenization::Words,
    };
    let mut manifest = Manifest::new(
        ChunkingManifest {
            config: options.chunking.clone(),
            tokenization,
        },
        lexical::manifest(),
    );
    let index = LexicalIndex::create(&staged.path().join(LEXICAL_DIR))?;
    index.apply(&[], &chunks, |index| {
        let (documents, chunks) = index.counts()?;
        manifest.generation = 1;
        manifest.documents = documents;
        manifest.chunks = chunks;
        manifest.write(staged.path())
    })?;
    drop(index);
    staged.commit()?;
    let report = BuildReport {
        documents: corpus.documents.len(),
        chunks: chunks.len(),
        skipped: corpus.skipped,
        read_seconds,
        index_seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        out = %options.out.display(),
        documents = report.documents,
        chunks = report.chunks,
        "built index"
    );
    Ok(report)
}

/// Refuses an output that exists and is neither an index nor an empty directory (unless
/// `force`), before any work is done.
fn check_output(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(RagError::OutputExists { path: out.into() });
    }
    let is_index = out.join(MANIFEST_FILE).is_file();
    let empty = std::fs::read_dir(out)
        .map_err(|e| RagError::io(out, e))?
        .next()
        .is_none();
    if is_index || empty || force {
        Ok(())
    } else {
        Err(RagError::OutputExists { path: out.into() })
    }
}

fn chunk_all(chunker: &Chunker, documents: &[Document]) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    for doc in documents {
        let before = chunks.len();
        chunks.extend(chunker.chunk(doc)?);
        if chunks.len() == before {
            tracing::warn!("{}: no tokens, so no chunks", doc.source);
        }
    }
    Ok(chunks)
}

/// An opened index directory.
pub struct RagIndex {
    dir: PathBuf,
    manifest: Manifest,
    lexical: LexicalIndex,
    chunker: Chunker,
}

impl RagIndex {
    /// Opens the index in `dir`, checking its manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let lexical = LexicalIndex::open(&dir.join(&manifest.lexical.dir))?;
        let config = manifest.chunking.config.clone();
        let chunker = match manifest.tokenizer_path(dir) {
            Some(path) => Chunker::hugging_face(config, &path)?,
            None => Chunker::words(config)?,
        };
        Ok(RagIndex {
            dir: dir.to_path_buf(),
            manifest,
            lexical,
            chunker,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as of the last open or change made through this handle.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunks of document `doc_id`, in order (empty: not in the index).
    pub fn chunks(&self, doc_id: &str) -> Result<Vec<Chunk>> {
        self.lexical.chunks_of(doc_id)
    }

    /// Reads documents from `inputs` and adds them ([`IndexUpdate::add`]); returns the bad
    /// records skipped.
    pub fn add_inputs(
        &mut self,
        inputs: &[String],
        on_error: OnError,
    ) -> Result<(AddReport, Vec<RecordError>)> {
        let corpus = read_corpus(inputs, on_error)?;
        let report = self.add(&corpus.documents)?;
        Ok((report, corpus.skipped))
    }

    /// Commits one change and rewrites the manifest (next generation, fresh counts).
    fn commit(&mut self, remove: &[String], chunks: &[Chunk]) -> Result<()> {
        let dir = self.dir.clone();
        let mut updated = None;
        self.lexical.apply(remove, chunks, |index| {
            let mut manifest = Manifest::read(&dir)?;
            let (documents, chunks) = index.counts()?;
            manifest.generation += 1;
            manifest.documents = documents;
            manifest.chunks = chunks;
            manifest.write(&dir)?;
            updated = Some(manifest);
            Ok(())
        })?;
        if let Some(manifest) = updated {
            self.manifest = manifest;
        }
        Ok(())
    }
}

impl Retriever for RagIndex {
    fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.lexical.search(query, k)
    }
}

impl IndexUpdate for RagIndex {
    fn add(&mut self, documents: &[Document]) -> Result<AddReport> {
        let mut seen = std::collections::HashSet::new();
        if let Some(doc) = documents.iter().find(|d| !seen.insert(d.id.as_str())) {
            return Err(RagError::config(
                "documents",
                format!("document id `{}` appears twice ({})", doc.id, doc.source),
            ));
        }
        let mut report = AddReport::default();
        let mut replaced = Vec::new();
        for doc in documents {
            if self.lexical.chunk_count(&doc.id)? > 0 {
                replaced.push(doc.id.clone());
            }
        }
        let chunks = chunk_all(&self.chunker, documents)?;
        self.commit(&replaced, &chunks)?;
        report.replaced = replaced.len();
        report.added = documents.len() - replaced.len();
        report.chunks = chunks.len();
        tracing::info!(index = %self.dir.display(), ?report, "added documents");
        Ok(report)
    }

    fn remove(&mut self, ids: &[String]) -> Result<RemoveReport> {
        let mut unique: Vec<String> = Vec::with_capacity(ids.len());
        for id in ids {
            if !unique.contains(id) {
                unique.push(id.clone());
            }
        }
        let ids = unique.as_slice();
        let mut chunks = 0;
        for id in ids {
            match self.lexical.chunk_count(id)? {
                0 => {
                    return Err(RagError::UnknownDocument {
                        path: self.dir.clone(),
                        id: id.clone(),
                    })
                }
                n => chunks += n as usize,
            }
        }
        self.commit(ids, &[])?;
        let report = RemoveReport {
            documents: ids.len(),
            chunks,
        };
        tracing::info!(index = %self.dir.display(), ?report, "removed documents");
        Ok(report)
    }
}
