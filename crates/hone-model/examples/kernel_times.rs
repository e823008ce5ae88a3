//! Where a training step's time goes, kernel by kernel: each fused CPU kernel
//! (`hone_model::kernels::cpu`) timed alone on one layer of a benchmark shape (median of
//! `repeats` calls), times the calls a training step makes, so the lines add up to an estimate
//! of the step. One JSON line per kernel, then a summary:
//!
//! ```text
//! GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295 \
//!     cargo run --release -p hone-model --example kernel_times [small|smol] [repeats]
//! ```
//! The tunable keeps freed buffers in malloc's heap, as they are in a training step (whose
//! heap is already faulted in by its activations); without it every call's fresh output
//! buffers fault their pages in again and the elementwise kernels look 2–4× slower than they
//! are in a step. Shapes follow `hone bench train` (seq 256, batch 4, LoRA r 16 on q_proj and
//! v_proj). The summary gives the step's product work (`product_gflop_per_step`), the fastest
//! product rate seen and what a step would take if every product ran at that rate and nothing
//! else took time (`ceiling_tokens_per_sec`): the bound that a peer doing the same products
//! (PyTorch + PEFT, with its BLAS at the same rate: `scripts/bench_matmul_pytorch.py`) cannot
//! beat either.

use std::time::Instant;

use hone_model::kernels::cpu::{self, AttnShape, Visibility};

struct Shape {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    vocab: usize,
}

const SMALL: Shape = Shape {
    name: "small",
    hidden: 512,
    layers: 8,
    heads: 8,
    kv_heads: 8,
    inter: 1408,
    vocab: 32000,
};
const SMOL: Shape = Shape {
    name: "smol",
    hidden: 576,
    layers: 30,
    heads: 9,
    kv_heads: 3,
    inter: 1536,
    vocab: 49152,
};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// Median seconds of `repeats` runs of `f` (after one warm-up run).
fn time<R>(repeats: usize, mut f: impl FnMut() -> R) -> f64 {
    std::hint::black_box(f());
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let shape = match args.next().as_deref() {
        None | Some("small") => SMALL,
        Some("smol") => SMOL,
        Some(other) => {
            eprintln!("unknown shape {other:?} (small, smol)");
            std::process::exit(2);
        }
    };
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let (seq, batch, r) = (256usize, 4usize, 16usize);
    let rows = seq * batch;
    let (h, l) = (shape.hidden, shape.layers);
    let dim = h / shape.heads;
    let kvd = shape.kv_heads * dim;
    let cpu_name = cpu::cpu_model().unwrap_or_default();
    let mut total = 0.0;
    let mut product_seconds = 0.0;
    let mut product_flop = 0.0;
    let mut best_rate = 0f64;
    let mut report = |kernel: &str, calls: usize, seconds: f64, flop: f64| {
        total += calls as f64 * seconds;
        if flop > 0.0 {
            product_seconds += calls as f64 * seconds;
            product_flop += calls as f64 * flop;
            best_rate = best_rate.max(flop / seconds);
        }
        let rate = if flop > 0.0 {
            format!(", \"gflops\": {:.1}", flop / seconds / 1e9)
        } else {
            String::new()
        };
        println!(
            "{{\"shape\": \"{}\", \"kernel\": \"{kernel}\", \"calls_per_step\": {calls}, \
             \"ms_per_call\": {:.3}, \"ms_per_step\": {:.2}{rate}}}",
            shape.name,
            seconds * 1e3,
            calls as f64 * seconds * 1e3
        );
    };

    let x = values(rows * h, 1);
    let xi = values(rows * shape.inter, 2);
    let w_hh = values(h * h, 3);
    let w_kv = values(kvd * h, 4);
    let w_ih = values(shape.inter * h, 5);
    let w_hi = values(h * shape.inter, 6);
    let prod = |m: usize, n: usize, k: usize| 2.0 * (m * n * k) as f64;

    // The frozen projections: name, weight `[out, in]`, out, in, forward calls, input-gradient
    // calls (layer 0's q, k, v have no input gradient: its input is not tracked).
    let g_kv = values(rows * kvd, 7);
    let inter = shape.inter;
    let linears = [
        ("h->h (q, o)", &w_hh, h, h, 2 * l, 2 * l - 1),
        ("h->kv (k, v)", &w_kv, kvd, h, 2 * l, 2 * l - 2),
        ("h->inter (gate, up)", &w_ih, inter, h, 2 * l, 2 * l),
        ("inter->h (down)", &w_hi, h, inter, l, l),
    ];
    // An activation (or gradient) buffer `width` values wide.
    let rows_of = |width: usize| match width {
        w if w == h => &x,
        w if w == kvd => &g_kv,
        _ => &xi,
    };
    for &(name, w, out, inp, calls, _) in &linears {
        let t = time(repeats, || cpu::linear_nt(rows_of(inp), w, rows, out, inp));
        report(&format!("linear_nt {name}"), calls, t, prod(rows, out, inp));
    }
    for &(name, w, out, inp, _, calls) in &linears {
        let t = time(repeats, || cpu::linear_nn(rows_of(out), w, rows, out, inp));
        report(&format!("linear_nn {name}"), calls, t, prod(rows, out, inp));
    }

    // Output projection and cross-entropy (forward and the hidden gradient together).
    let w_out = values(shape.vocab * h, 8);
    let targets: Vec<i64> = (0..rows)
        .map(|i| ((i * 7919) % shape.vocab) as i64)
        .collect();
    let t = time(repeats, || {
        cpu::linear_nll_sum(&x, &w_out, h, &targets, true)
    });
    report(
        "linear_nll_sum (logits, cross-entropy, dh)",
        1,
        t,
        2.0 * prod(rows, shape.vocab, h),
    );

    // Attention.
    let s = AttnShape {
        batch,
        seq,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        dim,
        scale: 1.0 / (dim as f32).sqrt(),
    };
    let (q, k, v) = (
        values(rows * h, 9),
        values(rows * kvd, 10),
        values(rows * kvd, 11),
    );
    let causal = Visibility::Causal { window: 0 };
    // Causal work with 64-query blocks: block i of seq/64 sees (i + 1) × 64 keys.
    let blocks = seq / 64;
    let seen: usize = (1..=blocks).map(|i| 64 * i * 64).sum();
    let attn_flop = 2.0 * 2.0 * (batch * shape.heads * seen * dim) as f64;
    let t = time(repeats, || cpu::attention(&q, &k, &v, s, causal));
    report("attention forward", l, t, attn_flop);
    let (o, lse) = cpu::attention(&q, &k, &v, s, causal);
    let t = time(repeats, || {
        cpu::attention_backward(&x, &q, &k, &v, &o, &lse, s, causal)
    });
    report("attention backward", l, t, 2.5 * attn_flop);

    // Element-wise kernels.
    let gi = values(rows * shape.inter, 12);
    let t = time(repeats, || cpu::swiglu(&xi, &gi));
    report("swiglu", l, t, 0.0);
    let t = time(repeats, || cpu::swiglu_backward(&xi, &gi, &xi));
    report("swiglu backward", l, t, 0.0);
    let wn = values(h, 13);
    let t = time(repeats, || cpu::rms_norm(&x, &wn, 1e-5));
    report("rms_norm", 2 * l + 1, t, 0.0);
    let (_, rstd) = cpu::rms_norm(&x, &wn, 1e-5);
    let t = time(repeats, || {
        cpu::rms_norm_backward(&q, &x, &wn, &rstd, false)
    });
    report("rms_norm backward", 2 * l, t, 0.0);

    // LoRA on q and v (r 16): each output's gradient is a buffer of its width.
    for (name, out, g, seed) in [("q", h, &q, 14), ("v", kvd, &k, 16)] {
        let (a, b) = (values(r * h, seed), values(out * r, seed + 1));
        let d = (h, r, out);
        let t = time(repeats, || cpu::lora_delta(&x, &a, &b, rows, d, 2.0));
        report(&format!("lora_delta ({name})"), l, t, 0.0);
        let (_, hidden) = cpu::lora_delta(&x, &a, &b, rows, d, 2.0);
        let want = (true, true, true);
        let t = time(repeats, || {
            cpu::lora_delta_backward(g, &x, &a, &b, &hidden, rows, d, 2.0, want)
        });
        report(&format!("lora_delta backward ({name})"), l, t, 0.0);
    }

    println!(
        "{{\"shape\": \"{}\", \"cpu\": \"{cpu_name}\", \"isa\": \"{}\", \"threads\": {}, \
         \"kernels_ms_per_step\": {:.1}, \"products_ms_per_step\": {:.1}, \
         \"tokens_per_sec_if_only_kernels\": {:.0}, \"product_gflop_per_step\": {:.1}, \
         \"best_product_gflops\": {:.1}, \"ceiling_tokens_per_sec\": {:.0}}}",
        shape.name,
        cpu::isa(),
        rayon::current_num_threads(),
        total * 1e3,
        product_seconds * 1e3,
        rows as f64 / total,
        product_flop / 1e9,
        best_rate / 1e9,
        rows as f64 / (product_flop / best_rate)
    );
}
