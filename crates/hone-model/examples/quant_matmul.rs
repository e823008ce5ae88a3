//! Speed of the quantized matrix products (`hone_model::gguf::matmul`) against burn's f32
//! product on the same shapes (the path the model takes today with weights decoded to f32).
//! One JSON line per measurement:
//!
//! ```text
//! cargo run --release -p hone-model --example quant_matmul
//! ```
//! `m = 1` is one decoding step, `m = 128` a prefill chunk; shapes are SmolLM2-135M's
//! gate/up (`[1536, 576]`) and down (`[576, 1536]`) projections. `quant` multiplies F16 and
//! BF16 rows as the file stores them, `quant_panels` in the panels of sixteen rows a model
//! holds them in (`gguf/panel.rs`). Each product runs repeatedly on one weight, which then
//! stays in the CPU's caches: these are kernel rates, not the DRAM-bound rates of decoding a
//! whole model (what `hone bench generate` measures).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::gguf::matmul::{
    matmul_dense_few, matmul_dense_many, matmul_quant_with, Activations, QuantMatrix,
};
use hone_model::gguf::{GgmlType, QuantWeight};
use hone_model::Cpu;

fn random_weights(ty: GgmlType, elements: usize) -> Vec<u8> {
    // Deterministic bytes with small finite f16 scales: speed does not depend on the values.
    let bb = ty.block_bytes();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes: Vec<u8> = (0..ty.byte_len(elements))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    if ty.is_quantized() {
        let offsets: &[usize] = match ty {
            GgmlType::Q6K => &[208],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            _ => &[0],
        };
        for block in bytes.chunks_exact_mut(bb) {
            for &o in offsets {
                block[o..o + 2].copy_from_slice(&scale);
            }
        }
    } else {
        let one: Vec<u8> = match ty {
            GgmlType::F32 => 0.01f32.to_le_bytes().to_vec(),
            GgmlType::F16 => scale.to_vec(),
            _ => half::bf16::from_f32(0.01).to_le_bytes().to_vec(),
        };
        for v in bytes.chunks_exact_mut(one.len()) {
            v.copy_from_slice(&one);
        }
    }
    bytes
}

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let reps = 20;
        for _ in 0..reps {
            f();
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// One JSON line: the product of `m` input rows by a `[rows, cols]` weight of `weight_bytes`
/// bytes took `secs`.
fn line(kernel: &str, ty: GgmlType, [rows, cols, m]: [usize; 3], secs: f64, weight_bytes: usize) {
    let flops = 2.0 * (m * rows * cols) as f64;
    println!(
        "{{\"kernel\":\"{kernel}\",\"type\":\"{ty}\",\"rows\":{rows},\"cols\":{cols},\"m\":{m},\"us\":{:.1},\"gflops\":{:.2},\"weight_gbps\":{:.2}}}",
        secs * 1e6,
        flops / secs / 1e9,
        weight_bytes as f64 / secs / 1e9
    );
}

fn main() {
    let device = Default::default();
    for (rows, cols) in [(1536, 576), (576, 1536), (49152, 576)] {
        for m in [1usize, 128] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i % 7) as f32 * 0.1).collect();
            let xt = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, cols]), &device);
            let w = Tensor::<Cpu, 2>::from_data(
                TensorData::new(vec![0.01f32; rows * cols], [rows, cols]),
                &device,
            );
            let wt = w.transpose();
            let secs = time(|| {
                let y = xt.clone().matmul(wt.clone());
                let _ = y.into_data();
            });
            line(
                "burn_f32",
                GgmlType::F32,
                [rows, cols, m],
                secs,
                rows * cols * 4,
            );
            {
                // The same product with the weight stored transposed ([in, out], row-major).
                let wt_c = Tensor::<Cpu, 2>::from_data(
                    TensorData::new(vec![0.01f32; rows * cols], [cols, rows]),
                    &device,
                );
                let secs = time(|| {
                    let y = xt.clone().matmul(wt_c.clone());
                    let _ = y.into_data();
                });
                line(
                    "burn_f32_wt",
                    GgmlType::F32,
                    [rows, cols, m],
                    secs,
                    rows * cols * 4,
                );
            }
            if m > 8 {
                let wd = vec![0.01f32; rows * cols];
                let secs = time(|| {
                    std::hint::black_box(matmul_dense_many(&wd, rows, cols, &x, m));
                });
                line(
                    "dense_many",
                    GgmlType::F32,
                    [rows, cols, m],
                    secs,
                    rows * cols * 4,
                );
            }
            if m <= 8 {
                let wd = vec![0.01f32; rows * cols];
                let secs = time(|| {
                    std::hint::black_box(matmul_dense_few(&wd, rows, cols, &x, m));
                });
                line(
                    "dense_few",
                    GgmlType::F32,
                    [rows, cols, m],
                    secs,
                    rows * cols * 4,
                );
            }
            for ty in GgmlType::ALL {
                if cols % ty.block_size() != 0 {
                    continue; // K-quants need rows of whole 256-blocks (576 is not)
                }
                let bytes = random_weights(ty, rows * cols);
                let matrix = QuantMatrix {
                    ty,
                    bytes: &bytes,
                    rows,
                    cols,
                };
                // 8-bit activations where they apply (the block and K formats).
                let q8 = ty.block_size() > 1;
                for (kernel, activations) in
                    [("quant", Activations::F32), ("quant_q8", Activations::Q8)]
                {
                    if activations == Activations::Q8 && !q8 {
                        continue;
                    }
                    let secs = time(|| {
                        std::hint::black_box(matmul_quant_with(matrix, &x, m, activations));
                    });
                    line(kernel, ty, [rows, cols, m], secs, bytes.len());
                }
                // F16 and BF16 as a model holds them: in panels of sixteen rows.
                if matches!(ty, GgmlType::F16 | GgmlType::BF16) {
                    let weight = QuantWeight::new(ty, bytes.clone(), rows, cols).expect("weight");
                    let secs = time(|| {
                        std::hint::black_box(weight.matmul_nt(&x, m));
                    });
                    line("quant_panels", ty, [rows, cols, m], secs, bytes.len());
                }
                // The weight as a model holds it with 8-bit activations: Q4_0, Q4_1, Q4_K and Q5_K
                // rows regrouped by eight (the other formats as above).
                if matches!(
                    ty,
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K
                ) {
                    let weight = QuantWeight::new(ty, bytes.clone(), rows, cols)
                        .expect("weight")
                        .with_activations(Activations::Q8);
                    let secs = time(|| {
                        std::hint::black_box(weight.matmul_nt(&x, m));
                    });
                    line("quant_q8_regrouped", ty, [rows, cols, m], secs, bytes.len());
                }
            }
        }
    }
}
