//! The dense half of an index: built with the tiny BERT fixture (`fixtures/bert/tiny`), changed
//! in place, checked against the embedder that built it; and dense/hybrid recall@5 on the
//! shipped SQuAD 2.0 and HotpotQA sets with the real all-MiniLM-L6-v2 (SKIPPED when it is not
//! fetched).

mod common;
use common::{copy_dir, root};

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use hone_data::OnError;
use hone_rag::{
    build_index, BuildOptions, ChunkConfig, Document, FusionConfig, IndexUpdate, OpenOptions,
    RagError, RagIndex, Retriever, SearchMode, SearchOptions, SentenceEmbedder,
};
use serde::Deserialize;

fn options(inputs: Vec<String>, out: &Path, embedder: &Path, max_tokens: usize) -> BuildOptions {
    BuildOptions {
        inputs,
        out: out.to_path_buf(),
        chunking: ChunkConfig {
            max_tokens,
            overlap_tokens: max_tokens / 8,
        },
        tokenizer: None,
        embedder: Some(embedder.to_path_buf()),
        vectors: Default::default(),
        on_error: OnError::Fail,
        force: false,
    }
}

const CORPUS: &str = r#"{"id": "turing", "title": "Turing machine", "text": "A Turing machine is a mathematical model of computation describing an abstract machine that manipulates symbols on a strip of tape."}
{"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}
{"id": "normans", "title": "Normans", "text": "The Normans conquered England in 1066 under William the Conqueror."}
"#;

fn dense(k: usize) -> SearchOptions {
    SearchOptions {
        mode: SearchMode::Dense,
        candidates: k,
        ..SearchOptions::default()
    }
}

#[test]
fn dense_index_follows_add_and_remove_and_ranks_a_chunk_first_for_its_own_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    copy_dir(&root().join("fixtures/bert/tiny"), &model);
    let corpus = tmp.path().join("corpus.jsonl");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = tmp.path().join("idx");
    let report = build_index(&options(
        vec![corpus.to_string_lossy().into_owned()],
        &out,
        &model,
        62,
    ))
    .unwrap();
    // The tiny vocabulary spells rare words by characters: the Turing text takes two chunks.
    assert_eq!((report.documents, report.chunks), (3, 4));

    let mut index = RagIndex::open(&out).unwrap();
    let m = index.manifest().clone();
    let dense_m = m.dense.clone().expect("a dense manifest");
    assert_eq!(m.embedder.as_deref(), Some("tiny"));
    assert_eq!(dense_m.dim, 32);
    assert_eq!(dense_m.dir, "dense-000001");
    // Chunking counted the embedder's tokens: its tokenizer was copied into the index.
    assert!(out.join("tokenizer.json").is_file());

    // A chunk's own text embeds to its stored vector: cosine 1, ranked first.
    let embedder = SentenceEmbedder::load(&model).unwrap();
    for (id, text) in [
        (
            "paris#0",
            "Paris is the capital and largest city of France.",
        ),
        (
            "normans#0",
            "The Normans conquered England in 1066 under William the Conqueror.",
        ),
    ] {
        let hits = index.search_with(text, 3, &dense(3)).unwrap();
        assert_eq!(hits[0].chunk.id, id);
        assert!((hits[0].score - 1.0).abs() < 1e-5, "{}", hits[0].score);
        let want = embedder.embed(&[text, &hits[1].chunk.text]).unwrap();
        let cos: f32 = want
            .row(0)
            .iter()
            .zip(want.row(1))
            .map(|(a, b)| a * b)
            .sum();
        assert!(
            (hits[1].score - cos).abs() < 1e-5,
            "{} vs {cos}",
            hits[1].score
        );
    }
    // Hybrid: both rankings put paris#0 first for its own text.
    let hybrid = index
        .search("Paris is the capital and largest city of France.", 2)
        .unwrap();
    assert_eq!(hybrid[0].chunk.id, "paris#0");
    let both = 2.0 / (hone_rag::RRF_K + 1.0);
    assert!((f64::from(hybrid[0].score) - both).abs() < 1e-6);
    // Weights apply: the dense ranking alone decides with weight 0 on BM25.
    let weighted = SearchOptions {
        fusion: FusionConfig {
            k: 60.0,
            weights: vec![0.0, 1.0],
        },
        ..SearchOptions::default()
    };
    let query = "capital city machine";
    let a: Vec<String> = index
        .search_with(query, 3, &weighted)
        .unwrap()
        .into_iter()
        .map(|h| h.chunk.id)
        .collect();
    let b: Vec<String> = index
        .search_with(query, 3, &dense(50))
        .unwrap()
        .into_iter()
        .map(|h| h.chunk.id)
        .collect();
    assert_eq!(a, b);

    // Add: the next query sees the new document; a new dense generation is named.
    let text = "Graphene is a single layer of carbon atoms arranged in a hexagonal lattice.";
    let report = index
        .add(&[Document {
            id: "graphene".into(),
            title: "Graphene".into(),
            source: "test".into(),
            text: text.into(),
        }])
        .unwrap();
    assert_eq!(report.chunks, 1);
    let reopened = RagIndex::open(&out).unwrap();
    assert_eq!(reopened.manifest().generation, 2);
    assert_eq!(
        reopened.manifest().dense.as_ref().unwrap().dir,
        "dense-000002"
    );
    let hits = reopened.search_with(text, 1, &dense(1)).unwrap();
    assert_eq!(hits[0].chunk.id, "graphene#0");

    // Remove: gone from both rankings; only the current and previous dense directories remain.
    index.remove(&["paris".into()]).unwrap();
    let reopened = RagIndex::open(&out).unwrap();
    let hits = reopened
        .search_with(
            "Paris is the capital and largest city of France.",
            10,
            &dense(10),
        )
        .unwrap();
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|h| h.chunk.doc_id != "paris"));
    let mut dirs: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dense-"))
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["dense-000002", "dense-000003"]);
}

#[test]
fn another_or_missing_embedder_is_an_error_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    copy_dir(&root().join("fixtures/bert/tiny"), &model);
    let other = tmp.path().join("tiny-other");
    copy_dir(&model, &other);
    let weights = other.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    let corpus = tmp.path().join("corpus.jsonl");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = tmp.path().join("idx");
    build_index(&options(
        vec![corpus.to_string_lossy().into_owned()],
        &out,
        &model,
        62,
    ))
    .unwrap();

    let with_other = OpenOptions {
        embedder: Some(other.clone()),
    };
    let e = RagIndex::open_with(&out, &with_other).err().unwrap();
    assert!(matches!(e, RagError::EmbedderMismatch { .. }), "{e}");
    let message = e.to_string();
    assert!(
        message.contains("`tiny`") && message.contains("`tiny-other`"),
        "{message}"
    );

    // The embedder moved away: an error naming it and where the manifest looked.
    let moved = tmp.path().join("moved");
    std::fs::rename(&model, &moved).unwrap();
    let e = RagIndex::open(&out).err().unwrap();
    assert!(matches!(e, RagError::MissingEmbedder { .. }), "{e}");
    assert!(e.to_string().contains("tiny"), "{e}");
    // ... and passing it where it now is works.
    let index = RagIndex::open_with(
        &out,
        &OpenOptions {
            embedder: Some(moved),
        },
    )
    .unwrap();
    assert_eq!(index.search("Paris", 1).unwrap().len(), 1);

    // Chunks longer than the embedder reads are refused before anything is written.
    let too_long = tmp.path().join("too-long");
    let e = build_index(&options(
        vec![corpus.to_string_lossy().into_owned()],
        &too_long,
        &other,
        63,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("max_tokens"), "{e}");
    assert!(!too_long.exists());
}

#[derive(Deserialize)]
struct Question {
    question: String,
    gold_passage_ids: Vec<String>,
}

fn questions(path: &Path) -> Vec<Question> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Recall@5 (any gold passage in the top 5) per search mode.
fn recall_at_5(index: &RagIndex, qs: &[Question], mode: SearchMode) -> f64 {
    let options = SearchOptions {
        mode,
        ..SearchOptions::default()
    };
    let found = qs
        .iter()
        .filter(|q| {
            let hits = index.search_with(&q.question, 5, &options).unwrap();
            let docs: HashSet<&str> = hits.iter().map(|h| h.chunk.doc_id.as_str()).collect();
            q.gold_passage_ids.iter().any(|g| docs.contains(g.as_str()))
        })
        .count();
    found as f64 / qs.len() as f64
}

#[test]
fn minilm_dense_and_hybrid_recall_at_5_on_the_shipped_sets() {
    let model = root().join("checkpoints/base/all-minilm-l6-v2");
    if !model.join("model.safetensors").is_file() {
        eprintln!(
            "SKIPPED: {} not fetched (scripts/fetch-models.sh minilm)",
            model.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("datasets/rag");
    // Measured (all-MiniLM-L6-v2, 254-token chunks, any gold passage in the top 5): SQuAD
    // bm25 0.940, dense 0.900, hybrid 0.971 (418 questions); HotpotQA 1.000 for all three (60
    // questions). Floors [bm25, dense, hybrid] catch a broken embedder, index or fusion.
    for (name, floors) in [
        ("squad_v2_complexity", [0.85, 0.85, 0.9]),
        ("hotpotqa_dev_distractor_60", [0.9, 0.9, 0.9]),
    ] {
        let out = tmp.path().join(name);
        let started = Instant::now();
        let report = build_index(&options(
            vec![data
                .join(name)
                .join("corpus.jsonl")
                .to_string_lossy()
                .into_owned()],
            &out,
            &model,
            254,
        ))
        .unwrap();
        let build = started.elapsed().as_secs_f64();
        let index = RagIndex::open(&out).unwrap();
        let qs = questions(&data.join(name).join("questions.jsonl"));
        let started = Instant::now();
        let recalls = [SearchMode::Lexical, SearchMode::Dense, SearchMode::Hybrid]
            .map(|mode| recall_at_5(&index, &qs, mode));
        let per_query = started.elapsed().as_secs_f64() * 1e3 / (3 * qs.len()) as f64;
        eprintln!(
            "{name}: recall@5 bm25 {:.3}, dense {:.3}, hybrid {:.3} ({} questions; {} chunks \
             embedded in {:.2} s = {:.0} chunks/s, build {build:.2} s, {per_query:.1} ms/query)",
            recalls[0],
            recalls[1],
            recalls[2],
            qs.len(),
            report.chunks,
            report.embed_seconds,
            report.chunks as f64 / report.embed_seconds,
        );
        for (recall, floor) in recalls.iter().zip(floors) {
            assert!(*recall >= floor, "{name}: recall@5 {recall:.3} < {floor}");
        }
    }
}
