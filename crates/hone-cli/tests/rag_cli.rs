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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn query_mode(index: &Path, question: &str, k: &str, mode: &str) -> Vec<serde_json::Value> {
    let out = ok(&run(hone()
        .args(["rag", "query"])
        .arg(index)
        .args([question, "-k", k, "--json", "--mode", mode])));
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// With `--embedder` (the tiny BERT fixture): the manifest names it, chunks are counted in its
/// tokens, a chunk's own text is its best dense match, hybrid fuses both rankings with the
/// given weights, add/remove update the dense part, and another embedder is refused.
#[test]
fn rag_with_an_embedder_searches_dense_and_hybrid_and_refuses_another_embedder() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bert/tiny");
    let model = tmp.path().join("tiny");
    copy_dir(&fixture, &model);
    let index = tmp.path().join("idx");
    let out = ok(&run(hone()
        .args(["rag", "index", "--docs"])
        .arg(squad_corpus())
        .arg("--out")
        .arg(&index)
        .arg("--embedder")
        .arg(&model)));
    assert!(out.starts_with("indexed 48 documents as "), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(index.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["embedder"], "tiny");
    assert_eq!(manifest["dense"]["embedder"]["name"], "tiny");
    assert_eq!(manifest["dense"]["dim"], 32);
    // The tiny model reads 64 tokens, two of them special.
    assert_eq!(manifest["chunking"]["max_tokens"], 62);
    assert_eq!(manifest["chunking"]["tokenization"]["kind"], "hugging_face");

    // A chunk's text is its own best dense match (cosine 1).
    let lexical = query_mode(&index, "Turing machine", "3", "lexical");
    let chunk_text = lexical[0]["text"].as_str().unwrap().to_string();
    let dense = query_mode(&index, &chunk_text, "3", "dense");
    assert_eq!(dense[0]["id"], lexical[0]["id"]);
    assert!((dense[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    // Hybrid (the default with an embedder): first in both rankings, so 2 / (60 + 1).
    let hybrid = query_json(&index, &chunk_text, "3");
    assert_eq!(hybrid[0]["id"], lexical[0]["id"]);
    assert!((hybrid[0]["score"].as_f64().unwrap() - 2.0 / 61.0).abs() < 1e-6);
    // Weight 0 on BM25: the dense order.
    let out = ok(&run(hone().args(["rag", "query"]).arg(&index).args([
        "complexity classes",
        "-k",
        "5",
        "--json",
        "--lexical-weight",
        "0",
    ])));
    let weighted: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    let dense: Vec<String> = query_mode(&index, "complexity classes", "5", "dense")
        .iter()
        .map(|h| h["id"].to_string())
        .collect();
    assert_eq!(weighted, dense);

    // Add and remove reach the dense ranking.
    let new = tmp.path().join("notes.md");
    let text = "Zebrafish regrow their fins within weeks.";
    std::fs::write(&new, format!("# Zebrafish\n\n{text}\n")).unwrap();
    ok(&run(hone()
        .args(["rag", "add"])
        .arg(&index)
        .arg("--docs")
        .arg(&new)));
    let hits = query_mode(
        &index,
        "# Zebrafish\n\nZebrafish regrow their fins within weeks.",
        "1",
        "dense",
    );
    assert_eq!(hits[0]["doc_id"], new.to_string_lossy().as_ref());
    ok(&run(hone()
        .args(["rag", "remove"])
        .arg(&index)
        .args(["--id", &new.to_string_lossy()])));
    let hits = query_mode(&index, text, "60", "dense");
    assert!(hits
        .iter()
        .all(|h| h["doc_id"] != new.to_string_lossy().as_ref()));

    // Another embedder: an error naming both, nothing printed on stdout.
    let other = tmp.path().join("other");
    copy_dir(&fixture, &other);
    let weights = other.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    let out = run(hone()
        .args(["rag", "query"])
        .arg(&index)
        .arg("complexity")
        .arg("--embedder")
        .arg(&other));
    let message = failed(&out);
    assert!(
        message.contains("`tiny`") && message.contains("`other`"),
        "{message}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn data_raft_writes_chat_examples_held_out_questions_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    // Copies, so that the "holds an input" case can never touch datasets/.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let set = data.join("corpus.jsonl");
    let questions = data.join("questions.jsonl");
    std::fs::copy(squad_corpus(), &set).unwrap();
    std::fs::copy(squad_corpus().with_file_name("questions.jsonl"), &questions).unwrap();
    let out = dir.path().join("raft");
    let args = |out: &Path| {
        let mut c = hone();
        c.args(["data", "raft", "--corpus"])
            .arg(&set)
            .arg("--questions")
            .arg(&questions)
            .arg("--out")
            .arg(out)
            .args(["-k", "3", "--seed", "7"]);
        c
    };
    let stdout = ok(&run(&mut args(&out)));
    assert!(stdout.contains("418 questions"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let r = &report["raft"];
    let train = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    let heldout = std::fs::read_to_string(out.join("heldout.jsonl")).unwrap();
    assert_eq!(
        train.lines().count() as u64,
        r["train_questions"].as_u64().unwrap()
    );
    assert_eq!(
        heldout.lines().count() as u64,
        r["heldout_questions"].as_u64().unwrap()
    );
    assert_eq!(
        r["train_questions"].as_u64().unwrap() + r["heldout_questions"].as_u64().unwrap(),
        418
    );
    for line in train.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let m = v["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[2]["role"], "assistant");
        // k = 3 passages shown.
        let user = m[1]["content"].as_str().unwrap();
        assert!(
            user.contains("\n[3] ") && !user.contains("\n[4] "),
            "{user}"
        );
    }
    for line in heldout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["question"].is_string() && v["gold_passage_ids"].is_array());
    }
    // The same command again replaces its own output; a directory of other files needs --force,
    // and one holding an input is never replaced.
    ok(&run(&mut args(&out)));
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let e = failed(&run(&mut args(&foreign)));
    assert!(e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
    let e = failed(&run(args(&data).arg("--force")));
    assert!(e.contains("holds the input"), "{e}");
    assert!(set.is_file() && questions.is_file());
}
