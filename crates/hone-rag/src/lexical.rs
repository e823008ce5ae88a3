//! The lexical index: BM25 over chunks with tantivy, persisted in `DIR/lexical/`.
//!
//! One tantivy document per chunk. `title` and `text` are analysed (simple tokenizer, lowercase,
//! English stop words, English Snowball stemming) and searched with BM25 (tantivy's k1 = 1.2,
//! b = 0.75); ids, offsets and the chunk text are stored so a hit needs no second store.
//! Queries are analysed the same way and become an OR of term queries over both fields, so
//! punctuation in a question is never query syntax. Every change is one tantivy commit, which
//! is atomic: readers see the index before or after it.

use std::path::{Path, PathBuf};

use tantivy::collector::{Count, TopDocs};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, TantivyDocument, TextFieldIndexing,
    TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{Index, IndexReader, ReloadPolicy, Term};

use crate::chunk::{Chunk, Span};
use crate::error::{RagError, Result};
use crate::manifest::{LexicalManifest, LEXICAL_DIR};
use crate::retriever::Hit;

/// The name the analyzer is registered under in the index's tokenizer manager.
const ANALYZER: &str = "hone_en";
/// Tantivy's writer memory budget. One indexing thread: a build then writes one segment in
/// input order, so rebuilding the same corpus ranks ties identically (several threads split
/// documents across segments at random, and equal scores are ordered by segment).
const WRITER_BUDGET: usize = 64 << 20;
const WRITER_THREADS: usize = 1;

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("tantivy ships English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

/// What the manifest records about this index.
pub(crate) fn manifest() -> LexicalManifest {
    LexicalManifest {
        engine: "tantivy".into(),
        engine_version: "0.27.0".into(),
        analyzer: "simple, remove_long(40), lowercase, stopwords(en), stem(en); BM25".into(),
        dir: LEXICAL_DIR.into(),
    }
}

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    doc_id: Field,
    position: Field,
    title: Field,
    text: Field,
    source: Field,
    start_byte: Field,
    end_byte: Field,
    start_char: Field,
    end_char: Field,
}

fn schema() -> Schema {
    let mut builder = Schema::builder();
    let analysed = TextOptions::default().set_stored().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    builder.add_text_field("id", STRING | STORED);
    builder.add_text_field("doc_id", STRING | STORED);
    builder.add_u64_field(
        "position",
        NumericOptions::default().set_indexed().set_stored(),
    );
    builder.add_text_field("title", analysed.clone());
    builder.add_text_field("text", analysed);
    builder.add_text_field("source", STORED);
    for name in ["start_byte", "end_byte", "start_char", "end_char"] {
        builder.add_u64_field(name, STORED);
    }
    builder.build()
}

impl Fields {
    fn of(schema: &Schema) -> std::result::Result<Self, tantivy::TantivyError> {
        let f = |name: &str| schema.get_field(name);
        Ok(Fields {
            id: f("id")?,
            doc_id: f("doc_id")?,
            position: f("position")?,
            title: f("title")?,
            text: f("text")?,
            source: f("source")?,
            start_byte: f("start_byte")?,
            end_byte: f("end_byte")?,
            start_char: f("start_char")?,
            end_char: f("end_char")?,
        })
    }
}

/// A BM25 index of chunks in one directory.
pub struct LexicalIndex {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
}

impl LexicalIndex {
    /// Creates an empty index in `dir` (created; must not hold an index).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| RagError::io(dir, e))?;
        let index = Index::create_in_dir(dir, schema()).map_err(|e| RagError::lexical(dir, e))?;
        Self::with_index(dir, index)
    }

    /// Opens the index in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = Index::open_in_dir(dir).map_err(|e| RagError::lexical(dir, e))?;
        Self::with_index(dir, index)
    }

    fn with_index(dir: &Path, index: Index) -> Result<Self> {
        index.tokenizers().register(ANALYZER, analyzer());
        let fail = |e| RagError::lexical(dir, e);
        let fields = Fields::of(&index.schema()).map_err(fail)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(fail)?;
        Ok(LexicalIndex {
            dir: dir.to_path_buf(),
            index,
            reader,
            fields,
        })
    }

    /// Applies one change as a single commit: deletes every chunk of `remove` (document ids),
    /// then adds `chunks`; the reader sees the result when this returns. `then` runs after the
    /// commit while the writer lock is still held (the manifest update), so another writer
    /// cannot slip in between.
    pub fn apply(
        &self,
        remove: &[String],
        chunks: &[Chunk],
        then: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        self.apply_locked(|| Ok(()), remove, chunks, then)
    }

    /// [`Self::apply`], running `prepare` first once the writer lock is held (the next dense
    /// directory is written there, so two writers never write the same one).
    pub fn apply_locked(
        &self,
        prepare: impl FnOnce() -> Result<()>,
        remove: &[String],
        chunks: &[Chunk],
        then: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        let fail = |e| RagError::lexical(&self.dir, e);
        let mut writer = self
            .index
            .writer_with_num_threads::<TantivyDocument>(WRITER_THREADS, WRITER_BUDGET)
            .map_err(fail)?;
        prepare()?;
        for doc_id in remove {
            writer.delete_term(Term::from_field_text(self.fields.doc_id, doc_id));
        }
        for chunk in chunks {
            writer.add_document(self.document(chunk)).map_err(fail)?;
        }
        writer.commit().map_err(fail)?;
        self.reader.reload().map_err(fail)?;
        then(self)?;
        writer.wait_merging_threads().map_err(fail)?;
        Ok(())
    }

    fn document(&self, chunk: &Chunk) -> TantivyDocument {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.id, &chunk.id);
        doc.add_text(f.doc_id, &chunk.doc_id);
        doc.add_u64(f.position, chunk.position as u64);
        doc.add_text(f.title, &chunk.title);
        doc.add_text(f.text, &chunk.text);
        doc.add_text(f.source, &chunk.source);
        doc.add_u64(f.start_byte, chunk.span.start_byte as u64);
        doc.add_u64(f.end_byte, chunk.span.end_byte as u64);
        doc.add_u64(f.start_char, chunk.span.start_char as u64);
        doc.add_u64(f.end_char, chunk.span.end_char as u64);
        doc
    }

    /// The number of chunks of document `doc_id` (0: not in the index).
    pub fn chunk_count(&self, doc_id: &str) -> Result<u64> {
        let query = TermQuery::new(
            Term::from_field_text(self.fields.doc_id, doc_id),
            IndexRecordOption::Basic,
        );
        let count = self
            .reader
            .searcher()
            .search(&query, &Count)
            .map_err(|e| RagError::lexical(&self.dir, e))?;
        Ok(count as u64)
    }

    /// The chunks of document `doc_id`, in position order (empty: not in the index).
    pub fn chunks_of(&self, doc_id: &str) -> Result<Vec<Chunk>> {
        let count = self.chunk_count(doc_id)? as usize;
        if count == 0 {
            return Ok(Vec::new());
        }
        let query = TermQuery::new(
            Term::from_field_text(self.fields.doc_id, doc_id),
            IndexRecordOption::Basic,
        );
        let fail = |e| RagError::lexical(&self.dir, e);
        let searcher = self.reader.searcher();
        let top = searcher
            .search(&query, &TopDocs::with_limit(count).order_by_score())
            .map_err(fail)?;
        let mut chunks = top
            .into_iter()
            .map(|(_, address)| {
                let doc: TantivyDocument = searcher.doc(address).map_err(fail)?;
                Ok(self.chunk_of(&doc))
            })
            .collect::<Result<Vec<_>>>()?;
        chunks.sort_by_key(|c| c.position);
        Ok(chunks)
    }

    /// The chunk with id `id`, if the index holds it.
    pub fn chunk_by_id(&self, id: &str) -> Result<Option<Chunk>> {
        let query = TermQuery::new(
            Term::from_field_text(self.fields.id, id),
            IndexRecordOption::Basic,
        );
        let fail = |e| RagError::lexical(&self.dir, e);
        let searcher = self.reader.searcher();
        let top = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())
            .map_err(fail)?;
        match top.first() {
            Some((_, address)) => {
                let doc: TantivyDocument = searcher.doc(*address).map_err(fail)?;
                Ok(Some(self.chunk_of(&doc)))
            }
            None => Ok(None),
        }
    }

    /// (documents, chunks) in the index: documents are counted by their chunk 0.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let searcher = self.reader.searcher();
        let first = TermQuery::new(
            Term::from_field_u64(self.fields.position, 0),
            IndexRecordOption::Basic,
        );
        let documents = searcher
            .search(&first, &Count)
            .map_err(|e| RagError::lexical(&self.dir, e))?;
        Ok((documents as u64, searcher.num_docs()))
    }

    /// The analysed terms of `query`, each once, in order.
    fn query_terms(&self, query: &str) -> Vec<String> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(query);
        let mut terms: Vec<String> = Vec::new();
        while stream.advance() {
            let text = &stream.token().text;
            if !terms.contains(text) {
                terms.push(text.clone());
            }
        }
        terms
    }

    /// The `k` best chunks for `query` by BM25, best first (no hits when the query has no
    /// searchable term, e.g. only stop words).
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let terms = self.query_terms(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .flat_map(|term| {
                [self.fields.title, self.fields.text].map(|field| {
                    let query = TermQuery::new(
                        Term::from_field_text(field, term),
                        IndexRecordOption::WithFreqs,
                    );
                    (Occur::Should, Box::new(query) as Box<dyn Query>)
                })
            })
            .collect();
        let query = BooleanQuery::new(clauses);
        let fail = |e| RagError::lexical(&self.dir, e);
        let searcher = self.reader.searcher();
        // tantivy sizes its heap by the limit: never ask for more hits than there are chunks.
        let k = k.min(searcher.num_docs() as usize).max(1);
        let top = searcher
            .search(&query, &TopDocs::with_limit(k).order_by_score())
            .map_err(fail)?;
        top.into_iter()
            .map(|(score, address)| {
                let doc: TantivyDocument = searcher.doc(address).map_err(fail)?;
                Ok(Hit {
                    chunk: self.chunk_of(&doc),
                    score,
                })
            })
            .collect()
    }

    fn chunk_of(&self, doc: &TantivyDocument) -> Chunk {
        let f = &self.fields;
        let text = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        };
        let number = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_u64())
                .unwrap_or_default() as usize
        };
        Chunk {
            id: text(f.id),
            doc_id: text(f.doc_id),
            position: number(f.position),
            title: text(f.title),
            source: text(f.source),
            text: text(f.text),
            span: Span {
                start_byte: number(f.start_byte),
                end_byte: number(f.end_byte),
                start_char: number(f.start_char),
                end_char: number(f.end_char),
            },
        }
    }
}
