//! Retrieval in chat requests (`--rag DIR`): the prompt is the one retrieval prompt of
//! `hone_rag::prompt` over the passages the index ranks for the last user message, the answer
//! carries `sources` (also in the first streamed chunk), the next request sees documents added
//! to the index by another handle, and retrieval time is in /metrics.

use std::path::Path;

use hone_rag::prompt::{self, Passage};
use hone_rag::{build_index, BuildOptions, Document, IndexUpdate, RagIndex};
use hone_serve::RagSettings;
use serde_json::{json, Value};

use crate::support::*;

const DOCS: [(&str, &str, &str); 4] = [
    (
        "owl",
        "The owl",
        "The old owl lived in the oak tree and hooted at the moon every night.",
    ),
    (
        "boat",
        "The boat",
        "Tom built a red boat and sailed it across the pond with his sister.",
    ),
    (
        "cake",
        "The cake",
        "Mia baked a chocolate cake for her mother and put candles on top.",
    ),
    (
        "kite",
        "The kite",
        "The wind lifted the yellow kite high above the hill near the school.",
    ),
];

/// A lexical index of [`DOCS`] in `dir/index`.
fn index(dir: &Path) -> std::path::PathBuf {
    let docs: String = DOCS
        .iter()
        .map(|(id, title, text)| json!({"id": id, "title": title, "text": text}).to_string() + "\n")
        .collect();
    let input = dir.join("docs.jsonl");
    std::fs::write(&input, docs).unwrap();
    let out = dir.join("index");
    build_index(&BuildOptions {
        inputs: vec![input.display().to_string()],
        out: out.clone(),
        chunking: Default::default(),
        tokenizer: None,
        embedder: None,
        vectors: Default::default(),
        on_error: hone_data::OnError::Fail,
        force: false,
    })
    .unwrap();
    out
}

fn rag_config(index: &Path, by_default: bool) -> hone_serve::ServeConfig {
    let mut config = stories_config();
    config.chat_template = Some("chatml".parse().unwrap());
    config.rag = Some(RagSettings {
        dir: index.to_path_buf(),
        k: 2,
        by_default,
    });
    config
}

fn chat(question: &str, rag: Value) -> Value {
    json!({
        "model": "stories260k",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "rag": rag,
    })
}

fn source_ids(v: &Value) -> Vec<String> {
    v["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources in {v}"))
        .iter()
        .map(|s| s["doc_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rag_request_answers_from_the_retrieval_prompt_and_lists_its_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = index(tmp.path());
    let server = start(rag_config(&dir, false)).await;
    let question = "Who baked the chocolate cake on the hill by the pond?";
    let r = server
        .post("/v1/chat/completions", chat(question, json!({"k": 3})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3, "{v}");
    assert_eq!(sources[0]["doc_id"], "cake", "the best match leads: {v}");
    for (i, s) in sources.iter().enumerate() {
        assert_eq!(s["index"], i + 1);
        let doc = DOCS.iter().find(|d| d.0 == s["doc_id"]).unwrap();
        assert_eq!(s["title"], doc.1);
        assert_eq!(s["text"], doc.2);
        assert_eq!(s["id"], format!("{}#0", doc.0));
        assert_eq!(s["start_char"], 0);
        assert_eq!(s["end_char"], doc.2.chars().count());
        assert!(s["score"].as_f64().unwrap() > 0.0);
    }
    assert!(v["choices"][0]["message"]["cited"].is_array());

    // The same conversation written out by the client with hone_rag::prompt: the same prompt
    // tokens and the same greedy answer, without retrieval.
    let passages: Vec<Passage> = sources
        .iter()
        .map(|s| Passage {
            id: s["id"].as_str().unwrap().into(),
            title: s["title"].as_str().unwrap().into(),
            text: s["text"].as_str().unwrap().into(),
        })
        .collect();
    let messages: Vec<Value> = prompt::messages(question, Some(&passages))
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let plain = server
        .post(
            "/v1/chat/completions",
            json!({"model": "stories260k", "messages": messages, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    let p = plain.json().unwrap();
    assert!(p.get("sources").is_none(), "no retrieval asked: {p}");
    assert_eq!(v["usage"]["prompt_tokens"], p["usage"]["prompt_tokens"]);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        p["choices"][0]["message"]["content"]
    );

    // Streamed: the sources come in the first chunk, the text is the same.
    let chunks = server
        .stream(
            "/v1/chat/completions",
            json!({"model": "stories260k", "messages": [{"role": "user", "content": question}],
                   "max_tokens": 8, "temperature": 0, "stream": true, "rag": {"k": 3}}),
        )
        .await;
    assert_eq!(source_ids(&chunks[0]), source_ids(&v));
    assert!(chunks[1..].iter().all(|c| c.get("sources").is_none()));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    let metrics = server.get("/metrics").await.text();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hone_retrieval_seconds_count "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(count, "2", "two requests retrieved");
    assert!(
        metrics.contains("hone_generation_seconds_count 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_added_to_the_index_are_retrieved_by_the_next_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = index(tmp.path());
    let server = start(rag_config(&dir, true)).await;
    let question = "What did the green frog find in the well?";
    let before = server
        .post("/v1/chat/completions", chat(question, Value::Null))
        .await;
    assert_eq!(before.status, 200, "{}", before.text());
    assert!(!source_ids(&before.json().unwrap()).contains(&"frog".to_string()));

    // Another handle (as `hone rag add` in another process) changes the index on disk.
    let mut writer = RagIndex::open(&dir).unwrap();
    writer
        .add(&[Document {
            id: "frog".into(),
            title: "The frog".into(),
            source: "test".into(),
            text: "The green frog found a golden ring at the bottom of the well.".into(),
        }])
        .unwrap();
    let after = server
        .post("/v1/chat/completions", chat(question, Value::Null))
        .await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(source_ids(&after.json().unwrap())[0], "frog");

    // `"rag": false` opts out of the server's default.
    let off = server
        .post("/v1/chat/completions", chat(question, json!(false)))
        .await;
    assert_eq!(off.status, 200, "{}", off.text());
    assert!(off.json().unwrap().get("sources").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rag_requests_get_openai_errors_naming_the_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = index(tmp.path());
    let server = start(rag_config(&dir, false)).await;
    for (rag, says) in [
        (json!({"k": 0}), "rag.k"),
        (json!({"k": 51}), "rag.k"),
        (json!({"k": "five"}), "rag.k"),
        (json!({"top": 3}), "rag.top"),
        (json!("yes"), "expected true, false"),
    ] {
        let r = server
            .post("/v1/chat/completions", chat("Who sailed?", rag.clone()))
            .await;
        assert_eq!(r.status, 400, "{rag}: {}", r.text());
        let (param, _) = error_of(&r);
        assert_eq!(param.as_deref(), Some("rag"), "{rag}");
        assert!(r.text().contains(says), "{rag}: {}", r.text());
    }
    let r = server
        .post(
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 2, "rag": {"k": 2}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r).0.as_deref(), Some("rag"));
    let r = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2,
                   "rag": true}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r).0.as_deref(), Some("messages"));

    // A server without an index says how to get one.
    let plain = start({
        let mut c = stories_config();
        c.chat_template = Some("chatml".parse().unwrap());
        c
    })
    .await;
    let r = plain
        .post("/v1/chat/completions", chat("Who sailed?", json!(true)))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("--rag DIR"), "{}", r.text());

    // A missing index directory is refused at start, naming it.
    let missing = tmp.path().join("nowhere");
    let e = match hone_serve::Server::bind(rag_config(&missing, false)).await {
        Ok(_) => panic!("a missing index must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("nowhere"), "{e}");
}
