//! GGUF projection weights kept in their block formats (Flex, f32): the quantized product and
//! its input gradient against the dense product for every block type, and whole models
//! (`fixtures/gguf/*_quant.gguf`, `scripts/gguf_fixtures.py`) loaded quantized against the same
//! files dequantized at load: logits, greedy generation through the KV cache, LoRA losses and
//! gradients, merging.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use hone_model::adapter::peft_key;
use hone_model::gguf::{GgmlType, GgufFile, QuantWeight};
use hone_model::kernels::composed;
use hone_model::loss::causal_lm_loss;
use hone_model::{
    generate, load_model_dir, CausalLm, Cpu, GenerateConfig, Input, KernelBackend, LoadOptions,
    SamplingConfig, WeightStore,
};

type Ad = Autodiff<Cpu>;

const FIXTURES: [&str; 2] = ["llama_gqa", "qwen2_tied"];

fn gguf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn peft_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Every block type of `types.gguf` (`[3, 512]`): the Flex product equals `x · dequantize(W)ᵀ`
/// (the composed default) for decoding and prefill row counts, and under autodiff the gradient
/// of `x` equals the composed one (`g · W`).
#[test]
fn quant_linear_matches_the_dense_product_and_gradient_for_every_block_type() {
    let file = GgufFile::open(&gguf_fixture("types.gguf")).unwrap();
    let device = Default::default();
    let mut seen = 0;
    for ty in GgmlType::ALL.into_iter().filter(|t| t.is_quantized()) {
        let name = format!("t.{}", ty.name().to_ascii_lowercase());
        let info = file.tensor_info(&name).unwrap();
        let [rows, cols] = <[usize; 2]>::try_from(info.shape()).unwrap();
        let w =
            QuantWeight::new(ty, file.tensor_bytes(&name).unwrap().to_vec(), rows, cols).unwrap();
        for m in [1, 3, 9, 40] {
            let x = Tensor::<Cpu, 2>::random([m, cols], Distribution::Normal(0.0, 1.0), &device);
            let fused = to_vec(<Cpu as KernelBackend>::quant_linear(x.clone(), &w));
            let dense = to_vec(composed::quant_linear(x.clone(), &w));
            let diff = max_abs_diff(&fused, &dense);
            // Relative to the largest value (f32 summation order; Q6_K's products reach 1e3).
            let scale = dense.iter().fold(1f32, |a, v| a.max(v.abs()));
            assert!(
                diff < 1e-5 * scale,
                "{ty}, m = {m}: product differs by {diff} (largest {scale})"
            );

            // Gradients of sum(y ⊙ c) with respect to x, fused node vs composed.
            let c = Tensor::<Ad, 2>::random([m, rows], Distribution::Normal(0.0, 1.0), &device);
            let grad = |fused: bool| {
                let xa = Tensor::<Ad, 2>::from_data(x.to_data(), &device).require_grad();
                let y = if fused {
                    <Ad as KernelBackend>::quant_linear(xa.clone(), &w)
                } else {
                    composed::quant_linear(xa.clone(), &w)
                };
                let grads = (y * c.clone()).sum().backward();
                to_vec(xa.grad(&grads).unwrap())
            };
            let (gf, gc) = (grad(true), grad(false));
            let diff = max_abs_diff(&gf, &gc);
            let scale = gc.iter().fold(1f32, |a, v| a.max(v.abs()));
            assert!(
                diff < 1e-5 * scale,
                "{ty}, m = {m}: input gradient differs by {diff}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 8, "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
}

fn load<B: KernelBackend>(name: &str, dequantize: bool) -> hone_model::LoadedModel<B> {
    let options = LoadOptions {
        dequantize,
        ..LoadOptions::default()
    };
    load_model_dir::<B>(
        &gguf_fixture(&format!("{name}_quant.gguf")),
        &Default::default(),
        options,
    )
    .unwrap()
}

/// Projections the fixtures keep quantized: q, k, v, o, gate, up of both layers, and the output
/// head (llama's lm_head; qwen2's is tied to the quantized token embedding, multiplied in its
/// block format); down_proj rows (176 values) are not whole blocks and stay F32 in the files.
fn expected_quantized(_name: &str) -> usize {
    2 * 6 + 1
}

fn input_ids<B: Backend>(name: &str) -> Tensor<B, 2, Int> {
    let store =
        WeightStore::open_files(&[peft_fixture(name).join("refs/inputs.safetensors")]).unwrap();
    let (ids, shape) = store.load_i64("input_ids").unwrap();
    Tensor::from_data(
        TensorData::new(ids, [shape[0], shape[1]]),
        &Default::default(),
    )
}

#[test]
fn quantized_gguf_models_give_the_logits_of_dequantizing_at_load() {
    for name in FIXTURES {
        let quant = load::<Cpu>(name, false);
        let dense = load::<Cpu>(name, true);
        assert!(
            quant.report.unused.is_empty(),
            "{name}: unused {:?}",
            quant.report.unused
        );
        assert_eq!(
            quant.model.quantized_projections(),
            expected_quantized(name),
            "{name}"
        );
        assert_eq!(dense.model.quantized_projections(), 0, "{name}");
        let a = to_vec(quant.model.forward(Input::new(input_ids(name))));
        let b = to_vec(dense.model.forward(Input::new(input_ids(name))));
        let diff = max_abs_diff(&a, &b);
        assert!(
            diff < 1e-4,
            "{name}: quantized logits differ from dequantized-at-load ones by {diff}"
        );
        // The fixture is really quantized: its logits are not those of the F32 file.
        let f32_model = load_model_dir::<Cpu>(
            &gguf_fixture(&format!("{name}.gguf")),
            &Default::default(),
            LoadOptions::default(),
        )
        .unwrap();
        let c = to_vec(f32_model.model.forward(Input::new(input_ids(name))));
        assert!(
            max_abs_diff(&a, &c) > 1e-3,
            "{name}: the fixture is not quantized"
        );
    }
}

/// Decoding (one row per step through the KV cache, the direct quantized path) picks the same
/// tokens as the dequantized model.
#[test]
fn quantized_gguf_models_generate_as_dequantized_ones() {
    for name in FIXTURES {
        let quant = load::<Cpu>(name, false);
        let dense = load::<Cpu>(name, true);
        let config = GenerateConfig {
            max_new_tokens: 12,
            sampling: SamplingConfig::default(),
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
        };
        let prompt = quant.tokenizer.encode("hello world, this is").unwrap();
        let a = generate(&quant.model, &quant.tokenizer, &prompt, &config, |_| {}).unwrap();
        let b = generate(&dense.model, &dense.tokenizer, &prompt, &config, |_| {}).unwrap();
        assert_eq!(a.ids, b.ids, "{name}");
        assert_eq!(a.ids.len(), 12, "{name}");
    }
}

/// A quantized model on `Autodiff<Flex>` with the fixtures' PEFT adapters: the same loss and
/// LoRA gradients as the dequantized model (the gradient flows through the quantized base
/// projections of later layers), and no gradient for the frozen weights.
#[test]
fn lora_losses_and_gradients_on_quantized_weights_match_dequantized_ones() {
    for name in FIXTURES {
        let batch =
            WeightStore::open_files(&[peft_fixture(name).join("refs/train_batch.safetensors")])
                .unwrap();
        let (ids, shape) = batch.load_i64("input_ids").unwrap();
        let (labels, _) = batch.load_i64("labels").unwrap();
        let run = |dequantize: bool| {
            let mut model: CausalLm<Ad> = load::<Ad>(name, dequantize).model;
            assert_eq!(
                model.quantized_projections() == 0,
                dequantize,
                "{name}: autodiff Flex keeps GGUF weights quantized"
            );
            model
                .load_adapter(&peft_fixture(name).join("adapter"))
                .unwrap();
            let ids = Tensor::<Ad, 2, Int>::from_data(
                TensorData::new(ids.clone(), [shape[0], shape[1]]),
                &Default::default(),
            );
            let loss = causal_lm_loss(model.forward(Input::new(ids)), &labels).unwrap();
            let value = to_vec(loss.clone())[0];
            let grads = loss.backward();
            let mut out = Vec::new();
            for (module, linear) in model.projections() {
                let lora = linear.lora().unwrap();
                for (which, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
                    let g = p.grad(&grads).expect("an adapter gradient");
                    out.push((peft_key(&module, which), to_vec(g)));
                }
                if let Some(w) = linear.weight() {
                    assert!(!w.is_require_grad());
                }
            }
            (value, out)
        };
        let (lq, gq) = run(false);
        let (ld, gd) = run(true);
        assert!((lq - ld).abs() < 1e-5, "{name}: loss {lq} vs {ld}");
        assert_eq!(gq.len(), gd.len());
        for ((key, a), (_, b)) in gq.iter().zip(&gd) {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let ok = (x - y).abs() <= 1e-6 || (x - y).abs() <= 1e-4 * y.abs();
                assert!(ok, "{name}: {key}[{i}]: quantized {x} vs dequantized {y}");
            }
        }
    }
}

/// Merging an adapter into a quantized projection decodes it: the merged model is dense there
/// and gives the logits of the adapter on the quantized base.
#[test]
fn merging_an_adapter_into_quantized_weights_keeps_the_logits() {
    for name in FIXTURES {
        let mut model = load::<Cpu>(name, false).model;
        model
            .load_adapter(&peft_fixture(name).join("adapter"))
            .unwrap();
        let with_adapter = to_vec(model.forward(Input::new(input_ids(name))));
        let before = model.quantized_projections();
        model.merge_lora();
        assert!(model.quantized_projections() < before, "{name}");
        let merged = to_vec(model.forward(Input::new(input_ids(name))));
        let diff = max_abs_diff(&with_adapter, &merged);
        assert!(diff < 1e-4, "{name}: merged logits differ by {diff}");
        for (module, linear) in model.projections() {
            let dense = linear.dequantized_weight(&Default::default(), burn::tensor::DType::F32);
            assert_eq!(dense.dims(), linear.shape(), "{module}");
        }
    }
}
