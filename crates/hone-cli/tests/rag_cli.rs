//! `hone rag index|add|remove|query` through the binary on the shipped SQuAD passages: ranked
//! JSON hits with citations, in-place freshness, and the errors a user sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn squad_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/rag/squad_v2_complexity/corpus.jsonl")
}

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the hone binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The error message of a run that failed cleanly (exit code 1, or 2 for a usage error).
fn failed(out: &Output) -> String {
    let code = out.status.code();
    assert!(
        matches!(code, Some(1 | 2)),
        "exit {code:?}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn query_json(index: &Path, question: &str, k: &str) -> Vec<serde_json::Value> {
    let out = ok(&run(hone()
        .args(["rag", "query"])
        .arg(index)
        .args([question, "-k", k, "--json"])));
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn rag_index_query_add_remove_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("idx");
    let out = ok(&run(hone()
        .args(["rag", "index", "--docs"])
        .arg(squad_corpus())
        .arg("--out")
        .arg(&index)));
    assert!(
        out.starts_with("indexed 48 documents as 49 chunks (0 skipped)"),
        "{out}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(index.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["embedder"], serde_json::Value::Null);
    assert_eq!(manifest["chunking"]["max_tokens"], 256);
    assert_eq!(manifest["documents"], 48);

    let hits = query_json(
        &index,
        "What is the most commonly used model in complexity theory?",
        "3",
    );
    assert_eq!(hits.len(), 3);
    let top = &hits[0];
    for key in [
        "id",
        "doc_id",
        "score",
        "text",
        "title",
        "source",
        "start_byte",
        "end_byte",
        "start_char",
        "end_char",
    ] {
        assert!(!top[key].is_null(), "missing {key}: {top}");
    }
    assert_eq!(top["rank"], 1);
    assert!(top["id"]
        .as_str()
        .unwrap()
        .starts_with(top["doc_id"].as_str().unwrap()));
    assert!(top["source"].as_str().unwrap().contains("corpus.jsonl:"));
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");

    let text = ok(&run(hone()
        .args(["rag", "query"])
        .arg(&index)
        .arg("Turing machine")));
    assert!(
        text.starts_with("1. Computational_complexity_theory#"),
        "{text}"
    );

    let new = tmp.path().join("notes.md");
    std::fs::write(
        &new,
        "# Zebrafish\n\nZebrafish regrow their fins within weeks.\n",
    )
    .unwrap();
    let out = ok(&run(hone()
        .args(["rag", "add"])
        .arg(&index)
        .arg("--docs")
        .arg(&new)));
    assert!(out.contains("added 1 and replaced 0 documents"), "{out}");
    assert!(out.contains("49 documents"), "{out}");
    let hits = query_json(&index, "how fast do zebrafish regrow fins", "1");
    let doc_id = hits[0]["doc_id"].as_str().unwrap().to_string();
    assert_eq!(doc_id, new.to_string_lossy());
    assert_eq!(hits[0]["title"], "Zebrafish");

    let out = ok(&run(hone()
        .args(["rag", "remove"])
        .arg(&index)
        .args(["--id", &doc_id])));
    assert!(out.contains("removed 1 documents (1 chunks)"), "{out}");
    assert!(query_json(&index, "zebrafish", "5").is_empty());
}

#[test]
fn rag_errors_name_the_path_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let err = failed(&run(hone()
        .args(["rag", "query"])
        .arg(&missing)
        .arg("anything")));
    assert!(
        err.contains("no such index directory") && err.contains("missing"),
        "{err}"
    );

    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let err = failed(&run(hone()
        .args(["rag", "index", "--docs"])
        .arg(squad_corpus())
        .arg("--out")
        .arg(&busy)));
    assert!(err.contains("--force") && err.contains("busy"), "{err}");
    assert!(busy.join("keep.txt").is_file());

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"fine\"}\n{\"id\": \"b\"}\n",
    )
    .unwrap();
    let out_dir = tmp.path().join("idx");
    let err = failed(&run(hone()
        .args(["rag", "index", "--docs"])
        .arg(&bad)
        .arg("--out")
        .arg(&out_dir)));
    assert!(
        err.contains("bad.jsonl:2:") && err.contains("missing field `text`"),
        "{err}"
    );
    assert!(!out_dir.exists());
    let out = run(hone()
        .args(["rag", "index", "--on-error", "skip", "--docs"])
        .arg(&bad)
        .arg("--out")
        .arg(&out_dir));
    assert!(ok(&out).contains("indexed 1 documents as 1 chunks (1 skipped)"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped: "));

    let err = failed(&run(hone()
        .args(["rag", "remove"])
        .arg(&out_dir)
        .args(["--id", "nope"])));
    assert!(err.contains("no document with id `nope`"), "{err}");
    let err = failed(&run(hone()
        .args(["rag", "query"])
        .arg(&out_dir)
        .args(["x", "-k", "0"])));
    assert!(err.contains("-k"), "{err}");
}
