//! Generation: text and usage, streaming, stop strings, and continuous batching.

use std::sync::atomic::Ordering;

use burn::backend::Flex;
use hone_model::{generate, load_model_dir, GenerateConfig, LoadOptions, SamplingConfig};
use serde_json::{json, Value};

use crate::support::*;

fn stream_text(chunks: &[Value], chat: bool) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            let choice = c["choices"].get(0)?;
            if chat {
                choice["delta"]["content"].as_str().map(str::to_string)
            } else {
                choice["text"].as_str().map(str::to_string)
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_matches_hone_generate_with_usage_and_length_finish() {
    let server = start(stories_config()).await;
    let prompt = "Once upon a time";
    let (text, v) = server.complete("stories260k", prompt, 12).await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "stories260k");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let usage = &v["usage"];
    let loaded =
        load_model_dir::<Flex>(&stories(), &Default::default(), LoadOptions::default()).unwrap();
    let ids = loaded.tokenizer.encode_prompt(prompt).unwrap();
    assert_eq!(usage["prompt_tokens"], ids.len());
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["total_tokens"], ids.len() + 12);
    let config = GenerateConfig {
        max_new_tokens: 12,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![],
    };
    let expected = generate(&loaded.model, &loaded.tokenizer, &ids, &config, |_| {}).unwrap();
    // One detokenizer (hone_model::detok) for generate, eval and serve: the same text.
    assert_eq!(text, expected.text);
    assert_eq!(text, ", there was a little girl named Lily. She");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_concatenate_to_the_non_streamed_text() {
    let mut config = stories_config();
    config.chat_template = Some("chatml".parse().unwrap());
    let server = start(config).await;
    let body = json!({"prompt": "Lily went to the park", "max_tokens": 20, "temperature": 0});
    let whole = server
        .post("/v1/completions", body.clone())
        .await
        .json()
        .unwrap();
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = server.stream("/v1/completions", streamed).await;
    assert!(chunks.len() > 2);
    assert_eq!(stream_text(&chunks, false), whole["choices"][0]["text"]);
    let last_choice = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(last_choice["finish_reason"], "length");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);

    let messages = json!([{"role": "user", "content": "Tell me a story."}]);
    let body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
    let whole = server
        .post("/v1/chat/completions", body.clone())
        .await
        .json()
        .unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/chat/completions", streamed).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        stream_text(&chunks, true),
        whole["choices"][0]["message"]["content"]
    );
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_cuts_the_text_before_it_and_finishes_with_stop() {
    let server = start(stories_config()).await;
    let prompt = "Once upon a time";
    let (full, _) = server.complete("stories260k", prompt, 40).await;
    // A word from the middle of the greedy text.
    let word = full
        .split_whitespace()
        .nth(4)
        .expect("enough words")
        .to_string();
    let cut = full.find(&word).unwrap();
    for stop in [json!(word.clone()), json!(["zzzz", word.clone()])] {
        let body = json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": stop});
        let v = server
            .post("/v1/completions", body.clone())
            .await
            .json()
            .unwrap();
        assert_eq!(v["choices"][0]["text"], full[..cut], "stop {stop}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let mut streamed = body;
        streamed["stream"] = json!(true);
        let chunks = server.stream("/v1/completions", streamed).await;
        assert_eq!(stream_text(&chunks, false), full[..cut]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_decode_in_one_batch_with_the_same_greedy_output_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = stories_config();
    config.adapters = stories_adapters(dir.path(), &["a", "b"]);
    let server = start(config).await;
    // 20 requests: more rows than hone-model's small-batch matmul path (16), mixed adapters,
    // prompts of equal length (prefilled together) and of different lengths.
    let prompts = [
        "Once upon a time",
        "The cat sat",
        "Tom and Lily",
        "One day, a little bird",
        "Sara had a red ball. She",
    ];
    let models = ["stories260k", "a", "b"];
    let cases: Vec<(&str, &str, usize)> = (0..20)
        .map(|i| (models[i % 3], prompts[i % 5], 16 + (i * 7) % 20))
        .collect();
    let mut alone = Vec::new();
    for (model, prompt, n) in &cases {
        alone.push(server.complete(model, prompt, *n).await.0);
    }
    let steps_before = server.metrics.decode_step.totals().0;
    let tokens_before = server.metrics.decode_tokens.load(Ordering::Relaxed);
    let together = futures_util::future::join_all(
        cases
            .iter()
            .map(|(model, prompt, n)| server.complete(model, prompt, *n)),
    )
    .await;
    for (i, ((text, _), expected)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(text, expected, "case {i} {:?}", cases[i]);
    }
    let steps = server.metrics.decode_step.totals().0 - steps_before;
    let tokens = server.metrics.decode_tokens.load(Ordering::Relaxed) - tokens_before;
    assert!(
        tokens as f64 / steps as f64 > 1.5,
        "requests were not batched: {tokens} tokens in {steps} steps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_differs_from_greedy() {
    let server = start(stories_config()).await;
    let body = |seed: u64| {
        json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0,
               "top_p": 0.95, "seed": seed})
    };
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let a = text(
        server
            .post("/v1/completions", body(7))
            .await
            .json()
            .unwrap(),
    );
    let b = text(
        server
            .post("/v1/completions", body(7))
            .await
            .json()
            .unwrap(),
    );
    let c = text(
        server
            .post("/v1/completions", body(8))
            .await
            .json()
            .unwrap(),
    );
    let (greedy, _) = server.complete("stories260k", "Once upon a time", 24).await;
    assert_eq!(a, b);
    assert!(a != c || a != greedy, "sampling looks greedy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_prompts_and_ignore_eos_give_exactly_max_tokens() {
    let server = start(stories_config()).await;
    let body = json!({"prompt": [1, 400, 30, 260], "max_tokens": 50, "temperature": 0,
                      "ignore_eos": true});
    let v = server.post("/v1/completions", body).await.json().unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 50);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_part_lists_and_null_content_are_served_as_text() {
    let mut config = stories_config();
    config.chat_template = Some("chatml".parse().unwrap());
    let server = start(config).await;
    let reply = |messages: Value| {
        let server = &server;
        async move {
            let body = json!({"messages": messages, "max_tokens": 12, "temperature": 0});
            let r = server.post("/v1/chat/completions", body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.json().unwrap()["choices"][0]["message"]["content"].clone()
        }
    };
    // Text parts are joined with "\n" (vLLM), `null` is empty: the same prompt as the strings.
    let parts = json!([
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": null},
        {"role": "user", "content": [{"type": "text", "text": "Tell me"},
                                     {"type": "text", "text": "a story."}]},
    ]);
    let strings = json!([
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Tell me\na story."},
    ]);
    assert_eq!(reply(parts).await, reply(strings).await);
    // Images, tools and functions are refused by name, not ignored.
    for (extra, param) in [
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": "Hi"}],
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "Hi"}],
                   "functions": [{"name": "f"}]}),
            "functions",
        ),
    ] {
        let r = server.post("/v1/chat/completions", extra.clone()).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(error_of(&r).0.as_deref(), Some(param), "{extra}");
    }
    let r = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url",
                   "image_url": {"url": "u"}}]}]}),
        )
        .await;
    assert!(r.text().contains("image_url"), "{}", r.text());
}

/// A GGUF model file serves where a model directory does: `fixtures/gguf/llama_gqa.gguf`
/// (`fixtures/peft/llama_gqa` converted as llama.cpp converts it) completes greedily as
/// `hone_model::generate` does on the same file, and a chat completion renders a built-in
/// template (the file has none) with the file's special tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_model_file_serves_completions_and_chat() {
    let path = repo_path("fixtures/gguf/llama_gqa.gguf");
    let mut config = hone_serve::ServeConfig::new(hone_serve::ModelSource::Dir(path.clone()));
    config.port = 0;
    config.chat_template = Some("chatml".parse().unwrap());
    let server = start(config).await;
    let models = server.get("/v1/models").await.json().unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let prompt = "hello world";
    let (text, _) = server.complete(&name, prompt, 8).await;
    let loaded =
        load_model_dir::<Flex>(&path, &Default::default(), LoadOptions::default()).unwrap();
    let ids = loaded.tokenizer.encode_prompt(prompt).unwrap();
    let config = GenerateConfig {
        max_new_tokens: 8,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![],
    };
    let expected = generate(&loaded.model, &loaded.tokenizer, &ids, &config, |_| {}).unwrap();
    assert_eq!(text.trim_start(), expected.text.trim_start());
    let r = server
        .post(
            "/v1/chat/completions",
            json!({"model": name, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Chunked prefill: a long prompt that arrives while other requests decode is prefilled a chunk
/// at a time in their decode steps, and every request answers exactly as when it is alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_arriving_during_decoding_is_prefilled_in_chunks_with_the_same_output() {
    let mut config = stories_config();
    config.limits.prefill_chunk = 16;
    let server = start(config).await;
    let long: Vec<u32> = (0..300).map(|i| 1 + (i * 37 + 11) % 500).collect();
    let body = |prompt: &[u32], n: usize| json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true});
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let steps = || server.metrics.prefill_steps.load(Ordering::Relaxed);

    // Alone: the whole prompt in one forward pass.
    let before = steps();
    let alone = text(
        server
            .post("/v1/completions", body(&long, 12))
            .await
            .json()
            .unwrap(),
    );
    assert_eq!(steps() - before, 1);

    // Eight requests decoding 480 tokens each; the long prompt arrives once they run.
    let running = futures_util::future::join_all(
        (0..8u32).map(|i| server.post("/v1/completions", body(&[1, 30 + i, 260], 480))),
    );
    let late = async {
        let generated = || server.metrics.generation_tokens.load(Ordering::Relaxed);
        let start = generated();
        assert!(eventually(|| generated() > start + 8).await);
        let before = steps();
        let v: Value = server
            .post("/v1/completions", body(&long, 12))
            .await
            .json()
            .unwrap();
        (text(v), steps() - before)
    };
    let (others, (together, chunks)) = tokio::join!(running, late);
    assert_eq!(together, alone);
    // The running requests decoded in the same forward passes as the long prompt's chunks
    // (rows of different lengths in one step): each answers as it does alone.
    for (i, r) in others.iter().enumerate() {
        assert_eq!(r.status, 200);
        let by_itself = server
            .post("/v1/completions", body(&[1, 30 + i as u32, 260], 480))
            .await;
        assert_eq!(
            text(r.json().unwrap()),
            text(by_itself.json().unwrap()),
            "request {i}"
        );
    }
    // 300 tokens in chunks of 16 while the others decode (any step after they finish takes the
    // rest at once).
    assert!(chunks >= 2, "the long prompt took {chunks} prefill passes");
}
