//! Adapters per request: different outputs, run-time load/unload, the adapters directory, and a
//! merged model served as a base.

use burn::backend::Flex;
use hone_model::{generate, load_model_dir, GenerateConfig, LoadOptions, SamplingConfig};
use serde_json::json;

use crate::support::*;

/// Greedy text of stories260k with the adapter in `dir` attached as the model's own adapter
/// (hone-model's single-sequence path: the reference for the batched, per-row one).
fn reference_text(dir: &std::path::Path, prompt: &str, n: usize) -> String {
    let mut loaded =
        load_model_dir::<Flex>(&stories(), &Default::default(), LoadOptions::default()).unwrap();
    loaded.model.load_adapter(dir).unwrap();
    let ids = loaded.tokenizer.encode_prompt(prompt).unwrap();
    let config = GenerateConfig {
        max_new_tokens: n,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![],
    };
    generate(&loaded.model, &loaded.tokenizer, &ids, &config, |_| {})
        .unwrap()
        .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_chosen_per_request_give_different_outputs_and_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = stories_config();
    let adapters = stories_adapters(dir.path(), &["a", "b"]);
    config.adapters = adapters.clone();
    let server = start(config).await;
    let prompt = "Once upon a time";
    let base = server.complete("stories260k", prompt, 20).await.0;
    let a = server.complete("a", prompt, 20).await.0;
    let b = server.complete("b", prompt, 20).await.0;
    assert_ne!(base, a);
    assert_ne!(base, b);
    assert_ne!(a, b);
    // Each adapter, applied per row in the bank, computes what the model computes with that
    // adapter as its own.
    for ((_, path), served) in adapters.iter().zip([&a, &b]) {
        assert_eq!(
            served.trim_start(),
            reference_text(path, prompt, 20).trim_start()
        );
    }
    assert_eq!(server.complete("a", prompt, 20).await.0, a);
    let v = server.get("/v1/models").await.json().unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories260k", "a", "b"]);
    assert_eq!(v["data"][1]["parent"], "stories260k");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = stories_adapters(dir.path(), &["x"]);
    let server = start(stories_config()).await;
    let prompt = "Once upon a time";
    let r = server
        .post("/v1/completions", json!({"model": "x", "prompt": prompt}))
        .await;
    assert_eq!(r.status, 404);
    let path = adapters[0].1.display().to_string();
    let r = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": path}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Loading the same adapter again is a no-op; another path under the same name is refused.
    let again = json!({"lora_name": "x", "lora_path": path});
    assert_eq!(
        server.post("/v1/load_lora_adapter", again).await.status,
        200
    );
    let other = json!({"lora_name": "x", "lora_path": stories().display().to_string()});
    assert_eq!(
        server.post("/v1/load_lora_adapter", other).await.status,
        400
    );
    let base = server.complete("stories260k", prompt, 16).await.0;
    let x = server.complete("x", prompt, 16).await.0;
    assert_ne!(base, x);
    assert!(server
        .metrics
        .render()
        .contains("hone_adapter_loaded{adapter=\"x\"} 1"));
    let r = server
        .post("/v1/unload_lora_adapter", json!({"lora_name": "x"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post("/v1/completions", json!({"model": "x", "prompt": prompt}))
        .await;
    assert_eq!(r.status, 404);
    let r = server
        .post("/v1/unload_lora_adapter", json!({"lora_name": "x"}))
        .await;
    assert_eq!(r.status, 404);
    // A directory that is not an adapter of this model is a 400 naming lora_path.
    let bad = json!({"lora_name": "y", "lora_path": stories().display().to_string()});
    let r = server.post("/v1/load_lora_adapter", bad).await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r).0.as_deref(), Some("lora_path"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_dropped_into_the_adapters_dir_is_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = stories_config();
    config.adapters_dir = Some(dir.path().to_path_buf());
    let server = start(config).await;
    let body = json!({"model": "late", "prompt": "Once upon a time", "max_tokens": 8,
                      "temperature": 0});
    assert_eq!(
        server.post("/v1/completions", body.clone()).await.status,
        404
    );
    stories_adapters(dir.path(), &["late", "listed"]);
    let r = server.post("/v1/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["model"], "late");
    // Listing the models picks up the other new folder too.
    let v = server.get("/v1/models").await.json().unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories260k", "late", "listed"]);
    // Names cannot climb out of the directory.
    let escape = json!({"model": "../stories260k", "prompt": "x"});
    assert_eq!(server.post("/v1/completions", escape).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_model_directory_serves_like_base_plus_adapter() {
    let fixture = repo_path("fixtures/peft/llama_gqa");
    let merged = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join("merged").join(f), merged.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), merged.path().join(f)).unwrap();
    }
    let mut config = hone_serve::ServeConfig::new(hone_serve::ModelSource::Dir(fixture.clone()));
    config.port = 0;
    config.adapters = vec![("peft".into(), fixture.join("adapter"))];
    let with_adapter = start(config).await;
    let mut config =
        hone_serve::ServeConfig::new(hone_serve::ModelSource::Dir(merged.path().to_path_buf()));
    config.port = 0;
    config.served_model_name = Some("merged".into());
    let merged_server = start(config).await;
    let body = |model: &str| {
        json!({"model": model, "prompt": [5, 17, 300, 42, 7], "max_tokens": 12,
               "temperature": 0, "ignore_eos": true})
    };
    let text = |v: serde_json::Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let adapted = text(
        with_adapter
            .post("/v1/completions", body("peft"))
            .await
            .json()
            .unwrap(),
    );
    let base = text(
        with_adapter
            .post("/v1/completions", body("llama_gqa"))
            .await
            .json()
            .unwrap(),
    );
    let from_merged = text(
        merged_server
            .post("/v1/completions", body("merged"))
            .await
            .json()
            .unwrap(),
    );
    assert_eq!(adapted, from_merged);
    assert_ne!(
        adapted, base,
        "the fixture adapter should change the greedy text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_an_adapter_lets_its_running_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = stories_config();
    config.adapters = stories_adapters(dir.path(), &["x"]);
    config.limits.max_adapters = 1;
    let server = start(config).await;
    // Long enough (ignore_eos) to be still running when the unload arrives.
    let mut body = json!({"model": "x", "prompt": "Once upon a time", "max_tokens": 480,
                          "temperature": 0, "ignore_eos": true});
    let expected = server
        .post("/v1/completions", body.clone())
        .await
        .json()
        .unwrap();
    let expected = expected["choices"][0]["text"].as_str().unwrap().to_string();
    body["stream"] = json!(true);
    let mut stream = server
        .client
        .post_sse("/v1/completions", &body)
        .await
        .unwrap();
    assert_eq!(stream.status, 200);
    let first = stream.next_data().await.unwrap().unwrap();
    let r = server
        .post("/v1/unload_lora_adapter", json!({"lora_name": "x"}))
        .await;
    assert_eq!(r.status, 200);
    // New requests no longer find it, and its slot still counts against --max-adapters until
    // the running request ends.
    let r = server
        .post("/v1/completions", json!({"model": "x", "prompt": "Once"}))
        .await;
    assert_eq!(r.status, 404);
    let mut text: String = serde_json::from_str::<serde_json::Value>(&first).unwrap()["choices"][0]
        ["text"]
        .as_str()
        .unwrap()
        .to_string();
    for data in tokio::time::timeout(TIMEOUT, stream.collect_data())
        .await
        .unwrap()
        .unwrap()
    {
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(
        text, expected,
        "the running request kept its adapter to the end"
    );
    // Now the slot is free: another adapter fits under --max-adapters = 1.
    let other = stories_adapters(dir.path(), &["y"]);
    let load = json!({"lora_name": "y", "lora_path": other[0].1.display().to_string()});
    let r = server.post("/v1/load_lora_adapter", load).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
