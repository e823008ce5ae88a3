//! A tiny llama stored once per block type (`fixtures/gguf/kquant`, written by
//! `scripts/gguf_kquant_fixtures.py` with gguf-py; widths are multiples of 256 so the K-quants
//! apply), replayed against transformers' own GGUF loading and PEFT:
//! decoding equals `gguf.quants.dequantize` bit for bit, the logits equal transformers'
//! `from_pretrained(gguf_file=...)` within 1e-4 with the projections kept quantized and
//! dequantized at load, and the loss and every LoRA gradient on the quantized base equal PEFT's
//! on the dequantized model within 1e-5 relative.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::adapter::peft_key;
use hone_model::gguf::GgufFile;
use hone_model::loss::causal_lm_loss;
use hone_model::{load_model_dir, CausalLm, Cpu, Input, KernelBackend, LoadOptions, WeightStore};

type Ad = Autodiff<Cpu>;

const TYPES: [&str; 8] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k",
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/kquant")
}

fn file(ty: &str) -> PathBuf {
    dir().join(format!("tiny_{ty}.gguf"))
}

fn refs(ty: &str) -> WeightStore {
    WeightStore::open_files(&[dir().join(format!("refs_{ty}.safetensors"))]).unwrap()
}

fn f32s(store: &WeightStore, key: &str) -> Vec<f32> {
    let shape = store.shape(key).unwrap();
    store.load_f32(key, &shape).unwrap()
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn ids<B: Backend>(store: &WeightStore, key: &str) -> Tensor<B, 2, Int> {
    let (ids, shape) = store.load_i64(key).unwrap();
    Tensor::from_data(
        TensorData::new(ids, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn load<B: KernelBackend>(ty: &str, dequantize: bool) -> CausalLm<B> {
    let options = LoadOptions {
        dequantize,
        ..LoadOptions::default()
    };
    let loaded = load_model_dir::<B>(&file(ty), &Default::default(), options).unwrap();
    assert!(
        loaded.report.unused.is_empty(),
        "{ty}: {:?}",
        loaded.report.unused
    );
    loaded.model
}

#[test]
fn every_block_type_decodes_as_gguf_py_does() {
    let expected = WeightStore::open_files(&[dir().join("dequant.safetensors")]).unwrap();
    for ty in TYPES {
        let gguf = GgufFile::open(&file(ty)).unwrap();
        for tensor in ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"] {
            assert_eq!(
                gguf.tensor_info(tensor)
                    .unwrap()
                    .ggml_type
                    .name()
                    .to_ascii_lowercase(),
                ty
            );
            let (ours, shape) = gguf.tensor_f32(tensor).unwrap();
            let reference = f32s(&expected, &format!("{ty}.{tensor}"));
            // The reference keeps the leading rows (every block position of a row).
            let n = reference.len();
            assert_eq!(n % shape[1], 0);
            let same = ours[..n]
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{ty} {tensor}: decoding differs from gguf.quants.dequantize"
            );
        }
    }
}

#[test]
fn logits_of_every_block_type_equal_transformers_gguf_loading() {
    for ty in TYPES {
        let reference = refs(ty);
        let expected = f32s(&reference, "logits");
        for dequantize in [false, true] {
            let model = load::<Cpu>(ty, dequantize);
            assert_eq!(
                model.quantized_projections(),
                if dequantize { 0 } else { 8 },
                "{ty}: the seven projections and the F16 output head (kept in 16 bits)"
            );
            let logits = to_vec(model.forward(Input::new(ids(&reference, "input_ids"))));
            let diff = logits
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "{ty} (dequantize = {dequantize}): logits differ from transformers' by {diff:e}"
            );
        }
    }
}

/// Decoding-sized inputs (one and five positions: the few-row products) and a prefill (32
/// positions: packed groups) with 8-bit activations (`LoadOptions::activations`,
/// `--q8-activations`): every block type is multiplied through them
/// (the logits move off the exact ones by more than f32 rounding) and the logits stay within 2%
/// of the largest of transformers' (the rounding of activations to 8 bits, not a wrong product).
#[test]
fn q8_activations_keep_the_logits_of_every_block_type_near_transformers() {
    use hone_model::gguf::matmul::Activations;
    for (ty, positions) in TYPES
        .into_iter()
        .flat_map(|ty| [(ty, 1), (ty, 5), (ty, 32)])
    {
        let reference = refs(ty);
        let (ids_all, shape) = reference.load_i64("input_ids").unwrap();
        let ids: Vec<i64> = ids_all[..positions].to_vec();
        let input = || {
            Input::new(Tensor::<Cpu, 2, Int>::from_data(
                TensorData::new(ids.clone(), [1, positions]),
                &Default::default(),
            ))
        };
        let expected = f32s(&reference, "logits");
        let vocab = expected.len() / (shape[0] * shape[1]);
        let expected = &expected[..positions * vocab];
        let logits = |activations| {
            let options = LoadOptions {
                activations,
                ..LoadOptions::default()
            };
            let model = load_model_dir::<Cpu>(&file(ty), &Default::default(), options)
                .unwrap()
                .model;
            to_vec(model.forward(input()))
        };
        let (exact, q8) = (logits(Activations::F32), logits(Activations::Q8));
        let max_diff = |a: &[f32]| {
            a.iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_diff(&exact) < 1e-4,
            "{ty} ({positions}): exact logits off by {:e}",
            max_diff(&exact)
        );
        let (moved, off) = (
            exact
                .iter()
                .zip(&q8)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max),
            max_diff(&q8),
        );
        assert!(
            moved > 1e-4,
            "{ty} ({positions}): 8-bit activations left the logits exact ({moved:e})"
        );
        assert!(
            off <= 0.02 * scale,
            "{ty} ({positions}): logits with 8-bit activations off by {off} (largest logit {scale})"
        );
    }
}

#[test]
fn lora_loss_and_gradients_on_every_quantized_base_equal_peft() {
    for ty in TYPES {
        let reference = refs(ty);
        let mut model = load::<Ad>(ty, false);
        assert_eq!(model.quantized_projections(), 8, "{ty}");
        model.load_adapter(&dir().join("adapter")).unwrap();
        let (labels, _) = reference.load_i64("labels").unwrap();
        let loss = causal_lm_loss(
            model.forward(Input::new(ids(&reference, "input_ids"))),
            &labels,
        )
        .unwrap();
        let value = to_vec(loss.clone())[0];
        let expected = f32s(&reference, "loss")[0];
        assert!(
            (value - expected).abs() <= 1e-5,
            "{ty}: loss {value} vs PEFT {expected}"
        );
        let grads = loss.backward();
        let mut checked = 0;
        for (module, linear) in model.projections() {
            let lora = linear.lora().unwrap();
            for (which, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
                let key = peft_key(&module, which);
                let ours = to_vec(p.grad(&grads).expect("an adapter gradient"));
                let theirs = f32s(&reference, &key);
                assert_eq!(ours.len(), theirs.len(), "{key}");
                for (i, (g, e)) in ours.iter().zip(&theirs).enumerate() {
                    let ok = (g - e).abs() <= 1e-7 || (g - e).abs() <= 1e-5 * e.abs();
                    assert!(ok, "{ty}: {key}[{i}]: {g} vs PEFT {e}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 14, "{ty}: every reference gradient is checked");
    }
}
