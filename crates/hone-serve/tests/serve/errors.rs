//! Limits and errors: every refusal is OpenAI's error JSON with the right status, and the server
//! keeps serving afterwards.

use std::sync::atomic::Ordering;

use hyper::Method;
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_on_v1_but_not_on_health_and_metrics() {
    let mut config = stories_config();
    config.api_key = Some("sekret".into());
    let server = start(config).await;
    let body = json!({"prompt": "Once", "max_tokens": 2});
    assert_eq!(
        server.post("/v1/completions", body.clone()).await.status,
        200
    );
    assert_eq!(server.get("/v1/models").await.status, 200);
    for key in [None, Some("wrong".to_string()), Some("sekret2".to_string())] {
        let client = server.client.clone().with_api_key(key.clone());
        let r = client.post_json("/v1/completions", &body).await.unwrap();
        assert_eq!(r.status, 401, "key {key:?}");
        let v = r.json().unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(client.get("/v1/models").await.unwrap().status, 401);
    }
    let anonymous = server.client.clone().with_api_key(None);
    assert_eq!(anonymous.get("/health").await.unwrap().status, 200);
    assert_eq!(anonymous.get("/metrics").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_api_key_with_surrounding_whitespace_still_matches() {
    // As from `HONE_API_KEY=" sekret\n"`: the client's key is trimmed, so is the server's.
    let mut config = stories_config();
    config.api_key = Some("  sekret \n".into());
    let server = start(config).await;
    let client = server.client.clone().with_api_key(Some("sekret".into()));
    assert_eq!(client.get("/v1/models").await.unwrap().status, 200);
    let wrong = server.client.clone().with_api_key(Some("sekre".into()));
    assert_eq!(wrong.get("/v1/models").await.unwrap().status, 401);
    // A key of only whitespace is refused at start rather than locking every client out.
    let mut config = stories_config();
    config.api_key = Some(" \t ".into());
    let err = hone_serve::Server::bind(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("api_key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_invalid_requests_get_openai_errors() {
    let mut config = stories_config();
    config.limits.max_body_bytes = 2048;
    config.limits.max_prompt_tokens = Some(64);
    let server = start(config).await;
    let raw = |body: &'static str| {
        let client = server.client.clone();
        async move {
            client
                .request(
                    Method::POST,
                    "/v1/completions",
                    Some(body.as_bytes().to_vec()),
                )
                .await
                .unwrap()
        }
    };
    // Malformed JSON.
    let r = raw("{\"prompt\": \"x\",").await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r).1, "invalid_request_error");
    let r = raw("[1, 2]").await;
    assert_eq!(r.status, 400);
    // A wrongly typed field is named.
    let r = server
        .post(
            "/v1/completions",
            json!({"prompt": "x", "temperature": "hot"}),
        )
        .await;
    assert_eq!(
        (r.status, error_of(&r).0.as_deref()),
        (400, Some("temperature"))
    );
    // Out-of-range and unsupported values.
    for (body, param) in [
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 100000}), "max_tokens"),
        (json!({"prompt": "x", "n": 3}), "n"),
        (json!({"prompt": "x", "logprobs": 2}), "logprobs"),
        (json!({"prompt": [1, 99999]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
    ] {
        let r = server.post("/v1/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(error_of(&r).0.as_deref(), Some(param), "{body}");
    }
    // Prompt over --max-prompt-tokens: 400 naming the prompt.
    let long = "Once upon a time there was a little girl. ".repeat(20);
    let r = server
        .post("/v1/completions", json!({"prompt": long, "max_tokens": 1}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json().unwrap()["error"]["code"],
        "context_length_exceeded"
    );
    // Body over --max-body-bytes: 413.
    let huge = "a".repeat(4096);
    let r = server
        .post("/v1/completions", json!({"prompt": huge}))
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json().unwrap()["error"]["code"], "request_too_large");
    // Unknown model, unknown route, wrong method.
    let r = server
        .post("/v1/completions", json!({"model": "nope", "prompt": "x"}))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["error"]["code"], "model_not_found");
    assert_eq!(server.get("/v1/nothing").await.status, 404);
    assert_eq!(server.get("/v1/completions").await.status, 405);
    // Chat without a template says how to get one.
    let r = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("--chat-template"), "{}", r.text());
    // Still serving.
    let (text, _) = server.complete("stories260k", "Once upon a time", 4).await;
    assert!(!text.is_empty());
    let metrics = server.get("/metrics").await.text();
    let needle = "hone_requests_total{endpoint=\"/v1/completions\",status=\"413\"} 1";
    assert!(metrics.contains(needle), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_disconnect_cancels_the_generation() {
    let mut config = stories_config();
    config.limits.max_batch = 1;
    config.limits.max_queue = 0;
    let server = start(config).await;
    let long = json!({"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let mut stream = server
        .client
        .post_sse("/v1/completions", &long)
        .await
        .unwrap();
    assert_eq!(stream.status, 200);
    assert!(stream.next_data().await.unwrap().is_some());
    let r = server
        .post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "queue_full");
    assert_eq!(
        server.metrics.rejected_queue_full.load(Ordering::Relaxed),
        1
    );
    // The client goes away: the worker drops the request and frees its place.
    drop(stream);
    let metrics = server.metrics.clone();
    assert!(eventually(|| metrics.cancelled.load(Ordering::Relaxed) == 1).await);
    let generated = metrics.generation_tokens.load(Ordering::Relaxed);
    assert!(
        generated < 500,
        "generation went on after the disconnect: {generated}"
    );
    // Its place is free again: the next request is answered (complete() checks the 200).
    server.complete("stories260k", "Hi", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_report_in_their_formats() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = stories_config();
    config.adapters = stories_adapters(dir.path(), &["a"]);
    let server = start(config).await;
    server.complete("a", "Once upon a time", 5).await;
    let health = server.get("/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json().unwrap()["status"], "ok");
    let r = server.get("/metrics").await;
    assert!(r.content_type.as_deref().unwrap().starts_with("text/plain"));
    let text = r.text();
    for needle in [
        "hone_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "hone_model_requests_total{model=\"a\"} 1",
        "hone_generation_tokens_total 5",
        "# TYPE hone_time_to_first_token_seconds histogram",
        "hone_request_latency_seconds_count 1",
        "hone_queue_depth 0",
        "hone_adapters_loaded 1",
        "hone_adapter_loaded{adapter=\"a\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}
