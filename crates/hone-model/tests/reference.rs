//! hone-model against reference values produced by other implementations: Karpathy's
//! stories260K (numpy / llama2.c golden values) and the transformers 5.23 + PEFT fixtures.

use hone_model::Input;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::{
    generate, load_model_dir, CausalLm, Cpu, GenerateConfig, KvCache, LoadOptions, ModelConfig,
    SamplingConfig, WeightStore,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories() -> PathBuf {
    root().join("checkpoints/base/stories260k")
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/peft").join(name)
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(stories().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_tensor(
    ids: &[i64],
    batch: usize,
    device: &burn::tensor::Device<Cpu>,
) -> Tensor<Cpu, 2, Int> {
    let seq = ids.len() / batch;
    Tensor::from_data(TensorData::new(ids.to_vec(), [batch, seq]), device)
}

fn to_vec(t: Tensor<Cpu, 3>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Loads `refs/<file>` tensor `name` as f32 with its shape.
fn reference(dir: &Path, file: &str, name: &str) -> (Vec<f32>, Vec<usize>) {
    let store = WeightStore::open_files(&[dir.join("refs").join(file)]).unwrap();
    let shape = store.shape(name).unwrap();
    (store.load_f32(name, &shape).unwrap(), shape)
}

fn reference_ids(dir: &Path, file: &str, name: &str) -> (Vec<i64>, Vec<usize>) {
    let store = WeightStore::open_files(&[dir.join("refs").join(file)]).unwrap();
    store.load_i64(name).unwrap()
}

#[test]
fn stories260k_greedy_generation_from_bos_matches_golden_ids() {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let golden = golden();
    let expected: Vec<u32> = golden["greedy_from_bos_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let prompt = loaded.tokenizer.encode_prompt("").unwrap();
    assert_eq!(
        prompt,
        vec![expected[0]],
        "an empty prompt starts from BOS alone"
    );
    let config = GenerateConfig {
        max_new_tokens: expected.len() - 1,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![],
    };
    let mut streamed = String::new();
    let out = generate(&loaded.model, &loaded.tokenizer, &prompt, &config, |t| {
        streamed.push_str(t)
    })
    .unwrap();
    assert_eq!(out.ids, expected[1..].to_vec());
    assert_eq!(out.text, golden["greedy_from_bos_text"].as_str().unwrap());
    assert_eq!(streamed, out.text, "streamed pieces add up to the text");
}

#[test]
fn stories260k_prompt_logits_match_golden() {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let golden = golden();
    let prompt_ids: Vec<u32> = loaded
        .tokenizer
        .encode_prompt(golden["prompt"].as_str().unwrap())
        .unwrap();
    let expected_ids: Vec<u32> = golden["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prompt_ids, expected_ids, "tokenization of the prompt");
    let ids: Vec<i64> = prompt_ids.iter().map(|&i| i as i64).collect();
    let logits = loaded
        .model
        .forward(Input::new(ids_tensor(&ids, 1, &device)).last_logits());
    let logits = logits.into_data().to_vec::<f32>().unwrap();
    let first8: Vec<f32> = golden["last_position_logits_first8"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let diff = max_abs_diff(&logits[..8], &first8);
    assert!(
        diff < 1e-4,
        "first 8 logits differ by {diff}: {:?} vs {first8:?}",
        &logits[..8]
    );
    assert_eq!(
        hone_model::generate::argmax(&logits) as u64,
        golden["last_position_argmax"].as_u64().unwrap()
    );
}

#[test]
fn stories260k_mean_nll_of_reference_sentence_matches_golden() {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let golden = golden();
    let ids = loaded
        .tokenizer
        .encode_prompt(golden["nll_reference_sentence"].as_str().unwrap())
        .unwrap();
    let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let logits = to_vec(
        loaded
            .model
            .forward(Input::new(ids_tensor(&ids64, 1, &device))),
    );
    let vocab = loaded.model.config().vocab_size;
    let mut total = 0.0f64;
    for t in 0..ids.len() - 1 {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[ids[t + 1] as usize] as f64;
    }
    let nll = total / (ids.len() - 1) as f64;
    let expected = golden["nll_mean"].as_f64().unwrap();
    assert!(
        (nll - expected).abs() < 1e-3,
        "mean NLL {nll} vs {expected}"
    );
}

fn check_base_logits(name: &str, config_file: &str) {
    let dir = fixture(name);
    let device = Default::default();
    let config = ModelConfig::from_file(&dir.join(config_file)).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    let (model, report) =
        CausalLm::<Cpu>::from_store(&config, &store, &device, LoadOptions::default()).unwrap();
    assert!(
        report.unused.is_empty(),
        "unused tensors: {:?}",
        report.unused
    );
    let (ids, shape) = reference_ids(&dir, "inputs.safetensors", "input_ids");
    let logits = to_vec(model.forward(Input::new(ids_tensor(&ids, shape[0], &device))));
    let (expected, eshape) = reference(&dir, "logits_base.safetensors", "logits");
    assert_eq!(eshape, vec![shape[0], shape[1], config.vocab_size]);
    let diff = max_abs_diff(&logits, &expected);
    assert!(
        diff < 1e-4,
        "{name} ({config_file}): base logits differ by {diff}"
    );
}

#[test]
fn llama_gqa_base_logits_match_transformers() {
    check_base_logits("llama_gqa", "config.json");
}

#[test]
fn qwen2_tied_base_logits_match_transformers() {
    check_base_logits("qwen2_tied", "config.json");
}

#[test]
fn v4_style_config_gives_the_same_model_as_v5_style() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let dir = fixture(name);
        let v5 = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let v4 = ModelConfig::from_file(&dir.join("refs/config_v4_style.json")).unwrap();
        assert_eq!(v4, v5, "{name}: resolved configs differ");
        check_base_logits(name, "refs/config_v4_style.json");
    }
}

#[test]
fn tokenization_matches_transformers() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let dir = fixture(name);
        let tokenizer = hone_model::Tokenizer::from_dir(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("refs/tokenization.json")).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in cases.as_array().unwrap() {
            let input = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = tokenizer.encode(input).unwrap();
            assert_eq!(ids, expected, "{name}: ids of {input:?}");
            let tokens: Vec<String> = ids
                .iter()
                .map(|&i| tokenizer.id_to_token(i).unwrap())
                .collect();
            let expected_tokens: Vec<String> = case["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            assert_eq!(tokens, expected_tokens, "{name}: tokens of {input:?}");
            if let Some(decoded) = case.get("decoded").and_then(|d| d.as_str()) {
                let ours = tokenizer.decode(&ids).unwrap();
                assert_eq!(ours, decoded, "{name}: decoded {input:?}");
            }
        }
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward_position_by_position() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let dir = fixture(name);
        let device = Default::default();
        let loaded = load_model_dir::<Cpu>(&dir, &device, LoadOptions::default()).unwrap();
        let (ids, shape) = reference_ids(&dir, "inputs.safetensors", "input_ids");
        let (batch, seq) = (shape[0], shape[1]);
        let vocab = loaded.model.config().vocab_size;
        let full = to_vec(
            loaded
                .model
                .forward(Input::new(ids_tensor(&ids, batch, &device))),
        );
        // Prefill 5 positions, then one position at a time: into a cache that grows, and into
        // one that holds every position from the first write.
        let layers = loaded.model.config().num_layers;
        for (mut cache, reserved) in [
            (KvCache::new(layers), None),
            (KvCache::with_capacity(layers, seq + 40), Some(seq + 40)),
        ] {
            let all = ids_tensor(&ids, batch, &device);
            let mut pos = 0;
            while pos < seq {
                let step = if pos == 0 { 5 } else { 1 };
                let chunk = all.clone().narrow(1, pos, step);
                let logits = to_vec(loaded.model.forward(Input::new(chunk).cache(&mut cache)));
                for b in 0..batch {
                    for s in 0..step {
                        let ours = &logits[(b * step + s) * vocab..(b * step + s + 1) * vocab];
                        let at = (b * seq + pos + s) * vocab;
                        let diff = max_abs_diff(ours, &full[at..at + vocab]);
                        assert!(
                            diff < 1e-4,
                            "{name}: batch {b} position {}: cached logits differ by {diff}",
                            pos + s
                        );
                    }
                }
                pos += step;
            }
            assert_eq!(cache.len(), seq);
            if let Some(reserved) = reserved {
                assert_eq!(
                    cache.capacity(),
                    reserved,
                    "{name}: the reserved cache grew"
                );
            }
        }
    }
}

#[test]
fn stop_strings_cut_the_golden_story_and_streaming_never_shows_the_stop() {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let golden = golden();
    let story = golden["greedy_from_bos_text"].as_str().unwrap();
    let prompt_text = "Once upon a time";
    let continuation = &story[prompt_text.len()..];
    let stop = " named Lily";
    let expected = &continuation[..continuation.find(stop).unwrap()];
    let prompt = loaded.tokenizer.encode_prompt(prompt_text).unwrap();
    let config = GenerateConfig {
        max_new_tokens: 60,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![stop.to_string()],
    };
    let mut pieces = Vec::new();
    let out = generate(&loaded.model, &loaded.tokenizer, &prompt, &config, |t| {
        pieces.push(t.to_string())
    })
    .unwrap();
    assert_eq!(out.text, expected);
    assert_eq!(out.finish_reason, hone_model::FinishReason::Stop);
    assert_eq!(pieces.concat(), expected);
    assert!(pieces.iter().all(|p| !p.contains("named")), "{pieces:?}");

    // max_new_tokens ends with finish reason `length` and exactly that many ids.
    let config = GenerateConfig {
        max_new_tokens: 7,
        stop_strings: vec![],
        ..config
    };
    let out = generate(&loaded.model, &loaded.tokenizer, &prompt, &config, |_| {}).unwrap();
    assert_eq!(out.ids.len(), 7);
    assert_eq!(out.finish_reason, hone_model::FinishReason::Length);
    assert!(continuation.starts_with(&out.text), "{:?}", out.text);
}

#[test]
fn seeded_sampling_is_reproducible_and_differs_across_seeds() {
    let device = Default::default();
    let loaded = load_model_dir::<Cpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let prompt = loaded.tokenizer.encode_prompt("Once upon a time").unwrap();
    let run = |seed| {
        let config = GenerateConfig {
            max_new_tokens: 40,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_p: 0.95,
                top_k: 50,
                repetition_penalty: 1.1,
                seed,
            },
            stop_ids: vec![],
            stop_strings: vec![],
        };
        generate(&loaded.model, &loaded.tokenizer, &prompt, &config, |_| {})
            .unwrap()
            .ids
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
