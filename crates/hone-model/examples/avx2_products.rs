//! The AVX2 path's forward products `x Wᵀ` beside gemm's on the training step's shapes, the two
//! called alternately in one process (the machines are shared and noisy: a ratio of calls
//! made seconds apart holds where separate runs drift by ±10%). One JSON line per shape:
//!
//! ```text
//! GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295 \
//!     cargo run --release --no-default-features -p hone-model --example avx2_products [repeats]
//! ```
//! `--no-default-features` builds the AVX2 path that an AVX2-only CPU takes (on an AVX-512
//! machine too); `tile_gflops` is `kernels::fma::linear_nt` (what `kernels::cpu::linear_nt`
//! runs there), `gemm_gflops` the gemm crate's product that it replaced, both medians of
//! `repeats` calls (default 9). Built with the default features on an AVX-512 CPU, gemm takes
//! its AVX-512 kernels (what that build's products run, `"isa": "avx512"`) and the line compares
//! them with the AVX2 tile. Shapes: 1,024 tokens (`hone bench train`'s seq 256 × batch 4)
//! through the projections and output projections of the `small` and `smol` shapes.
//! The tunable keeps freed buffers in malloc's heap, as a training step's are.

use std::time::Instant;

use hone_model::kernels::{cpu, fma};

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * seed) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

fn main() {
    if !fma::cpu_has_avx2_fma() {
        eprintln!("this CPU has no AVX2 and FMA (isa {})", cpu::isa());
        std::process::exit(2);
    }
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(9)
        .max(1);
    let tokens = 1024;
    // Name, output features, summed values.
    let shapes = [
        ("small q/o h->h", 512, 512),
        ("small gate/up h->inter", 1408, 512),
        ("small down inter->h", 512, 1408),
        ("smol q/o h->h", 576, 576),
        ("smol k/v h->kv", 192, 576),
        ("smol gate/up h->inter", 1536, 576),
        ("smol down inter->h", 576, 1536),
        ("small output projection", 32000, 512),
        ("smol output projection", 49152, 576),
    ];
    let cpu_name = cpu::cpu_model().unwrap_or_default();
    for (name, n, k) in shapes {
        let x = values(tokens * k, 7919);
        let w = values(n * k, 31);
        let gflop = 2.0 * (tokens * n * k) as f64 / 1e9;
        let (mut gemm, mut tile) = (Vec::new(), Vec::new());
        for _ in 0..=repeats {
            let start = Instant::now();
            std::hint::black_box(cpu::linear_nt_gemm(&x, &w, tokens, n, k));
            gemm.push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            std::hint::black_box(fma::linear_nt(&x, &w, tokens, n, k));
            tile.push(start.elapsed().as_secs_f64());
        }
        // The first pair warms the buffers and the threads.
        let (g, t) = (median(gemm[1..].to_vec()), median(tile[1..].to_vec()));
        println!(
            "{{\"shape\": \"{name}\", \"m\": {tokens}, \"n\": {n}, \"k\": {k}, \
             \"gemm_gflops\": {:.1}, \"tile_gflops\": {:.1}, \"tile_speedup\": {:.3}, \
             \"cpu\": \"{cpu_name}\", \"isa\": \"{}\", \"threads\": {}}}",
            gflop / g,
            gflop / t,
            g / t,
            cpu::isa(),
            rayon::current_num_threads()
        );
    }
}
