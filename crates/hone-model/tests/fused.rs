//! The fused CPU kernels (RMSNorm, RoPE, attention, SwiGLU, cross-entropy, LoRA's product, with
//! their analytic backward passes) compute what the composition of burn operations computes: logits,
//! loss and every LoRA gradient, on dense and packed batches, with grouped-query attention, q/k/v
//! biases, tied embeddings, a sliding window and partial rotary embeddings. The composed path is
//! itself checked against transformers and PEFT (tests/reference.rs, hone-train's reference
//! tests), so this ties the fused path to the same references on cases the fixtures lack.
//!
//! The two paths are chosen per model ([`CausalLm::set_kernels`]), so both run side by side.

mod common;

use burn::backend::Autodiff;
use common::*;
use hone_model::loss::{causal_lm_loss_sum_hidden, causal_lm_loss_sum_with};
use hone_model::Input;
use hone_model::{CausalLm, Cpu, Kernels, ModelConfig};

type Ad = Autodiff<Cpu>;

/// Deterministic pseudo-random token ids below `vocab`.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<i64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as i64
        })
        .collect()
}

/// Everything one path computes: logits (no autodiff), dense loss + gradients, packed loss +
/// gradients.
struct Outputs {
    logits: Vec<f32>,
    dense: (f32, Vec<Vec<f32>>),
    packed: (f32, Vec<Vec<f32>>),
}

fn loss_and_grads(
    m: &CausalLm<Ad>,
    input: &[i64],
    labels: &[i64],
    batch: usize,
    packing: Option<(&[u32], &[u32])>,
    via_hidden: bool,
) -> (f32, Vec<Vec<f32>>) {
    let hidden = match packing {
        Some((pos, seg)) => m.forward(Input::new(ids(input, batch)).packed(pos, seg).hidden()),
        None => m.forward(Input::new(ids(input, batch)).hidden()),
    };
    let (sum, count) = if via_hidden {
        causal_lm_loss_sum_hidden(m, hidden, labels)
    } else {
        causal_lm_loss_sum_with(m.kernels(), m.logits(hidden), labels)
    };
    assert!(count > 0);
    let loss = host(sum.clone())[0];
    let grads = sum.backward();
    let mut out = Vec::new();
    for (_, linear) in m.projections() {
        if let Some(lora) = linear.lora() {
            for p in [&lora.lora_a, &lora.lora_b] {
                out.push(host(p.grad(&grads).expect("every adapter gets a gradient")));
            }
        }
    }
    (loss, out)
}

fn run(name: &str, edit: &dyn Fn(&mut ModelConfig), kernels: Kernels, via_hidden: bool) -> Outputs {
    let mut flex = model_with_adapter::<Cpu>(name, edit);
    flex.set_kernels(kernels);
    let vocab = flex.config().vocab_size;
    // Longer than one block of the fused attention's queries (64), so that blocks see only
    // the keys of their rows (causal, window, packed examples).
    let (batch, seq) = (3, 150);
    let input = tokens(batch * seq, vocab, 7);
    let logits = host(flex.forward(Input::new(ids(&input, batch))));

    let mut ad = model_with_adapter::<Ad>(name, edit);
    ad.set_kernels(kernels);
    let mut labels = input.clone();
    for (i, l) in labels.iter_mut().enumerate() {
        if i % seq < 3 || i % 5 == 0 {
            *l = -100;
        }
    }
    let dense = loss_and_grads(&ad, &input, &labels, batch, None, via_hidden);

    // Two rows: examples of 40 + 75 + 35 tokens, and 100 tokens + 50 padding.
    let lengths: [&[usize]; 2] = [&[40, 75, 35], &[100]];
    let (mut pos, mut seg) = (Vec::new(), Vec::new());
    for row in lengths {
        let mut used = 0;
        for (i, &len) in row.iter().enumerate() {
            pos.extend(0..len as u32);
            seg.extend(std::iter::repeat_n(i as u32 + 1, len));
            used += len;
        }
        pos.extend(std::iter::repeat_n(0, seq - used));
        seg.extend(std::iter::repeat_n(0, seq - used));
    }
    let packed_input = tokens(2 * seq, vocab, 11);
    let packed_labels: Vec<i64> = packed_input
        .iter()
        .zip(&seg)
        .map(|(&t, &s)| if s == 0 { -100 } else { t })
        .collect();
    let packed = loss_and_grads(
        &ad,
        &packed_input,
        &packed_labels,
        2,
        Some((&pos, &seg)),
        via_hidden,
    );
    Outputs {
        logits,
        dense,
        packed,
    }
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= tol * scale.max(1.0) && diff.is_finite(),
        "{what}: max |fused - composed| = {diff:e} (largest value {scale:e})"
    );
}

/// A change to a fixture's configuration.
type Edit = Box<dyn Fn(&mut ModelConfig)>;

#[test]
fn fused_kernels_compute_what_composed_burn_ops_compute() {
    // The comparison means something only if Flex and Autodiff<Flex> do fuse f32 (and only f32).
    use burn::tensor::DType;
    assert!(Kernels::Fused.fused::<Cpu>(DType::F32) && Kernels::Fused.fused::<Ad>(DType::F32));
    assert!(!Kernels::Composed.fused::<Cpu>(DType::F32));
    assert!(!Kernels::Fused.fused::<Ad>(DType::BF16));
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("llama_gqa", "plain", Box::new(|_| {})),
        ("qwen2_tied", "biases, tied", Box::new(|_| {})),
        (
            "llama_gqa",
            "window 7, half rotary",
            Box::new(|c: &mut ModelConfig| {
                c.sliding_window = vec![Some(7); c.num_layers];
                c.partial_rotary_factor = 0.5;
            }),
        ),
    ];
    for (name, label, edit) in &cases {
        let composed = run(name, edit.as_ref(), Kernels::Composed, false);
        // The loss from logits (fused cross-entropy) and from hidden states (the output
        // projection fused with it).
        for via_hidden in [false, true] {
            let fused = run(name, edit.as_ref(), Kernels::Fused, via_hidden);
            let what = |s: &str| format!("{name} ({label}, via hidden {via_hidden}) {s}");
            assert_close(&what("logits"), &fused.logits, &composed.logits, 1e-5);
            for (kind, f, c) in [
                ("dense", &fused.dense, &composed.dense),
                ("packed", &fused.packed, &composed.packed),
            ] {
                assert!(
                    (f.0 - c.0).abs() <= 1e-5 * c.0.abs(),
                    "{}: loss {} vs {}",
                    what(kind),
                    f.0,
                    c.0
                );
                assert_eq!(f.1.len(), c.1.len());
                for (i, (gf, gc)) in f.1.iter().zip(&c.1).enumerate() {
                    let scale = gc.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = gf
                        .iter()
                        .zip(gc)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        diff <= 1e-5 * scale + 1e-7,
                        "{} gradient {i}: max diff {diff:e} (largest {scale:e})",
                        what(kind)
                    );
                }
            }
        }
    }
}

/// Decoding with a KV cache: the fused path (keys and values in host memory, attention over them
/// in place) gives the logits of the composed path (a tensor cache, burn's attention) and of the
/// full forward pass, for prefill chunks of several tokens and single steps, a sliding window
/// shorter than the chunks, and rows dropped from the batch midway.
#[test]
fn cached_decoding_with_fused_kernels_equals_composed() {
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("llama_gqa", "plain", Box::new(|_| {})),
        ("qwen2_tied", "biases, tied", Box::new(|_| {})),
        (
            "llama_gqa",
            "window 4, half rotary",
            Box::new(|c: &mut ModelConfig| {
                c.sliding_window = vec![Some(4); c.num_layers];
                c.partial_rotary_factor = 0.5;
            }),
        ),
    ];
    let device = Default::default();
    for (name, label, edit) in &cases {
        let mut composed = model_with_adapter::<Cpu>(name, edit.as_ref());
        composed.set_kernels(Kernels::Composed);
        let mut fused = model_with_adapter::<Cpu>(name, edit.as_ref());
        fused.set_kernels(Kernels::Fused);
        let vocab = fused.config().vocab_size;
        let (batch, seq) = (3, 17);
        let input = tokens(batch * seq, vocab, 5);
        let full = host(composed.forward(Input::new(ids(&input, batch))));
        let mut caches: Vec<hone_model::KvCache<Cpu>> = (0..2)
            .map(|_| hone_model::KvCache::new(fused.config().num_layers))
            .collect();
        let mut rows: Vec<usize> = (0..batch).collect();
        let mut pos = 0;
        for step in [6, 3, 1, 1, 2, 1, 1, 1, 1] {
            if pos == 10 {
                // Drop the middle row.
                rows = vec![0, 2];
                for c in &mut caches {
                    c.retain_rows(&[0, 2], &device);
                }
            }
            let chunk: Vec<i64> = rows
                .iter()
                .flat_map(|&r| input[r * seq + pos..r * seq + pos + step].iter().copied())
                .collect();
            for (model, cache) in [(&fused, 0), (&composed, 1)] {
                let logits = host(
                    model.forward(Input::new(ids(&chunk, rows.len())).cache(&mut caches[cache])),
                );
                for (i, &r) in rows.iter().enumerate() {
                    for s in 0..step {
                        let ours = &logits[(i * step + s) * vocab..(i * step + s + 1) * vocab];
                        let at = (r * seq + pos + s) * vocab;
                        assert_close(
                            &format!(
                                "{name} ({label}) kernels {:?} row {r} position {}",
                                model.kernels(),
                                pos + s
                            ),
                            ours,
                            &full[at..at + vocab],
                            1e-5,
                        );
                    }
                }
            }
            pos += step;
        }
        assert_eq!(caches[0].len(), pos);

        // One cache per row, rows of different lengths (as the server batches requests):
        // each row prefilled alone, then steps for all rows together.
        let starts = [4, 9, 6];
        for model in [&fused, &composed] {
            let mut caches: Vec<hone_model::KvCache<Cpu>> = (0..batch)
                .map(|_| hone_model::KvCache::new(model.config().num_layers))
                .collect();
            for (r, &n) in starts.iter().enumerate() {
                let prompt = &input[r * seq..r * seq + n];
                let logits = host(
                    model.forward(Input::new(ids(prompt, 1)).row_caches(&mut [&mut caches[r]])),
                );
                let at = (r * seq) * vocab;
                assert_close(
                    &format!("{name} ({label}) {:?} row {r} prefill", model.kernels()),
                    &logits,
                    &full[at..at + n * vocab],
                    1e-5,
                );
            }
            for step in 0..5 {
                let chunk: Vec<i64> = (0..batch)
                    .map(|r| input[r * seq + starts[r] + step])
                    .collect();
                let mut rows: Vec<&mut hone_model::KvCache<Cpu>> = caches.iter_mut().collect();
                let logits =
                    host(model.forward(Input::new(ids(&chunk, batch)).row_caches(&mut rows)));
                for r in 0..batch {
                    let at = (r * seq + starts[r] + step) * vocab;
                    assert_close(
                        &format!(
                            "{name} ({label}) {:?} row {r} step {step} (per-row caches)",
                            model.kernels()
                        ),
                        &logits[r * vocab..(r + 1) * vocab],
                        &full[at..at + vocab],
                        1e-5,
                    );
                }
            }
        }

        // Ragged steps (as the server's steps that decode some rows while prefilling a chunk
        // of another): rows of different numbers of new tokens one after the other in a
        // batch of one, each over its own cache; every position's logits, then each row's
        // last position alone.
        let plan: [[usize; 3]; 5] = [[5, 1, 3], [1, 6, 1], [2, 1, 1], [1, 2, 4], [3, 1, 1]];
        for model in [&fused, &composed] {
            let mut caches: Vec<hone_model::KvCache<Cpu>> = (0..batch)
                .map(|_| hone_model::KvCache::new(model.config().num_layers))
                .collect();
            let mut done = [0usize; 3];
            for (step, lens) in plan.iter().enumerate() {
                let chunk: Vec<i64> = (0..batch)
                    .flat_map(|r| input[r * seq + done[r]..r * seq + done[r] + lens[r]].to_vec())
                    .collect();
                let tokens = chunk.len();
                let mut rows: Vec<&mut hone_model::KvCache<Cpu>> = caches.iter_mut().collect();
                let last_only = step % 2 == 1;
                let input_step = Input::new(ids(&chunk, 1)).ragged_caches(&mut rows, lens.to_vec());
                let out = if last_only {
                    model.forward(input_step.last_logits())
                } else {
                    model.forward(input_step)
                };
                let expect_dims = if last_only {
                    [batch, 1, vocab]
                } else {
                    [1, tokens, vocab]
                };
                assert_eq!(out.dims(), expect_dims);
                let logits = host(out);
                let mut at_token = 0;
                for r in 0..batch {
                    let positions = if last_only {
                        (lens[r] - 1)..lens[r]
                    } else {
                        0..lens[r]
                    };
                    for (i, s) in positions.enumerate() {
                        let ours = if last_only {
                            &logits[r * vocab..(r + 1) * vocab]
                        } else {
                            &logits[(at_token + i) * vocab..(at_token + i + 1) * vocab]
                        };
                        let at = (r * seq + done[r] + s) * vocab;
                        assert_close(
                            &format!(
                                "{name} ({label}) {:?} row {r} ragged step {step} position {}",
                                model.kernels(),
                                done[r] + s
                            ),
                            ours,
                            &full[at..at + vocab],
                            1e-5,
                        );
                    }
                    at_token += lens[r];
                    done[r] += lens[r];
                }
            }
            for (r, c) in caches.iter().enumerate() {
                assert_eq!(
                    c.len(),
                    done[r],
                    "row {r}'s cache advanced by its own tokens"
                );
            }
        }
    }
}
