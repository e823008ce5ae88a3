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

/// A server with runtime loading enabled on a fresh adapters directory.
fn runtime_loading_config(adapters_dir: &std::path::Path) -> hone_serve::ServeConfig {
    let mut config = stories_config();
    config.adapters_dir = Some(adapters_dir.to_path_buf());
    config.allow_runtime_lora = true;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    // One folder down, so that `model: x` does not find it by name.
    let adapters = stories_adapters(&dir.path().join("runs"), &["x", "x2"]);
    let server = start(runtime_loading_config(dir.path())).await;
    let prompt = "Once upon a time";
    let r = server
        .post("/v1/completions", json!({"model": "x", "prompt": prompt}))
        .await;
    assert_eq!(r.status, 404);
    // lora_path relative to the adapters directory.
    let r = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "runs/x"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Loading the same adapter again (here by its absolute path) is a no-op; another path
    // under the same name is refused.
    let path = adapters[0].1.display().to_string();
    let again = json!({"lora_name": "x", "lora_path": path});
    assert_eq!(
        server.post("/v1/load_lora_adapter", again).await.status,
        200
    );
    let other = json!({"lora_name": "x", "lora_path": "runs/x2"});
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
    // A folder of the adapters directory that is not a valid adapter is a 400 naming
    // lora_path, with the details (it is inside the directory).
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{\"r\": ").unwrap();
    let bad = json!({"lora_name": "y", "lora_path": "broken"});
    let r = server.post("/v1/load_lora_adapter", bad).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r).0.as_deref(), Some("lora_path"));
    assert!(r.text().contains("adapter_config.json"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_adapter_endpoints_are_forbidden_unless_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = stories_adapters(dir.path(), &["x"]);
    let mut config = stories_config();
    // Even with an adapters directory, loading by path needs the opt-in.
    config.adapters_dir = Some(dir.path().to_path_buf());
    let server = start(config).await;
    for (endpoint, body) in [
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": adapters[0].1.display().to_string()}),
        ),
        ("/v1/unload_lora_adapter", json!({"lora_name": "x"})),
    ] {
        let r = server.post(endpoint, body).await;
        assert_eq!(r.status, 403, "{endpoint}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(v["error"]["code"], "runtime_lora_disabled");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--allow-runtime-lora"),
            "{v}"
        );
    }
    assert!(server.get("/v1/models").await.text().contains("\"x\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_loads_are_confined_to_the_adapters_dir_and_reveal_nothing_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    stories_adapters(&root.join("team"), &["inside"]);
    let outside = stories_adapters(tmp.path(), &["outside"]);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside[0].1, root.join("escape")).unwrap();
    let server = start(runtime_loading_config(&root)).await;
    let outside_path = outside[0].1.display().to_string();
    let mut answers = Vec::new();
    for path in [
        "/etc",
        "/etc/passwd",
        "/nonexistent/adapter",
        outside_path.as_str(),
        "../outside",
        "team/../../outside",
        "escape",
        "team",
        "missing",
    ] {
        let r = server
            .post(
                "/v1/load_lora_adapter",
                json!({"lora_name": "probe", "lora_path": path}),
            )
            .await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(error_of(&r).0.as_deref(), Some("lora_path"), "{path}");
        answers.push(r.text());
    }
    // One answer for all: nothing tells an existing file from a missing one.
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:#?}");
    for leak in ["passwd", "etc", "adapter_config", "directory does", "line"] {
        assert!(!answers[0].contains(leak), "{leak}: {}", answers[0]);
    }
    assert!(server.get("/v1/models").await.json().unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"] != "probe" && m["id"] != "escape"));
    // Inside: by relative and by absolute path.
    let inside = json!({"lora_name": "inside", "lora_path": "team/inside"});
    let r = server.post("/v1/load_lora_adapter", inside).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let absolute = root.join("team/inside").display().to_string();
    let r = server
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "inside2", "lora_path": absolute}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        server.complete("inside", "Once", 4).await.1["model"],
        "inside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_names_with_invisible_or_look_alike_characters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    stories_adapters(dir.path(), &["math", "math\u{200B}", "m\u{0430}th"]);
    let server = start(runtime_loading_config(dir.path())).await;
    // The adapters directory: look-alike folders are skipped.
    let v = server.get("/v1/models").await.json().unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories260k", "math"]);
    let r = server
        .post(
            "/v1/completions",
            json!({"model": "math\u{200B}", "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status, 404);
    // The runtime endpoint: 400 naming lora_name.
    for name in [
        "math\u{200B}",
        "m\u{0430}th2",
        "tab\tname",
        ".hidden",
        "a/b",
    ] {
        let r = server
            .post(
                "/v1/load_lora_adapter",
                json!({"lora_name": name, "lora_path": "math"}),
            )
            .await;
        assert_eq!(r.status, 400, "{name:?}: {}", r.text());
        assert_eq!(error_of(&r).0.as_deref(), Some("lora_name"), "{name:?}");
    }
    // --adapter NAME=DIR: refused before loading.
    let mut config = stories_config();
    config.adapters = vec![("math\u{200B}".into(), dir.path().join("math"))];
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("adapter name"), "{err}");
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
    let runtime_dir = dir.path().join("runtime");
    std::fs::create_dir(&runtime_dir).unwrap();
    let mut config = runtime_loading_config(&runtime_dir);
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
    stories_adapters(&runtime_dir, &["y"]);
    let load = json!({"lora_name": "y", "lora_path": "y"});
    let r = server.post("/v1/load_lora_adapter", load).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
