//! The retrieval benchmark behind `hone bench rag`: embedding throughput, index build time and
//! query latency at several index sizes, and the HNSW graph's recall against exact search. One
//! JSON object per measurement.
//!
//! The corpus is the shipped text data (the retrieval corpora under `datasets/rag/`, and every
//! record of `datasets/*.jsonl` as one document), chunked by the embedder's tokenizer
//! (`chunk_tokens` tokens, no overlap) as `hone rag index` chunks: about 40k chunks of up to 48
//! tokens. Queries are the questions of the shipped retrieval sets.
//!
//! * `rag_embed`: the first `embed_chunks` chunks through [`SentenceEmbedder::embed`] (batches
//!   of `batch_size`, longest first, batches in parallel): chunks/s and tokens/s.
//! * `rag_index` (per size): BM25 indexing (tantivy) and the HNSW graph build of `size` chunks,
//!   the dense directory's write and read-back. An index holds the embedded chunks, then, up to
//!   its size, spliced ones: the first half of one embedded chunk's text with the second half
//!   of another's, and as vector the normalised sum of theirs (vectors from the embeddings'
//!   distribution without embedding 100k chunks on a CPU); the line says how many rows were
//!   embedded and how many spliced.
//! * `rag_query` (per size): latency per query, p50 and p99 in ms, of embedding the query,
//!   BM25, exact dense search, HNSW dense search, and the whole hybrid query as
//!   `RagIndex::search_with` runs it (embed, BM25 and dense candidates, chunk lookup,
//!   reciprocal rank fusion) with the search the index would use at that size; and recall@k of
//!   HNSW against exact search over the same queries.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_rag::dense::{DenseIndex, Row, VectorMode, VectorPolicy};
use hone_rag::hnsw::HnswParams;
use hone_rag::lexical::LexicalIndex;
use hone_rag::{
    fuse_hits, read_corpus, read_questions, Chunk, ChunkConfig, Chunker, Document, FusionConfig,
    Hit, SentenceEmbedder,
};
use serde_json::{json, Value};

use crate::error::{BenchError, Result};
use crate::memory::{available_threads, cpu_model, isa, peak_rss_mb, reset_peak_rss};

/// Settings of [`bench_rag`].
#[derive(Debug, Clone)]
pub struct RagBench {
    /// A sentence-transformers directory (all-MiniLM-L6-v2 for the README's figures).
    pub embedder: PathBuf,
    /// The repository root the shipped data is read from.
    pub data_root: PathBuf,
    /// Index sizes (chunks) to measure.
    pub sizes: Vec<usize>,
    /// Chunks embedded (the throughput measurement, and the real vectors of every size).
    pub embed_chunks: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Queries timed per size.
    pub queries: usize,
    /// Results per query (and the k of recall@k).
    pub k: usize,
    /// The HNSW graph's parameters.
    pub hnsw: HnswParams,
    /// Candidates taken from each ranking before fusion.
    pub candidates: usize,
    /// Stop after the embedding measurement.
    pub embed_only: bool,
    /// Write the embedded chunks' texts here (JSONL), for the sentence-transformers script.
    pub dump_chunks: Option<PathBuf>,
}

fn config(key: &'static str, message: impl Into<String>) -> BenchError {
    BenchError::Config {
        key,
        message: message.into(),
    }
}

fn rag_error(path: &Path, e: hone_rag::RagError) -> BenchError {
    BenchError::Input {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Runs every measurement, handing each JSON object to `emit` as soon as it is made.
pub fn bench_rag(bench: &RagBench, mut emit: impl FnMut(Value)) -> Result<()> {
    if bench.sizes.is_empty() || bench.sizes.contains(&0) {
        return Err(config("sizes", "expected one or more positive sizes"));
    }
    if bench.embed_chunks == 0 || bench.queries == 0 || bench.k == 0 || bench.batch_size == 0 {
        return Err(config(
            "embed-chunks/queries/k/batch-size",
            "expected positive values",
        ));
    }
    bench
        .hnsw
        .validate()
        .map_err(|e| config("hnsw", e.to_string()))?;
    let embedder = SentenceEmbedder::load(&bench.embedder)
        .map_err(|e| rag_error(&bench.embedder, e))?
        .with_batch_size(bench.batch_size);
    let chunks = shipped_chunks(bench, &embedder)?;
    let queries = shipped_questions(&bench.data_root, bench.queries)?;

    // Embedding throughput, on the first chunks; their vectors are reused below.
    let n = bench.embed_chunks.min(chunks.len());
    let texts: Vec<&str> = chunks[..n].iter().map(|c| c.text.as_str()).collect();
    if let Some(path) = &bench.dump_chunks {
        let mut jsonl = String::new();
        for text in &texts {
            jsonl.push_str(&json!({ "text": text }).to_string());
            jsonl.push('\n');
        }
        hone_io::write_file(path, jsonl.as_bytes()).map_err(|e| BenchError::Input {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    let tokens: usize = embedder
        .token_ids(&texts)
        .map_err(|e| rag_error(&bench.embedder, e))?
        .iter()
        .map(Vec::len)
        .sum();
    reset_peak_rss();
    let started = Instant::now();
    let embedded = embedder
        .embed(&texts)
        .map_err(|e| rag_error(&bench.embedder, e))?;
    let seconds = started.elapsed().as_secs_f64();
    emit(json!({
        "bench": "rag_embed",
        "embedder": embedder.id().to_string(),
        "chunks": n,
        "tokens": tokens,
        "mean_tokens_per_chunk": tokens as f64 / n as f64,
        "batch_size": bench.batch_size,
        "seconds": seconds,
        "chunks_per_sec": n as f64 / seconds,
        "tokens_per_sec": tokens as f64 / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "threads": available_threads(),
        "cpu": cpu_model(),
        "isa": isa(),
    }));
    if bench.embed_only {
        return Ok(());
    }

    // Query embeddings once (their cost is timed per query below).
    let query_texts: Vec<&str> = queries.iter().map(String::as_str).collect();
    let query_vectors = embedder
        .embed(&query_texts)
        .map_err(|e| rag_error(&bench.embedder, e))?;

    for &size in &bench.sizes {
        let (corpus, vectors, provenance) = corpus_of_size(&chunks, &embedded.values, n, size);
        let tmp = tempfile::tempdir().map_err(|e| config("tmp", e.to_string()))?;
        reset_peak_rss();
        let started = Instant::now();
        let lexical_dir = tmp.path().join("lexical");
        let lexical = LexicalIndex::create(&lexical_dir).map_err(|e| rag_error(&lexical_dir, e))?;
        lexical
            .apply(&[], &corpus, |_| Ok(()))
            .map_err(|e| rag_error(&lexical_dir, e))?;
        let bm25_seconds = started.elapsed().as_secs_f64();

        let rows: Vec<Row> = corpus
            .iter()
            .map(|c| Row {
                id: c.id.clone(),
                doc_id: c.doc_id.clone(),
            })
            .collect();
        let policy = |mode| VectorPolicy {
            mode,
            hnsw: bench.hnsw,
            ..VectorPolicy::default()
        };
        let dim = embedder.dim();
        let exact = DenseIndex::empty(dim)
            .with_policy(policy(VectorMode::Exact))
            .changed(&[], rows.clone(), &vectors)
            .map_err(|e| config("vectors", e.to_string()))?;
        let started = Instant::now();
        let mut graph = DenseIndex::empty(dim)
            .with_policy(policy(VectorMode::Hnsw))
            .changed(&[], rows, &vectors)
            .map_err(|e| config("vectors", e.to_string()))?;
        let hnsw_seconds = started.elapsed().as_secs_f64();
        let dense_dir = tmp.path().join("dense-000001");
        let started = Instant::now();
        graph
            .write(&dense_dir)
            .map_err(|e| rag_error(&dense_dir, e))?;
        let write_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let graph = DenseIndex::open(&dense_dir, dim)
            .map_err(|e| rag_error(&dense_dir, e))?
            .with_policy(policy(VectorMode::Hnsw));
        let open_seconds = started.elapsed().as_secs_f64();
        emit(json!({
            "bench": "rag_index",
            "chunks": size,
            "rows": provenance,
            "bm25_build_sec": bm25_seconds,
            "hnsw_build_sec": hnsw_seconds,
            "dense_write_sec": write_seconds,
            "dense_open_sec": open_seconds,
            "hnsw": bench.hnsw,
            "peak_rss_mb": peak_rss_mb(),
            "threads": available_threads(),
            "cpu": cpu_model(),
            "isa": isa(),
        }));

        // Latencies, one query at a time.
        let uses_graph = VectorPolicy {
            hnsw: bench.hnsw,
            ..VectorPolicy::default()
        }
        .wants_graph(size);
        let serving = if uses_graph { &graph } else { &exact };
        let (mut t_embed, mut t_bm25, mut t_exact, mut t_hnsw, mut t_hybrid) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut found, mut wanted) = (0usize, 0usize);
        let candidates = bench.candidates.max(bench.k);
        let fusion = FusionConfig::equal(2);
        for (i, text) in queries.iter().enumerate() {
            let qv = query_vectors.row(i);
            let t = Instant::now();
            let embedded = embedder
                .embed(&[text.as_str()])
                .map_err(|e| rag_error(&bench.embedder, e))?;
            t_embed.push(ms(t));
            let t = Instant::now();
            lexical
                .search(text, bench.k)
                .map_err(|e| rag_error(&lexical_dir, e))?;
            t_bm25.push(ms(t));
            let t = Instant::now();
            let want = exact
                .search(qv, bench.k)
                .map_err(|e| config("query", e.to_string()))?;
            t_exact.push(ms(t));
            let t = Instant::now();
            let got = graph
                .search(qv, bench.k)
                .map_err(|e| config("query", e.to_string()))?;
            t_hnsw.push(ms(t));
            found += want
                .iter()
                .filter(|w| got.iter().any(|g| g.0 == w.0))
                .count();
            wanted += want.len();

            // The whole hybrid query, as RagIndex::search_with runs it.
            let t = Instant::now();
            let embedded_again = embedder
                .embed(&[text.as_str()])
                .map_err(|e| rag_error(&bench.embedder, e))?;
            let lexical_hits = lexical
                .search(text, candidates)
                .map_err(|e| rag_error(&lexical_dir, e))?;
            let mut dense_hits = Vec::with_capacity(candidates);
            for (row, score) in serving
                .search(&embedded_again.values, candidates)
                .map_err(|e| config("query", e.to_string()))?
            {
                if let Some(chunk) = lexical
                    .chunk_by_id(&serving.rows()[row].id)
                    .map_err(|e| rag_error(&lexical_dir, e))?
                {
                    dense_hits.push(Hit { chunk, score });
                }
            }
            fuse_hits(&[lexical_hits, dense_hits], &fusion, bench.k)
                .map_err(|e| config("fusion", e.to_string()))?;
            t_hybrid.push(ms(t));
            drop(embedded);
        }
        emit(json!({
            "bench": "rag_query",
            "chunks": size,
            "queries": queries.len(),
            "k": bench.k,
            "dense_search": if uses_graph { "hnsw" } else { "exact" },
            "embed_query_ms": percentiles(&mut t_embed),
            "bm25_ms": percentiles(&mut t_bm25),
            "exact_ms": percentiles(&mut t_exact),
            "hnsw_ms": percentiles(&mut t_hnsw),
            "hybrid_ms": percentiles(&mut t_hybrid),
            "hnsw_recall_at_k": found as f64 / wanted.max(1) as f64,
            "ef_search": bench.hnsw.ef_search,
            "threads": available_threads(),
            "cpu": cpu_model(),
            "isa": isa(),
        }));
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// p50 and p99 (nearest rank) of `values`.
fn percentiles(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1]
    };
    json!({"p50": at(0.50), "p99": at(0.99)})
}

/// The shipped text data as chunks of the embedder's tokens: the retrieval corpora as
/// `hone rag index` reads them, and every record of the training sets as one document (its
/// string fields joined).
fn shipped_chunks(bench: &RagBench, embedder: &SentenceEmbedder) -> Result<Vec<Chunk>> {
    let root = &bench.data_root;
    let corpora: Vec<String> = [
        "datasets/rag/squad_v2_complexity/corpus.jsonl",
        "datasets/rag/hotpotqa_dev_distractor_60/corpus.jsonl",
    ]
    .iter()
    .map(|p| root.join(p).to_string_lossy().into_owned())
    .collect();
    let mut documents = read_corpus(&corpora, hone_data::OnError::Fail)
        .map_err(|e| rag_error(&root.join("datasets/rag"), e))?
        .documents;
    for file in [
        "datasets/gsm8k_train.jsonl",
        "datasets/alpaca_libre_ok.jsonl",
        "datasets/self_instruct_seed_tasks.jsonl",
    ] {
        let path = root.join(file);
        let source = hone_data::reader::read_records(&path)?;
        for (i, record) in source.records.iter().enumerate() {
            let mut parts = Vec::new();
            strings(&record.value, &mut parts);
            documents.push(Document {
                id: format!("{file}:{}", i + 1),
                title: String::new(),
                source: format!("{}:{}", path.display(), i + 1),
                text: parts.join("\n\n"),
            });
        }
    }
    let chunker = Chunker::hugging_face(
        ChunkConfig {
            max_tokens: bench.chunk_tokens,
            overlap_tokens: 0,
        },
        &embedder.tokenizer_path(),
    )
    .map_err(|e| rag_error(&embedder.tokenizer_path(), e))?;
    let mut chunks = Vec::new();
    for doc in &documents {
        chunks.extend(chunker.chunk(doc).map_err(|e| rag_error(root, e))?);
    }
    if chunks.is_empty() {
        return Err(config("data", format!("no chunks from {}", root.display())));
    }
    Ok(chunks)
}

/// Every non-empty string in `value`, depth first.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) if !s.trim().is_empty() => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Up to `n` questions of the shipped retrieval sets.
fn shipped_questions(root: &Path, n: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for set in [
        "squad_v2_complexity",
        "hotpotqa_dev_distractor_60",
        "freshness",
    ] {
        let path = root.join("datasets/rag").join(set).join("questions.jsonl");
        let questions = read_questions(&path).map_err(|e| rag_error(&path, e))?;
        out.extend(questions.into_iter().map(|q| q.question));
    }
    // Interleave the sets' questions evenly when fewer are asked for.
    let stride = (out.len() / n).max(1);
    Ok(out.into_iter().step_by(stride).take(n).collect())
}

/// `size` chunks and their vectors: the embedded chunks, then spliced ones (module
/// documentation).
fn corpus_of_size(
    chunks: &[Chunk],
    embedded: &[f32],
    n_embedded: usize,
    size: usize,
) -> (Vec<Chunk>, Vec<f32>, Value) {
    let dim = embedded.len() / n_embedded;
    let mut out = Vec::with_capacity(size);
    let mut vectors = Vec::with_capacity(size * dim);
    // Embedded chunks first, as they are.
    for (chunk, v) in chunks.iter().zip(embedded.chunks_exact(dim)).take(size) {
        out.push(chunk.clone());
        vectors.extend_from_slice(v);
    }
    // Then spliced ones: halves of two embedded chunks, a deterministic pairing.
    let mut spliced = 0usize;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    while out.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let a = (state % n_embedded as u64) as usize;
        let b = ((state >> 32) % n_embedded as u64) as usize;
        let text = format!(
            "{} {}",
            half(&chunks[a].text, true),
            half(&chunks[b].text, false)
        );
        let id = format!("spliced{spliced}");
        out.push(Chunk {
            id: format!("{id}#0"),
            doc_id: id,
            position: 0,
            title: String::new(),
            source: "spliced".into(),
            text,
            span: chunks[a].span,
        });
        let start = vectors.len();
        for i in 0..dim {
            vectors.push(embedded[a * dim + i] + embedded[b * dim + i]);
        }
        hone_rag::dense::normalize(&mut vectors[start..]);
        spliced += 1;
    }
    let provenance = json!({"embedded": size - spliced, "spliced": spliced});
    (out, vectors, provenance)
}

/// The first or second half of `text`, split at a char boundary near the middle.
fn half(text: &str, first: bool) -> &str {
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid += 1;
    }
    if first {
        &text[..mid]
    } else {
        &text[mid..]
    }
}
