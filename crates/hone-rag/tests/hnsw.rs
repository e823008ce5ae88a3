//! The approximate vector index (HNSW through hnsw_rs): its recall against exact search, changes
//! that insert into the graph instead of rebuilding it, persistence, damage detection, and an
//! index built with `VectorMode::Hnsw` through the tiny BERT fixture answering as the exact one.

mod common;
use common::{copy_dir, root};

use std::path::Path;

use hone_data::OnError;
use hone_rag::dense::{dense_dir_name, DenseIndex, Row, VectorMode, VectorPolicy};
use hone_rag::hnsw::GRAPH_META_FILE;
use hone_rag::manifest::VectorSearch;
use hone_rag::{
    build_index, BuildOptions, ChunkConfig, Document, IndexUpdate, RagError, RagIndex, SearchMode,
    SearchOptions,
};

/// A deterministic stream of uniform numbers in [-1, 1) (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` vectors of `dim` values around `centers` topic centres (as sentence embeddings cluster
/// by topic), each from document `doc{i / 4}`.
fn clustered(n: usize, dim: usize, centers: usize, seed: u64) -> (Vec<Row>, Vec<f32>) {
    let mut rng = Rng(seed);
    let c: Vec<f32> = (0..centers * dim).map(|_| rng.next()).collect();
    let mut vectors = Vec::with_capacity(n * dim);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let center = &c[(i % centers) * dim..(i % centers + 1) * dim];
        vectors.extend(center.iter().map(|x| x + 0.6 * rng.next()));
        rows.push(Row {
            id: format!("doc{}#{}", i / 4, i % 4),
            doc_id: format!("doc{}", i / 4),
        });
    }
    (rows, vectors)
}

fn hnsw_policy() -> VectorPolicy {
    VectorPolicy {
        mode: VectorMode::Hnsw,
        ..VectorPolicy::default()
    }
}

/// Mean share of the exact top `k` that `index.search` returns, over `queries`.
fn recall(index: &DenseIndex, queries: &[f32], k: usize) -> f64 {
    let dim = index.dim();
    let mut found = 0usize;
    let mut total = 0usize;
    for q in queries.chunks_exact(dim) {
        let exact: Vec<usize> = index
            .search_exact(q, k)
            .unwrap()
            .iter()
            .map(|h| h.0)
            .collect();
        let approx: Vec<usize> = index.search(q, k).unwrap().iter().map(|h| h.0).collect();
        found += exact.iter().filter(|r| approx.contains(r)).count();
        total += exact.len();
    }
    found as f64 / total as f64
}

#[test]
fn graph_recall_against_exact_search_and_changes_insert_into_it() {
    let dim = 48;
    let (rows, vectors) = clustered(4000, dim, 40, 7);
    let index = DenseIndex::empty(dim)
        .with_policy(hnsw_policy())
        .changed(&[], rows, &vectors)
        .unwrap();
    let graph = index.graph().expect("the Hnsw policy builds a graph");
    assert_eq!((graph.points(), graph.live()), (4000, 4000));
    let (_, queries) = clustered(100, dim, 40, 99);
    let r = recall(&index, &queries, 10);
    assert!(r >= 0.95, "recall@10 {r}");
    // Scores are exact cosines whichever way the candidates were found.
    let q = &queries[..dim];
    let approx = index.search(q, 5).unwrap();
    let exact = index.search_exact(q, 50).unwrap();
    for (row, score) in &approx {
        let want = exact.iter().find(|h| h.0 == *row).map(|h| h.1);
        assert_eq!(Some(*score), want, "row {row}");
    }

    // Persisted and read back: the same graph answers the same.
    let tmp = tempfile::tempdir().unwrap();
    let dir1 = tmp.path().join(dense_dir_name(1));
    let mut index = index;
    index.write(&dir1).unwrap();
    assert!(dir1.join(GRAPH_META_FILE).is_file());
    let reopened = DenseIndex::open(&dir1, dim)
        .unwrap()
        .with_policy(hnsw_policy());
    for q in queries.chunks_exact(dim).take(20) {
        assert_eq!(
            reopened.search(q, 10).unwrap(),
            index.search(q, 10).unwrap()
        );
    }

    // A change removes two documents (8 rows) and appends 40 rows: the graph read back from
    // dir1 gains 40 points (no rebuild), the removed rows are never returned, and each new
    // row is found by its own vector.
    let (mut new_rows, new_vectors) = clustered(40, dim, 40, 1234);
    for (i, row) in new_rows.iter_mut().enumerate() {
        row.id = format!("fresh{}#0", i);
        row.doc_id = format!("fresh{i}");
    }
    let changed = reopened
        .changed(&["doc0".into(), "doc7".into()], new_rows, &new_vectors)
        .unwrap();
    assert_eq!(changed.len(), 4000 - 8 + 40);
    let graph = changed.graph().unwrap();
    assert_eq!((graph.points(), graph.live()), (4040, 4032));
    for (i, v) in new_vectors.chunks_exact(dim).enumerate() {
        let top = changed.search(v, 1).unwrap();
        assert_eq!(changed.rows()[top[0].0].id, format!("fresh{i}#0"));
    }
    for q in queries.chunks_exact(dim) {
        for (row, _) in changed.search(q, 10).unwrap() {
            let doc = &changed.rows()[row].doc_id;
            assert!(doc != "doc0" && doc != "doc7", "{doc} was removed");
        }
    }
    let r = recall(&changed, &queries, 10);
    assert!(r >= 0.95, "recall@10 after the change {r}");

    // Removing over a fifth of the rows rebuilds the graph from the live rows.
    let mut changed = changed;
    let dir2 = tmp.path().join(dense_dir_name(2));
    changed.write(&dir2).unwrap();
    let reopened = DenseIndex::open(&dir2, dim)
        .unwrap()
        .with_policy(hnsw_policy());
    let many: Vec<String> = (0..300).map(|d| format!("doc{d}")).collect();
    let smaller = reopened.changed(&many, Vec::new(), &[]).unwrap();
    let graph = smaller.graph().unwrap();
    assert_eq!(graph.points(), graph.live());
    assert_eq!(smaller.len(), 4032 - (300 - 2) * 4);

    // Removing every row leaves an empty index without a graph, which still writes; adding
    // rows builds the graph again.
    let mut smaller = smaller;
    let dir3 = tmp.path().join(dense_dir_name(3));
    smaller.write(&dir3).unwrap();
    let every: Vec<String> = smaller.rows().iter().map(|r| r.doc_id.clone()).collect();
    let mut empty = DenseIndex::open(&dir3, dim)
        .unwrap()
        .with_policy(hnsw_policy())
        .changed(&every, Vec::new(), &[])
        .unwrap();
    assert!(empty.is_empty() && empty.graph().is_none());
    empty.write(&tmp.path().join(dense_dir_name(4))).unwrap();
    let (rows, vectors) = clustered(10, dim, 5, 5);
    let refilled = empty.changed(&[], rows, &vectors).unwrap();
    assert_eq!(refilled.graph().map(|g| g.live()), Some(10));

    // The exact policy keeps no graph.
    let exact = smaller
        .with_policy(VectorPolicy {
            mode: VectorMode::Exact,
            ..VectorPolicy::default()
        })
        .changed(&[], Vec::new(), &[])
        .unwrap();
    assert!(exact.graph().is_none());
}

#[test]
fn a_damaged_graph_is_a_corrupt_index_naming_the_file() {
    let dim = 16;
    let (rows, vectors) = clustered(300, dim, 10, 3);
    let mut index = DenseIndex::empty(dim)
        .with_policy(hnsw_policy())
        .changed(&[], rows, &vectors)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(dense_dir_name(1));
    index.write(&dir).unwrap();
    let graph_file = dir.join("hnsw.hnsw.graph");
    let mut raw = std::fs::read(&graph_file).unwrap();
    let middle = raw.len() / 2;
    raw[middle] ^= 0x55;
    std::fs::write(&graph_file, &raw).unwrap();
    match DenseIndex::open(&dir, dim) {
        Err(e @ RagError::CorruptVectors { .. }) => {
            assert!(e.to_string().contains("hnsw.hnsw.graph"), "{e}")
        }
        other => panic!("expected a corrupt index, got {other:?}"),
    }
    // A truncated data file likewise.
    std::fs::write(&graph_file, {
        raw[middle] ^= 0x55;
        &raw
    })
    .unwrap();
    DenseIndex::open(&dir, dim).unwrap();
    let data_file = dir.join("hnsw.hnsw.data");
    let data = std::fs::read(&data_file).unwrap();
    std::fs::write(&data_file, &data[..data.len() - 7]).unwrap();
    let e = DenseIndex::open(&dir, dim).unwrap_err();
    assert!(e.to_string().contains("hnsw.hnsw.data"), "{e}");
}

fn build(corpus: &Path, out: &Path, model: &Path, vectors: VectorPolicy) {
    build_index(&BuildOptions {
        inputs: vec![corpus.to_string_lossy().into_owned()],
        out: out.to_path_buf(),
        chunking: ChunkConfig {
            max_tokens: 62,
            overlap_tokens: 7,
        },
        tokenizer: None,
        embedder: Some(model.to_path_buf()),
        vectors,
        on_error: OnError::Fail,
        force: false,
    })
    .unwrap();
}

#[test]
fn an_hnsw_index_answers_as_the_exact_one_and_follows_add_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    copy_dir(&root().join("fixtures/bert/tiny"), &model);
    let corpus = tmp.path().join("corpus.jsonl");
    let squad =
        std::fs::read_to_string(root().join("datasets/rag/squad_v2_complexity/corpus.jsonl"))
            .unwrap();
    std::fs::write(&corpus, &squad).unwrap();
    let exact_dir = tmp.path().join("exact");
    let hnsw_dir = tmp.path().join("hnsw");
    build(&corpus, &exact_dir, &model, VectorPolicy::default());
    build(&corpus, &hnsw_dir, &model, hnsw_policy());
    let exact = RagIndex::open(&exact_dir).unwrap();
    let mut hnsw = RagIndex::open(&hnsw_dir).unwrap();
    let m = hnsw.manifest().dense.clone().unwrap();
    assert_eq!((m.search, m.policy), (VectorSearch::Hnsw, hnsw_policy()));
    assert_eq!(
        exact.manifest().dense.as_ref().unwrap().search,
        VectorSearch::Exact
    );
    let dense = SearchOptions {
        mode: SearchMode::Dense,
        candidates: 5,
        ..SearchOptions::default()
    };
    let ids = |index: &RagIndex, q: &str| -> Vec<String> {
        let hits = index.search_with(q, 5, &dense).unwrap();
        hits.into_iter().map(|h| h.chunk.id).collect()
    };
    // A few hundred rows: the graph's search reaches every row, so the rankings are equal.
    for q in [
        "What is a Turing machine?",
        "Which complexity class contains problems solvable in polynomial time?",
        "Who proposed the Cook-Levin theorem?",
    ] {
        assert_eq!(ids(&hnsw, q), ids(&exact, q), "{q}");
    }

    let fresh = "Zorblat tokens were introduced by the Quillon consortium in 2026.";
    hnsw.add(&[Document {
        id: "zorblat".into(),
        title: "Zorblat".into(),
        source: "test".into(),
        text: fresh.into(),
    }])
    .unwrap();
    let m = hnsw.manifest().dense.clone().unwrap();
    assert_eq!(
        (m.search, m.dir.as_str()),
        (VectorSearch::Hnsw, "dense-000002")
    );
    assert_eq!(ids(&hnsw, fresh)[0], "zorblat#0");
    let reopened = RagIndex::open(&hnsw_dir).unwrap();
    assert_eq!(ids(&reopened, fresh)[0], "zorblat#0");
    hnsw.remove(&["zorblat".into()]).unwrap();
    assert!(!ids(&hnsw, fresh).contains(&"zorblat#0".to_string()));
    let reopened = RagIndex::open(&hnsw_dir).unwrap();
    assert!(!ids(&reopened, fresh).contains(&"zorblat#0".to_string()));
    assert_eq!(
        ids(&reopened, "What is a Turing machine?"),
        ids(&exact, "What is a Turing machine?")
    );
}
