//! An index directory: building it from a corpus, opening it, searching it and changing it in
//! place.
//!
//! With an embedder ([`BuildOptions::embedder`]) every chunk is also embedded and kept in a
//! dense vector index ([`crate::dense`]), and searches fuse BM25 and dense rankings by weighted
//! reciprocal rank fusion ([`SearchOptions`]); the manifest records the embedder's name and hash,
//! and opening the index with another embedder is an error naming both.
//!
//! Building writes everything into a temporary directory next to the target and renames it into
//! place, so a failed build leaves nothing half-written and an existing index stays readable
//! until the new one replaces it. `add` and `remove` embed new chunks, take tantivy's writer lock,
//! write the next dense directory (when there is one), then make one tantivy commit each (atomic
//! for readers), followed by an atomic rewrite of `manifest.json` (new generation and counts) while
//! tantivy's writer lock is still held, so concurrent writers are refused rather than
//! interleaved.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_data::{OnError, RecordError};

use crate::chunk::{Chunk, ChunkConfig, Chunker, Tokenization};
use crate::dense::{self, dense_dir_name, DenseIndex, Row, VectorPolicy};
use crate::document::{read_corpus, Document};
use crate::embed::SentenceEmbedder;
use crate::error::{RagError, Result};
use crate::hybrid::{fuse_hits, FusionConfig};
use crate::lexical::{self, LexicalIndex};
use crate::manifest::{
    ChunkingManifest, DenseManifest, Manifest, VectorSearch, LEXICAL_DIR, MANIFEST_FILE,
};
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
    /// A Hugging Face `tokenizer.json` whose tokens chunking counts; `None`: the embedder's
    /// tokenizer when there is an embedder, else the word approximation.
    pub tokenizer: Option<PathBuf>,
    /// A sentence-transformers directory: chunks are also embedded into a dense index.
    pub embedder: Option<PathBuf>,
    /// When the dense index keeps an HNSW graph (recorded; changes follow it).
    pub vectors: VectorPolicy,
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
    /// Wall-clock seconds spent embedding chunks (0 without an embedder).
    pub embed_seconds: f64,
}

/// Builds the index `options.out` from `options.inputs`.
pub fn build_index(options: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    check_output(&options.out, options.force)?;
    let embedder = match &options.embedder {
        Some(dir) => Some(load_embedder(dir, &options.chunking)?),
        None => None,
    };
    let tokenizer = options
        .tokenizer
        .clone()
        .or_else(|| embedder.as_ref().map(|e| e.tokenizer_path()));
    let chunker = match &tokenizer {
        Some(path) => Chunker::hugging_face(options.chunking.clone(), path)?,
        None => Chunker::words(options.chunking.clone())?,
    };
    let corpus = read_corpus(&options.inputs, options.on_error)?;
    let chunks = chunk_all(&chunker, &corpus.documents)?;
    let read_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let dense = match &embedder {
        Some(embedder) => {
            options.vectors.hnsw.validate()?;
            Some(embed_chunks(
                embedder,
                &DenseIndex::empty(embedder.dim()).with_policy(options.vectors),
                &[],
                &chunks,
            )?)
        }
        None => None,
    };
    let embed_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let staged = hone_io::StagedDir::new(&options.out)?;
    let tokenization = match &tokenizer {
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
    if let (Some(embedder), Some(dense)) = (&embedder, &dense) {
        let dir = dense_dir_name(1);
        dense.write_into(&staged.path().join(&dir))?;
        manifest.embedder = Some(embedder.id().name.clone());
        manifest.dense = Some(dense_manifest(embedder, dense, dir)?);
    }
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
        embed_seconds,
    };
    tracing::info!(
        out = %options.out.display(),
        documents = report.documents,
        chunks = report.chunks,
        "built index"
    );
    Ok(report)
}

/// Loads the embedder of a build and checks that chunks fit its sequence length.
fn load_embedder(dir: &Path, chunking: &ChunkConfig) -> Result<SentenceEmbedder> {
    let embedder = SentenceEmbedder::load(dir)?;
    // [CLS] and [SEP] take two of the model's positions.
    let fits = embedder.settings().max_seq_len.saturating_sub(2);
    if chunking.max_tokens > fits {
        return Err(RagError::config(
            "max_tokens",
            format!(
                "expected at most {fits} (embedder {} reads {} tokens, 2 of them special), found {}",
                embedder.id(),
                embedder.settings().max_seq_len,
                chunking.max_tokens
            ),
        ));
    }
    Ok(embedder)
}

fn dense_manifest(
    embedder: &SentenceEmbedder,
    index: &DenseIndex,
    dir: String,
) -> Result<DenseManifest> {
    let embedder_dir =
        std::fs::canonicalize(embedder.dir()).map_err(|e| RagError::io(embedder.dir(), e))?;
    Ok(DenseManifest {
        embedder: embedder.id().clone(),
        embedder_dir,
        dim: embedder.dim(),
        search: vector_search(index),
        policy: *index.policy(),
        dir,
    })
}

fn vector_search(index: &DenseIndex) -> VectorSearch {
    match index.graph() {
        Some(_) => VectorSearch::Hnsw,
        None => VectorSearch::Exact,
    }
}

/// `dense` without the documents `remove` and with `chunks` embedded.
fn embed_chunks(
    embedder: &SentenceEmbedder,
    dense: &DenseIndex,
    remove: &[String],
    chunks: &[Chunk],
) -> Result<DenseIndex> {
    let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
    let vectors = embedder.embed(&texts)?;
    let rows = chunks
        .iter()
        .map(|c| Row {
            id: c.id.clone(),
            doc_id: c.doc_id.clone(),
        })
        .collect();
    dense.changed(remove, rows, &vectors.values)
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

/// Which rankings a search uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchMode {
    /// Hybrid when the index has a dense part, else lexical.
    #[default]
    Auto,
    /// BM25 only.
    Lexical,
    /// Embedding similarity only.
    Dense,
    /// Reciprocal rank fusion of BM25 and dense rankings.
    Hybrid,
}

/// How [`RagIndex::search_with`] ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchOptions {
    pub mode: SearchMode,
    /// Fusion of `[lexical, dense]` rankings (two weights).
    pub fusion: FusionConfig,
    /// Candidates taken from each ranking before fusion (at least `k`).
    pub candidates: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            mode: SearchMode::Auto,
            fusion: FusionConfig::equal(2),
            candidates: 50,
        }
    }
}

/// How to open an index.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The embedder to embed queries and new chunks with; `None`: the directory the manifest
    /// names. It must be the embedder that built the index (same hash).
    pub embedder: Option<PathBuf>,
}

/// The dense part of an opened index.
struct Dense {
    index: DenseIndex,
    embedder: SentenceEmbedder,
}

/// An opened index directory.
pub struct RagIndex {
    dir: PathBuf,
    manifest: Manifest,
    lexical: LexicalIndex,
    chunker: Chunker,
    dense: Option<Dense>,
}

impl RagIndex {
    /// Opens the index in `dir`, checking its manifest; a dense part is opened with the
    /// embedder the manifest names.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &OpenOptions::default())
    }

    /// Opens the index in `dir` as `options` say.
    pub fn open_with(dir: &Path, options: &OpenOptions) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let lexical = LexicalIndex::open(&dir.join(&manifest.lexical.dir))?;
        let config = manifest.chunking.config.clone();
        let chunker = match manifest.tokenizer_path(dir) {
            Some(path) => Chunker::hugging_face(config, &path)?,
            None => Chunker::words(config)?,
        };
        let dense = match &manifest.dense {
            Some(m) => Some(open_dense(dir, m, options)?),
            None if options.embedder.is_some() => {
                return Err(RagError::config(
                    "embedder",
                    format!(
                        "{} is a lexical index (built without an embedder); rebuild it with one",
                        dir.display()
                    ),
                ))
            }
            None => None,
        };
        Ok(RagIndex {
            dir: dir.to_path_buf(),
            manifest,
            lexical,
            chunker,
            dense,
        })
    }

    /// The embedder of the dense part, if any.
    pub fn embedder(&self) -> Option<&SentenceEmbedder> {
        self.dense.as_ref().map(|d| &d.embedder)
    }

    /// The `k` best chunks for `query`, ranked as `options` say.
    pub fn search_with(&self, query: &str, k: usize, options: &SearchOptions) -> Result<Vec<Hit>> {
        let mode = match (options.mode, &self.dense) {
            (SearchMode::Auto, Some(_)) => SearchMode::Hybrid,
            (SearchMode::Auto, None) => SearchMode::Lexical,
            (SearchMode::Dense | SearchMode::Hybrid, None) => {
                return Err(RagError::config(
                    "mode",
                    format!(
                        "{} has no dense index (built without an embedder): lexical search only",
                        self.dir.display()
                    ),
                ))
            }
            (mode, _) => mode,
        };
        let n = options.candidates.max(k);
        match mode {
            SearchMode::Lexical => self.lexical.search(query, k),
            SearchMode::Dense => {
                let mut hits = self.dense_search(query, k)?;
                hits.truncate(k);
                Ok(hits)
            }
            _ => {
                let lists = [self.lexical.search(query, n)?, self.dense_search(query, n)?];
                fuse_hits(&lists, &options.fusion, k)
            }
        }
    }

    /// The `k` chunks whose embeddings are closest to the query's (cosine), best first.
    fn dense_search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let Some(dense) = &self.dense else {
            return Ok(Vec::new());
        };
        let q = dense.embedder.embed(&[query])?;
        let mut hits = Vec::with_capacity(k);
        for (row, score) in dense.index.search(&q.values, k)? {
            // The lexical store holds the chunk texts; a row it lacks (a change in progress)
            // is skipped.
            if let Some(chunk) = self.lexical.chunk_by_id(&dense.index.rows()[row].id)? {
                hits.push(Hit { chunk, score });
            }
        }
        Ok(hits)
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

    /// Commits one change and rewrites the manifest (next generation, fresh counts). With a
    /// dense part, the next dense directory is written completely first and named by the new
    /// manifest; a failed commit removes it.
    fn commit(&mut self, remove: &[String], chunks: &[Chunk]) -> Result<()> {
        let dir = self.dir.clone();
        // Embedding (the slow part) happens before the writer lock is taken; the directory is
        // written under it, named by the generation the manifest has then.
        let next_index = match &self.dense {
            Some(dense) => Some(embed_chunks(&dense.embedder, &dense.index, remove, chunks)?),
            None => None,
        };
        let next_dense: std::cell::RefCell<Option<(DenseIndex, String)>> = Default::default();
        let prepare = || -> Result<()> {
            if let Some(mut index) = next_index {
                let name = dense_dir_name(Manifest::read(&dir)?.generation + 1);
                index.write(&dir.join(&name))?;
                *next_dense.borrow_mut() = Some((index, name));
            }
            Ok(())
        };
        let mut updated = None;
        let result = self.lexical.apply_locked(prepare, remove, chunks, |index| {
            let mut manifest = Manifest::read(&dir)?;
            let (documents, chunks) = index.counts()?;
            manifest.generation += 1;
            manifest.documents = documents;
            manifest.chunks = chunks;
            if let (Some(m), Some((index, name))) = (manifest.dense.as_mut(), &*next_dense.borrow())
            {
                m.dir = name.clone();
                m.search = vector_search(index);
            }
            manifest.write(&dir)?;
            updated = Some(manifest);
            Ok(())
        });
        let next_dense = next_dense.into_inner();
        if let Err(e) = result {
            if let (Some((_, name)), None) = (&next_dense, &updated) {
                let _ = std::fs::remove_dir_all(dir.join(name));
            }
            return Err(e);
        }
        if let Some(manifest) = updated {
            if let (Some(dense), Some((index, name))) = (self.dense.as_mut(), next_dense) {
                let previous = self.manifest.dense.as_ref().map(|m| m.dir.clone());
                dense.index = index;
                dense::remove_stale(
                    &dir,
                    &[Some(name), previous]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>(),
                );
            }
            self.manifest = manifest;
        }
        Ok(())
    }
}

/// The dense part of `dir` as its manifest `m` describes it, with the embedder checked.
fn open_dense(dir: &Path, m: &DenseManifest, options: &OpenOptions) -> Result<Dense> {
    let embedder_dir = options
        .embedder
        .clone()
        .unwrap_or_else(|| m.embedder_dir.clone());
    if !embedder_dir.is_dir() {
        return Err(RagError::MissingEmbedder {
            index: dir.into(),
            name: m.embedder.to_string(),
            path: embedder_dir,
        });
    }
    let given = crate::embed::fingerprint(&embedder_dir)?;
    if given.hash != m.embedder.hash {
        return Err(RagError::EmbedderMismatch {
            index: dir.into(),
            built_with: m.embedder.to_string(),
            given: format!("{given} from {}", embedder_dir.display()),
        });
    }
    let embedder = SentenceEmbedder::load(&embedder_dir)?;
    if embedder.dim() != m.dim {
        return Err(RagError::CorruptManifest {
            path: dir.join(MANIFEST_FILE),
            message: format!(
                "dense.dim is {}, the embedder's dimension {}",
                m.dim,
                embedder.dim()
            ),
        });
    }
    let index = DenseIndex::open(&dir.join(&m.dir), m.dim)?.with_policy(m.policy);
    Ok(Dense { index, embedder })
}

impl Retriever for RagIndex {
    /// Hybrid (BM25 + dense, equal weights) when the index has an embedder, else BM25.
    fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.search_with(query, k, &SearchOptions::default())
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
