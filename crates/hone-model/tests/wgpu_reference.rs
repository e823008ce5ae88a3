//! The reference checks of `reference.rs`, `lora.rs` and `packed.rs` on burn's wgpu backend:
//! stories260k's golden logits and greedy story (llama2.c), the fixtures' base, adapter and
//! merged logits (transformers 5.23 + PEFT 0.21.2), the labelled batch's loss and every LoRA
//! gradient, the attention masks of packed and left-padded rows, and f16 weights. The fused CPU
//! kernels are Flex-only, so this runs the composition of burn operations that CUDA runs (its
//! dtype handling, masks and the non-fused attention: burn-cubecl's attention fallback, as no
//! autotune is compiled in), on a cubecl backend; CI runs it on Mesa's lavapipe (`.ci/run`).
//!
//! Tolerances: the CPU tests' own (logits 1e-4, loss 1e-5, gradients 1e-5 relative or 1e-7
//! absolute), although GPU-style matrix products and reductions sum in another order (tiles,
//! tree reductions). Measured on lavapipe: logits within 5e-6 (stories260k) and 4e-7
//! (fixtures), gradients within 5e-8 absolute. f16 weights: 5e-3, about five f16 roundings of
//! the logits' size (measured: 1e-3 from PEFT's f32, 9e-4 from the CPU's f16). The tests print
//! the worst values they saw.

mod common;
mod wgpu_common;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use common::{fixture, host, ids, model_with_adapter};
use hone_model::adapter::peft_key;
use hone_model::loss::causal_lm_loss;
use hone_model::{
    generate, load_model_dir, CausalLm, Cpu, GenerateConfig, Input, LoadOptions, ModelConfig,
    SamplingConfig, WeightStore,
};
use wgpu_common::{device, max_abs_diff, Wgpu};

const FIXTURES: [&str; 2] = ["llama_gqa", "qwen2_tied"];

fn stories() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../checkpoints/base/stories260k")
}

fn refs(name: &str, file: &str) -> WeightStore {
    WeightStore::open_files(&[fixture(name).join("refs").join(file)]).unwrap()
}

fn f32s(store: &WeightStore, key: &str) -> Vec<f32> {
    let shape = store.shape(key).unwrap();
    store.load_f32(key, &shape).unwrap()
}

/// The fixture's input ids and their batch size.
fn fixture_inputs(name: &str) -> (Vec<i64>, usize) {
    let (ids, shape) = refs(name, "inputs.safetensors")
        .load_i64("input_ids")
        .unwrap();
    (ids, shape[0])
}

fn base(name: &str) -> CausalLm<Wgpu> {
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open_dir(&dir).unwrap();
    CausalLm::from_store(&config, &store, &device(), LoadOptions::default())
        .unwrap()
        .0
}

fn fixture_logits(model: &CausalLm<Wgpu>, name: &str) -> Vec<f32> {
    let (tokens, batch) = fixture_inputs(name);
    host(model.forward(Input::new(ids(&tokens, batch))))
}

#[test]
fn stories260k_prompt_logits_and_greedy_story_match_golden_on_wgpu() {
    let device = device();
    let loaded = load_model_dir::<Wgpu>(&stories(), &device, LoadOptions::default()).unwrap();
    let text = std::fs::read_to_string(stories().join("golden.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let numbers = |key: &str| -> Vec<f64> {
        golden[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };

    let prompt = loaded
        .tokenizer
        .encode_prompt(golden["prompt"].as_str().unwrap())
        .unwrap();
    let tokens: Vec<i64> = prompt.iter().map(|&i| i as i64).collect();
    let logits = host(
        loaded
            .model
            .forward(Input::new(ids(&tokens, 1)).last_logits()),
    );
    let first8: Vec<f32> = numbers("last_position_logits_first8")
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let diff = max_abs_diff(&logits[..8], &first8);
    eprintln!("stories260k: first 8 prompt logits differ from llama2.c by {diff:e}");
    assert!(diff < 1e-4, "first 8 logits differ by {diff}");
    assert_eq!(
        hone_model::generate::argmax(&logits) as u64,
        golden["last_position_argmax"].as_u64().unwrap()
    );

    // Greedy decoding from BOS: the KV cache, one query at a time (the folded GQA path).
    let expected: Vec<u32> = numbers("greedy_from_bos_ids")
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let config = GenerateConfig {
        max_new_tokens: expected.len() - 1,
        sampling: SamplingConfig::default(),
        stop_ids: loaded.tokenizer.eos_ids.clone(),
        stop_strings: vec![],
    };
    let out = generate(
        &loaded.model,
        &loaded.tokenizer,
        &expected[..1],
        &config,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.ids, expected[1..].to_vec());
    assert_eq!(out.text, golden["greedy_from_bos_text"].as_str().unwrap());
}

#[test]
fn fixture_base_adapter_and_merged_logits_match_transformers_and_peft_on_wgpu() {
    let _ = device();
    for name in FIXTURES {
        let mut model = base(name);
        let expected = f32s(&refs(name, "logits_base.safetensors"), "logits");
        let diff = max_abs_diff(&fixture_logits(&model, name), &expected);
        eprintln!("{name}: base logits differ from transformers by {diff:e}");
        assert!(diff < 1e-4, "{name}: base logits differ by {diff}");

        model.load_adapter(&fixture(name).join("adapter")).unwrap();
        let unmerged = fixture_logits(&model, name);
        let expected = f32s(&refs(name, "logits_adapter.safetensors"), "logits");
        let diff = max_abs_diff(&unmerged, &expected);
        eprintln!("{name}: adapter logits differ from PEFT by {diff:e}");
        assert!(diff < 1e-4, "{name}: adapter logits differ by {diff}");

        model.merge_lora();
        assert_eq!(model.lora_parameter_count(), 0);
        let merged = fixture_logits(&model, name);
        let expected = f32s(&refs(name, "logits_merged.safetensors"), "logits");
        let diff = max_abs_diff(&merged, &expected);
        eprintln!("{name}: merged logits differ from PEFT's merge by {diff:e}");
        assert!(diff < 1e-4, "{name}: merged logits differ by {diff}");
        let diff = max_abs_diff(&merged, &unmerged);
        assert!(diff < 1e-4, "{name}: merged vs unmerged differ by {diff}");
    }
}

#[test]
fn loss_and_every_lora_gradient_match_peft_on_wgpu() {
    type Ad = Autodiff<Wgpu>;
    let _ = device();
    for name in FIXTURES {
        let model = model_with_adapter::<Ad>(name, |_| {});
        let batch = refs(name, "train_batch.safetensors");
        let (tokens, shape) = batch.load_i64("input_ids").unwrap();
        let (labels, _) = batch.load_i64("labels").unwrap();
        let logits = model.forward(Input::new(ids(&tokens, shape[0])));
        let loss = causal_lm_loss(logits, &labels).unwrap();
        let reference = refs(name, "lora_grads.safetensors");
        let expected = f32s(&reference, "loss")[0];
        let ours = host(loss.clone())[0];
        eprintln!("{name}: loss {ours} vs PEFT {expected}");
        assert!(
            (ours - expected).abs() < 1e-5,
            "{name}: loss {ours} vs PEFT {expected}"
        );

        let grads = loss.backward();
        let (mut checked, mut worst_rel, mut worst_abs) = (0, 0f32, 0f32);
        for (module, linear) in model.projections() {
            let lora = linear.lora().unwrap();
            for (which, param) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
                let key = peft_key(&module, which);
                let grad = param
                    .grad(&grads)
                    .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
                let grad = grad.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                let expected = f32s(&reference, &key);
                assert_eq!(grad.len(), expected.len(), "{name}: {key}");
                for (i, (g, e)) in grad.iter().zip(&expected).enumerate() {
                    let err = (g - e).abs();
                    worst_abs = worst_abs.max(err);
                    if e.abs() > 1e-3 {
                        worst_rel = worst_rel.max(err / e.abs());
                    }
                    assert!(
                        err <= 1e-7 || err <= 1e-5 * e.abs(),
                        "{name}: {key}[{i}]: {g} vs PEFT {e}"
                    );
                }
                checked += 1;
            }
        }
        eprintln!(
            "{name}: gradients: worst absolute error {worst_abs:e}, worst relative \
             (|g| > 1e-3) {worst_rel:e}"
        );
        assert_eq!(
            checked,
            reference.names().len() - 1,
            "{name}: every reference gradient checked"
        );
    }
}

#[test]
fn packed_and_left_padded_rows_match_the_rows_alone_on_wgpu() {
    let _ = device();
    // Examples of 5, 9 and 4 tokens (as packed.rs).
    let examples: [&[i64]; 3] = [
        &[509, 51, 441, 220, 435],
        &[509, 272, 74, 299, 295, 86, 77, 285, 78],
        &[509, 87, 220, 73],
    ];
    for name in FIXTURES {
        let m = model_with_adapter::<Wgpu>(name, |_| {});
        let vocab = m.config().vocab_size;
        let alone: Vec<Vec<f32>> = examples
            .iter()
            .map(|ex| host(m.forward(Input::new(ids(ex, 1)))))
            .collect();

        // Packed into one row of 20: segment masks (block-diagonal causal), restarting positions.
        let (mut row, mut pos, mut seg) = (Vec::new(), Vec::new(), Vec::new());
        for (i, ex) in examples.iter().enumerate() {
            row.extend_from_slice(ex);
            pos.extend(0..ex.len() as u32);
            seg.extend(std::iter::repeat_n(i as u32 + 1, ex.len()));
        }
        row.extend([511, 511]);
        pos.extend([0, 0]);
        seg.extend([0, 0]);
        let packed = host(m.forward(Input::new(ids(&row, 1)).packed(&pos, &seg)));
        let mut offset = 0;
        let mut worst = 0f32;
        for (ex, alone) in examples.iter().zip(&alone) {
            let at = offset * vocab;
            worst = worst.max(max_abs_diff(
                &packed[at..at + ex.len() * vocab],
                &alone[..ex.len() * vocab],
            ));
            offset += ex.len();
        }
        eprintln!("{name}: packed rows differ from the examples alone by {worst:e}");
        assert!(worst < 1e-4, "{name}: packed vs alone: {worst}");

        // Left-padded to 9 tokens in one batch: padding masks, positions from each row's start.
        let len = 9;
        let (mut tokens, mut positions, mut pads) = (Vec::new(), Vec::new(), Vec::new());
        for ex in examples {
            let pad = len - ex.len();
            tokens.extend(std::iter::repeat_n(0, pad));
            tokens.extend_from_slice(ex);
            positions.extend(std::iter::repeat_n(0, pad));
            positions.extend(0..ex.len() as u32);
            pads.push(pad);
        }
        let batch = examples.len();
        let padded = host(
            m.forward(
                Input::new(ids(&tokens, batch))
                    .positions(positions)
                    .left_padding(pads.clone()),
            ),
        );
        let mut worst = 0f32;
        for (r, (ex, alone)) in examples.iter().zip(&alone).enumerate() {
            let at = (r * len + pads[r]) * vocab;
            worst = worst.max(max_abs_diff(
                &padded[at..at + ex.len() * vocab],
                &alone[..ex.len() * vocab],
            ));
        }
        eprintln!("{name}: left-padded rows differ from the examples alone by {worst:e}");
        assert!(worst < 1e-4, "{name}: left-padded vs alone: {worst}");
    }
}

#[test]
fn f16_weights_give_the_cpu_f16_logits_on_wgpu() {
    // The dtype handling of the composed path: f16 weights and activations, RMSNorm and the
    // loss in f32 (bf16 has no WGSL type, so f16 is the half type wgpu can run).
    let _ = device();
    let f16 = LoadOptions {
        dtype: burn::tensor::DType::F16,
        ..LoadOptions::default()
    };
    for name in FIXTURES {
        let dir = fixture(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = WeightStore::open_dir(&dir).unwrap();
        let mut on_wgpu = CausalLm::<Wgpu>::from_store(&config, &store, &device(), f16)
            .unwrap()
            .0;
        on_wgpu.load_adapter(&dir.join("adapter")).unwrap();
        let mut on_cpu = CausalLm::<Cpu>::from_store(&config, &store, &Default::default(), f16)
            .unwrap()
            .0;
        on_cpu.load_adapter(&dir.join("adapter")).unwrap();
        let (tokens, batch) = fixture_inputs(name);
        let ours = host(on_wgpu.forward(Input::new(ids(&tokens, batch))));
        let cpu = host(on_cpu.forward(Input::new(ids(&tokens, batch))));
        let peft = f32s(&refs(name, "logits_adapter.safetensors"), "logits");
        let (to_cpu, to_peft) = (max_abs_diff(&ours, &cpu), max_abs_diff(&ours, &peft));
        eprintln!(
            "{name}: f16 logits on wgpu differ from f16 on the CPU by {to_cpu:e}, from PEFT's \
             f32 by {to_peft:e} (the CPU's f16: {:e})",
            max_abs_diff(&cpu, &peft)
        );
        assert!(to_cpu < 5e-3, "{name}: f16 wgpu vs f16 cpu: {to_cpu}");
        assert!(to_peft < 5e-3, "{name}: f16 wgpu vs f32 PEFT: {to_peft}");
    }
}

/// One seed gives the same fresh adapters on any backend: LoRA A is drawn from the CPU
/// backend's generator and copied to the device (before, each backend drew from its own, and a
/// GPU run started from another adapter than the CPU run with the same seed).
#[test]
fn fresh_adapters_from_one_seed_are_the_same_on_wgpu_as_on_the_cpu() {
    use burn::tensor::backend::Backend;
    use hone_model::lora::LoraSettings;

    fn fresh_lora_a<B: hone_model::KernelBackend>(device: &B::Device) -> Vec<(String, Vec<f32>)> {
        let dir = fixture("llama_gqa");
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = WeightStore::open_dir(&dir).unwrap();
        let (mut model, _) =
            CausalLm::<B>::from_store(&config, &store, device, LoadOptions::default()).unwrap();
        Cpu::seed(&Default::default(), 1234);
        let settings = LoraSettings::new(8, 16.0, &["q_proj", "v_proj", "down_proj"]);
        model.attach_lora(&settings).unwrap();
        model
            .projections()
            .into_iter()
            .filter_map(|(name, l)| l.lora().map(|l| (name, host(l.lora_a.val()))))
            .collect()
    }
    let cpu = fresh_lora_a::<Cpu>(&Default::default());
    let gpu = fresh_lora_a::<Wgpu>(&device());
    assert_eq!(cpu.len(), 2 * 3, "3 projections x 2 layers");
    assert!(cpu.iter().all(|(_, a)| a.iter().any(|v| *v != 0.0)));
    assert_eq!(cpu, gpu);
}
