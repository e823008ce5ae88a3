//! Host kernels on contiguous `f32` slices, multi-threaded with rayon: the fused operations of
//! a training step on the CPU (RMSNorm, RoPE, attention, SwiGLU, cross-entropy, LoRA's product)
//! and their
//! backward passes. Each forward computes in f32 what transformers computes; each backward is
//! the analytic gradient of its forward. Matrix products go through `gemm` (the library burn's
//! CPU backend uses), one single-threaded product per (batch, head) task.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Rows of work per rayon task for row-wise kernels (amortises scheduling on short rows).
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(1, 256)
}

/// `e^x` in f32 with a polynomial (Cephes `expf`, about 1 ulp), written so that it
/// vectorises; `x` is clamped to the finite range, so `exp(-inf)` is ~1e-38, not 0 (callers
/// zero masked entries themselves).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let bits = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((bits + 127) as u32) << 23)
}

/// Whether this build has the AVX-512 kernels (hone-model's `avx512` feature, default).
pub const AVX512_BUILD: bool = cfg!(feature = "avx512");

/// The vector extension hone's kernels and gemm's take on this machine in this build: `avx512`
/// when the CPU has AVX-512F and the `avx512` feature (default) is on, `avx2` with AVX2 + FMA,
/// `sse` otherwise (plain x86-64), the architecture's name elsewhere. Benchmarks and run
/// summaries report it as `isa`.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if AVX512_BUILD && std::arch::is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "avx2"
        } else {
            "sse"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

/// The CPU's model name (`model name` in `/proc/cpuinfo`; `None` where there is none), which
/// benchmark lines and run summaries report beside [`isa`].
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

/// Defines `pub fn $name(args) -> ret` that runs `$body` compiled for AVX-512 (with the
/// `avx512` feature) or AVX2+FMA when the CPU has them (checked at run time, as [`isa`] reports),
/// plain x86-64 otherwise. Bodies are written with independent lanes so that the compiler
/// vectorises them.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(feature = "avx512")]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($a: $t),*) $(-> $ret)? { body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) $(-> $ret)? { body($($a),*) }
                #[cfg(feature = "avx512")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { v4($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// For kernels elsewhere in the crate (the quantized matrix products of [`crate::gguf`]).
pub(crate) use multiversion;

const LANES: usize = 16;

multiversion! {
    /// Largest value of `x` (`-inf` when empty).
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for v in acc.iter().chain(rest) {
            m = if *v > m { *v } else { m };
        }
        m
    }
}

/// `out = Σ_j p[j] · values[j·D .. j·D + D]`, `out` in registers.
#[inline(always)]
fn weighted_fixed<const D: usize>(out: &mut [f32], p: &[f32], values: &[f32]) {
    let mut acc = [0f32; D];
    for (&w, v) in p.iter().zip(values.chunks_exact(D)) {
        let v: &[f32; D] = v.try_into().unwrap();
        for i in 0..D {
            acc[i] += w * v[i];
        }
    }
    out.copy_from_slice(&acc);
}

multiversion! {
    /// `out = Σ_j p[j] · values[j·d .. j·d + d]` (`out` has `d` values).
    fn weighted_rows(out: &mut [f32], p: &[f32], values: &[f32]) {
        match out.len() {
            64 => weighted_fixed::<64>(out, p, values),
            128 => weighted_fixed::<128>(out, p, values),
            d => {
                out.fill(0.0);
                for (&w, v) in p.iter().zip(values.chunks_exact(d)) {
                    for (o, x) in out.iter_mut().zip(v) {
                        *o += w * x;
                    }
                }
            }
        }
    }
}

/// `exp(v - shift)` of the values of a row's last partial vector `rest` (fewer than
/// [`LANES`]), computed as one whole vector, 0 in the lanes past them: short rows
/// (attention's causal ones end anywhere) would otherwise spend as long in a scalar tail of up
/// to 15 exps as in the vectors before it.
#[inline(always)]
fn exp_tail(rest: &[f32], shift: f32) -> [f32; LANES] {
    let mut tail = [shift; LANES];
    tail[..rest.len()].copy_from_slice(rest);
    for (i, t) in tail.iter_mut().enumerate() {
        let e = exp(*t - shift);
        *t = if i < rest.len() { e } else { 0.0 };
    }
    tail
}

multiversion! {
    /// `Σ exp(x - shift)`.
    fn sum_exp(x: &[f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift);
            }
        }
        acc.iter().sum::<f32>() + exp_tail(rest, shift).iter().sum::<f32>()
    }
}

multiversion! {
    /// `dst = scale · exp(x - shift)`.
    fn exp_scaled(dst: &mut [f32], x: &[f32], shift: f32, scale: f32) {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d = scale * exp(v - shift);
        }
    }
}

multiversion! {
    /// `x = exp(x - shift)`.
    fn exp_in_place(x: &mut [f32], shift: f32) {
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for v in c.iter_mut() {
                *v = exp(*v - shift);
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&exp_tail(rest, shift)[..n]);
        }
    }
}

multiversion! {
    /// `x = exp(x - shift)`, returning `Σ x` (one exp per value where `sum_exp` and then
    /// `exp_in_place` take two).
    fn exp_sum_in_place(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - shift);
                acc[i] += c[i];
            }
        }
        let rest = chunks.into_remainder();
        let tail = exp_tail(rest, shift);
        let n = rest.len();
        rest.copy_from_slice(&tail[..n]);
        acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
    }
}

multiversion! {
    /// `x = x · scale`.
    fn scale_in_place(x: &mut [f32], scale: f32) {
        for v in x.iter_mut() {
            *v *= scale;
        }
    }
}

/// Softmax of `x` in place (non-empty), returning its log-sum-exp: the largest value, one exp
/// per value with the sum taken on the way, one scaling pass.
fn softmax_in_place(x: &mut [f32]) -> f32 {
    let m = max(x);
    let sum = exp_sum_in_place(x, m);
    scale_in_place(x, 1.0 / sum);
    m + sum.ln()
}

multiversion! {
    /// `out = silu(g) · u`.
    fn swiglu_slice(out: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// Gradients of [`swiglu_slice`].
    fn swiglu_backward_slice(dg: &mut [f32], du: &mut [f32], d: &[f32], g: &[f32], u: &[f32]) {
        for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// Floats per task of [`zeroed`].
const ZERO_CHUNK: usize = 1 << 16;

/// `len` zeros, written by every thread (a kernel's output buffer: `vec![0.0; len]` would
/// zero it, and take the first touch of its fresh pages, on the calling thread alone while
/// the others wait for the kernel's parallel loop).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < ZERO_CHUNK {
        return vec![0f32; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(ZERO_CHUNK)
        .for_each(|c| {
            for x in c {
                x.write(0.0);
            }
        });
    // SAFETY: the first `len` elements were written just above.
    unsafe { v.set_len(len) };
    v
}

/// A chunk of a kernel's fresh output buffer, zeroed and handed out as values: the zeros go to
/// the cache lines the kernel overwrites right after, instead of a pass over the whole buffer
/// first ([`zeroed`]) that writes it to memory twice (that pass was ~2% of a smol training
/// step on AVX-512, for RMSNorm's and SwiGLU's outputs).
fn zero_chunk(c: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    for x in c.iter_mut() {
        x.write(0.0);
    }
    // SAFETY: every element was written just above; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// A raw pointer that rayon tasks may share; every use writes a region no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        // SAFETY (of callers): offsets stay inside the buffer the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// `dst = beta · lhs · rhs (+ dst when accumulate)`, all strided, single-threaded.
///
/// # Safety
/// Every pointer/stride pair must describe a valid matrix of the given shape.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// Lanes of the partial sums in the RMSNorm rows: independent accumulators, so that the sums
/// vectorise (a plain `.sum()` adds one value after the other, and those sums made RMSNorm's
/// forward and backward latency-bound: 0.34 ms a call on the smol shape, now 0.13-0.18). The
/// order of a float sum moves a 30-layer model's logits: SmolLM2's prompt logits against
/// transformers' (`tests/gguf_smollm2.rs`, tolerance 1e-4) differ by 7.3e-5 with the sequential
/// sum, 7.2e-5 with 16 lanes (one AVX-512 vector, as PyTorch's own reduction there), 9.8e-5,
/// 1.05e-4 and 9.4e-5 with 8, 32 and 64.
const NORM_LANES: usize = 16;

multiversion! {
    /// One row of [`rms_norm`]: writes `y = w · x · r` and returns `r = 1 / sqrt(mean(x²) + eps)`.
    fn rms_norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let mut acc = [0f32; NORM_LANES];
        let chunks = x.chunks_exact(NORM_LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..NORM_LANES {
                acc[i] += c[i] * c[i];
            }
        }
        let ss = acc.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>();
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = w * (x * r);
        }
        r
    }
}

multiversion! {
    /// One row of [`rms_norm_backward`]'s `dx` for the row's reciprocal root `r`: with
    /// `xhat = x r` and `dxhat = g w`, `dx = r (dxhat - xhat · mean(dxhat · xhat))`.
    fn rms_norm_backward_row(dx: &mut [f32], g: &[f32], x: &[f32], w: &[f32], r: f32) {
        let mut acc = [0f32; NORM_LANES];
        let n = x.len() / NORM_LANES * NORM_LANES;
        for ((g, x), w) in g[..n]
            .chunks_exact(NORM_LANES)
            .zip(x[..n].chunks_exact(NORM_LANES))
            .zip(w[..n].chunks_exact(NORM_LANES))
        {
            for i in 0..NORM_LANES {
                acc[i] += g[i] * w[i] * x[i];
            }
        }
        let tail: f32 = (n..x.len()).map(|i| g[i] * w[i] * x[i]).sum();
        let dot = acc.iter().sum::<f32>() + tail;
        let c = dot * r * r / x.len() as f32;
        for (((dx, g), w), x) in dx.iter_mut().zip(g).zip(w).zip(x) {
            *dx = r * (g * w - x * c);
        }
    }
}

/// `y = w · x / sqrt(mean(x²) + eps)` over rows of `x` `[rows, hidden]`; returns `y` and the
/// reciprocal root of each row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "rms_norm: rows of {h} expected"
    );
    let rows = x.len() / h;
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = vec![0f32; rows];
    let chunk = rows_per_task(h);
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(h * chunk)
        .zip(rstd.par_chunks_mut(chunk))
        .zip(x.par_chunks(h * chunk))
        .for_each(|((y, rstd), x)| {
            let y = zero_chunk(y);
            for ((y, r), x) in y.chunks_mut(h).zip(rstd.iter_mut()).zip(x.chunks(h)) {
                *r = rms_norm_row(y, x, w, eps);
            }
        });
    // SAFETY: the chunks covered all x.len() values (zero_chunk initialised each).
    unsafe { y.set_len(x.len()) };
    (y, rstd)
}

/// Gradients of [`rms_norm`]: `dx`, and `dw` when `want_dw`.
pub fn rms_norm_backward(
    g: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    want_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let h = w.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h) && g.len() == x.len() && rstd.len() == x.len() / h,
        "rms_norm_backward: shapes"
    );
    let mut dx = Vec::with_capacity(x.len());
    let chunk = rows_per_task(h);
    dx.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(h * chunk)
        .zip(g.par_chunks(h * chunk))
        .zip(x.par_chunks(h * chunk))
        .zip(rstd.par_chunks(chunk))
        .for_each(|(((dx, g), x), rstd)| {
            let dx = zero_chunk(dx);
            for (((dx, g), x), &r) in dx.chunks_mut(h).zip(g.chunks(h)).zip(x.chunks(h)).zip(rstd) {
                rms_norm_backward_row(dx, g, x, w, r);
            }
        });
    // SAFETY: the chunks covered all x.len() values (zero_chunk initialised each).
    unsafe { dx.set_len(x.len()) };
    let dw = want_dw.then(|| {
        let mut dw = vec![0f32; h];
        for ((g, x), &r) in g.chunks(h).zip(x.chunks(h)).zip(rstd) {
            for ((dw, g), x) in dw.iter_mut().zip(g).zip(x) {
                *dw += g * x * r;
            }
        }
        dw
    });
    (dx, dw)
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotary embedding in place over `x` `[tokens, heads, head_dim]` (the `[batch, seq, heads,
/// head_dim]` layout of a projection's output), `rotate_half` convention; the first `rot`
/// features of each head rotate. `cos`/`sin` are `[table_rows, rot]`; token `t` uses row
/// `t % table_rows` (one table shared by every batch row, or one row per token). `inverse`
/// rotates by the opposite angle (the gradient of the forward rotation).
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    rot: usize,
    inverse: bool,
) {
    let half = rot / 2;
    let table_rows = cos.len() / rot;
    let width = heads * head_dim;
    let chunk = rows_per_task(width);
    x.par_chunks_mut(width * chunk)
        .enumerate()
        .for_each(|(c, block)| {
            for (i, token) in block.chunks_mut(width).enumerate() {
                let row = (c * chunk + i) % table_rows;
                let cos = &cos[row * rot..row * rot + half];
                let sin = &sin[row * rot..row * rot + half];
                for head in token.chunks_mut(head_dim) {
                    let (a, b) = head[..rot].split_at_mut(half);
                    for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                        let s = if inverse { -s } else { s };
                        // [a, b] -> [a c - b s, b c + a s]
                        let (x1, x2) = (*a, *b);
                        *a = x1 * c - x2 * s;
                        *b = x2 * c + x1 * s;
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Which keys a query may see: causal, optionally within a sliding window, optionally only
/// within the same segment (packed rows) or a per-row boolean mask.
#[derive(Clone, Copy)]
pub enum Visibility<'a> {
    /// `k <= q` and, when `window > 0`, `q - k < window`.
    Causal { window: usize },
    /// `[batch, seq, seq]`, true = masked.
    Mask(&'a [bool]),
}

impl Visibility<'_> {
    #[inline]
    fn row(&self, b: usize, q: usize, seq: usize) -> RowMask<'_> {
        match *self {
            Visibility::Causal { window } => RowMask::Range {
                start: if window > 0 {
                    (q + 1).saturating_sub(window)
                } else {
                    0
                },
                end: q + 1,
            },
            Visibility::Mask(m) => {
                let row = &m[(b * seq + q) * seq..(b * seq + q + 1) * seq];
                RowMask::Mask(row)
            }
        }
    }
}

enum RowMask<'a> {
    Range { start: usize, end: usize },
    Mask(&'a [bool]),
}

/// Shapes of one attention call: `q`, `o` are `[batch, seq, heads, dim]`, `k`, `v` are
/// `[batch, seq, kv_heads, dim]` (the projections' own layout, no transposes).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    pub scale: f32,
}

impl AttnShape {
    fn q_offset(&self, b: usize, h: usize) -> usize {
        b * self.seq * self.heads * self.dim + h * self.dim
    }
    fn kv_offset(&self, b: usize, h: usize) -> usize {
        b * self.seq * self.kv_heads * self.dim + h * self.dim
    }
}

multiversion! {
    /// `Σ a·b` over 16 independent partial sums (a plain `.sum()` adds one product after the
    /// other: latency-bound).
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len()) / LANES * LANES;
        let mut acc = [0f32; LANES];
        for (a, b) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
            for i in 0..LANES {
                acc[i] += a[i] * b[i];
            }
        }
        let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(a, b)| a * b).sum();
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// One row of attention's score gradient in place: `p = p · (dp - di) · scale`.
    fn score_gradient_row(p: &mut [f32], dp: &[f32], di: f32, scale: f32) {
        for (pv, dpv) in p.iter_mut().zip(dp) {
            *pv *= (dpv - di) * scale;
        }
    }
}

/// Query rows per block of [`attention`] and [`attention_backward`]: each block multiplies only
/// the keys some row of it may see ([`key_span`]), so a causal pass does about half of the
/// `seq × seq` work (seq 256: 62.5%) while the products stay large enough for gemm.
const QUERY_BLOCK: usize = 64;

/// The keys `[start, end)` that query rows `q0..q1` of batch `b` may see between them (`(0, 0)`
/// when none may see any).
fn key_span(vis: &Visibility, b: usize, q0: usize, q1: usize, seq: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (seq, 0);
    for q in q0..q1 {
        let (start, end) = match vis.row(b, q, seq) {
            RowMask::Range { start, end } => (start, end),
            RowMask::Mask(mask) => match mask.iter().position(|&m| !m) {
                Some(first) => (first, mask.iter().rposition(|&m| !m).map_or(seq, |l| l + 1)),
                None => continue,
            },
        };
        (lo, hi) = (lo.min(start), hi.max(end));
    }
    if lo < hi {
        (lo, hi)
    } else {
        (0, 0)
    }
}

/// Turns raw scores `p` `[rows, cols]` of query rows `q0..` (batch `b`) over keys
/// `ks..ks + cols` (every key they may see: [`key_span`]) into probabilities in place
/// (masked = 0) and writes each row's log-sum-exp. With `lse_in`, recomputes the probabilities
/// from it.
#[allow(clippy::too_many_arguments)]
fn softmax_rows(
    p: &mut [f32],
    cols: usize,
    (b, q0, ks, seq): (usize, usize, usize, usize),
    vis: &Visibility,
    lse_out: &mut [f32],
    lse_in: Option<&[f32]>,
) {
    let rows = lse_out.len();
    for i in 0..rows {
        let row = &mut p[i * cols..(i + 1) * cols];
        match vis.row(b, q0 + i, seq) {
            RowMask::Range { start, end } => {
                let (start, end) = (start - ks, end - ks);
                row[..start].fill(0.0);
                row[end..].fill(0.0);
                let live = &mut row[start..end];
                lse_out[i] = match lse_in {
                    Some(l) => {
                        exp_in_place(live, l[i]);
                        l[i]
                    }
                    None => softmax_in_place(live),
                };
            }
            RowMask::Mask(mask) => {
                let mask = &mask[ks..ks + cols];
                let lse = match lse_in {
                    Some(l) => l[i],
                    None => {
                        let mut max = f32::NEG_INFINITY;
                        for (v, &m) in row.iter().zip(mask) {
                            if !m {
                                max = max.max(*v);
                            }
                        }
                        let mut sum = 0f32;
                        for (v, &m) in row.iter().zip(mask) {
                            if !m {
                                sum += exp(v - max);
                            }
                        }
                        max + sum.ln()
                    }
                };
                for (v, &m) in row.iter_mut().zip(mask) {
                    *v = if m { 0.0 } else { exp(*v - lse) };
                }
                lse_out[i] = lse;
            }
        }
    }
}

/// One key/value head's rows `[seq, dim]` (from offset `o`, row stride `stride`) transposed
/// into `dst` `[dim, seq]`, through `tmp` (the rows gathered contiguous first, so the
/// transpose runs on whole 8 × 8 blocks).
fn head_transposed(
    src: &[f32],
    o: usize,
    stride: usize,
    (seq, d): (usize, usize),
    tmp: &mut Vec<f32>,
    dst: &mut Vec<f32>,
) {
    tmp.clear();
    for t in 0..seq {
        tmp.extend_from_slice(&src[o + t * stride..o + t * stride + d]);
    }
    dst.resize(seq * d, 0.0);
    crate::gguf::matmul::transpose_into(tmp, seq, d, dst);
}

/// Column-major `dst(i, j) = beta · Σ_l lhs(i, l) · rhs(l, j)` (`+=` with `accumulate`) on
/// this thread, `dst(i, j)` at `dst[i + j·dst_cs]`, `lhs(i, l)` at `lhs[i + l·lhs_cs]`,
/// `rhs(l, j)` at `rhs[l·rhs_rs + j·rhs_cs]`: one of attention's block products, each written
/// so that gemm's left-hand side has its rows contiguous (what gemm packs fastest).
///
/// # Safety
/// Every address named above must be valid and `dst`'s elements not accessed elsewhere
/// during the call.
unsafe fn block_product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_cs): (*const f32, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    beta: f32,
) {
    // On the AVX2 path, hone's tile reading both sides in place (attention 2-5% faster in a
    // smol training step than through gemm, which packs both every call).
    #[cfg(target_arch = "x86_64")]
    if super::fma::available() {
        // dstᵀ [n, m] (row stride dst_cs) = rhsᵀ · lhsᵀ, lhsᵀ's rows being lhs's columns.
        let a = super::fma::InPlace {
            ptr: rhs,
            rs: rhs_cs,
            ds: rhs_rs,
        };
        super::fma::product_in_place((n, m, k), a, (lhs, lhs_cs), (dst, dst_cs), beta, accumulate);
        return;
    }
    matmul(
        m, n, k, dst, 1, dst_cs, accumulate, lhs, 1, lhs_cs, rhs, rhs_rs, rhs_cs, beta,
    )
}

/// `p = scale · Q Kᵀ` `[rows, cols]` (row-major) for `rows` query rows from offset `qo` of `q`
/// and keys `ks..ks + cols` of the transposed head `kt` `[dim, seq]` ([`head_transposed`]).
#[allow(clippy::too_many_arguments)]
fn scores(
    p: &mut [f32],
    q: &[f32],
    kt: &[f32],
    s: &AttnShape,
    (qo, rows): (usize, usize),
    (ks, cols): (usize, usize),
) {
    let (d, seq, hd) = (s.dim, s.seq, s.heads * s.dim);
    assert!(rows > 0 && cols > 0 && p.len() >= rows * cols);
    assert!(qo + (rows - 1) * hd + d <= q.len());
    assert!(kt.len() >= d * seq && ks + cols <= seq);
    // SAFETY: the assertions bound every read and the `rows × cols` write. Sᵀ [cols, rows]
    // column-major is p row-major.
    unsafe {
        block_product(
            (cols, rows, d),
            (p.as_mut_ptr(), cols),
            false,
            (kt.as_ptr().add(ks), seq),
            (q.as_ptr().add(qo), 1, hd),
            s.scale,
        );
    }
}

/// Scaled dot-product attention with grouped key/value heads. Returns the output
/// `[batch, seq, heads, dim]` and the log-sum-exp of every score row `[batch, heads, seq]`
/// (what the backward pass needs to rebuild the probabilities). Work is split by (row, head),
/// then by blocks of [`QUERY_BLOCK`] queries over the keys they may see.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    vis: Visibility,
) -> (Vec<f32>, Vec<f32>) {
    let (seq, d) = (s.seq, s.dim);
    let groups = s.heads / s.kv_heads;
    let (hd, kd) = (s.heads * d, s.kv_heads * d);
    let mut out = zeroed(q.len());
    let mut lse = vec![0f32; s.batch * s.heads * seq];
    let optr = Shared(out.as_mut_ptr());
    lse.par_chunks_mut(seq).enumerate().for_each_init(
        || {
            (
                vec![0f32; QUERY_BLOCK.min(seq) * seq],
                Vec::new(),
                Vec::new(),
            )
        },
        |(p, tmp, kt), (bh, lse)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (qo, ko) = (s.q_offset(b, h), s.kv_offset(b, h / groups));
            head_transposed(k, ko, kd, (seq, d), tmp, kt);
            for q0 in (0..seq).step_by(QUERY_BLOCK) {
                let q1 = (q0 + QUERY_BLOCK).min(seq);
                let (ks, ke) = key_span(&vis, b, q0, q1, seq);
                let (rows, cols) = (q1 - q0, ke - ks);
                let (qb, kb) = (qo + q0 * hd, ko + ks * kd);
                if cols > 0 {
                    scores(p, q, kt, &s, (qb, rows), (ks, cols));
                }
                softmax_rows(p, cols, (b, q0, ks, seq), &vis, &mut lse[q0..q1], None);
                if cols == 0 {
                    continue; // no key visible: the rows stay 0
                }
                // SAFETY: slices cover every strided row; each task writes its own head's
                // columns of `out`. Oᵀ [d, rows] = Vᵀ Pᵀ.
                unsafe {
                    block_product(
                        (d, rows, cols),
                        (optr.at(qb), hd),
                        false,
                        (v.as_ptr().add(kb), kd),
                        (p.as_ptr(), 1, cols),
                        1.0,
                    );
                }
            }
        },
    );
    (out, lse)
}

/// A host KV cache as [`attention_cached`] reads it: keys and values `[batch, kv_heads,
/// capacity, dim]` holding `past` positions before the new ones (already written).
#[derive(Clone, Copy)]
pub struct CachedKv<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub capacity: usize,
    pub past: usize,
}

/// Cached attention's work (queries × keys × head width × heads) below which one thread does
/// every (row, head). A decoding step's heads are a few microseconds each, but with the pool's
/// threads polling during a generation ([`crate::in_busy_pool`]) splitting them costs less than
/// the other thread idling: at `1 << 14` (SmolLM2 from ~28 cached positions) instead of `1 << 18`
/// (~455) decoding 256 tokens ran 215 → 230 tokens/s (Q4_1, 8-bit activations) and 95 → 99 (F16),
/// medians of five and six alternated runs on Zen 4.
const CACHED_PARALLEL_WORK: usize = 1 << 14;

/// Query head `h` of one row of [`attention_cached_rows`]: the row's `seq` queries are `q`'s
/// token rows `q0..q0 + seq` (`q` `[tokens, heads, dim]`), the cache's kv row `kb`, output
/// written at the same place as `q`'s.
///
/// # Safety
/// `out` points to a buffer shaped like `q` that nothing else writes at this head's columns of
/// these token rows.
#[allow(clippy::too_many_arguments)]
unsafe fn cached_head(
    p: &mut Vec<f32>,
    q: &[f32],
    (q0, seq, kb, h): (usize, usize, usize, usize),
    kv: &CachedKv,
    s: &AttnShape,
    window: usize,
    out: &Shared,
) {
    let d = s.dim;
    let (past, capacity) = (kv.past, kv.capacity);
    let total = past + seq;
    let hd = s.heads * d;
    let groups = s.heads / s.kv_heads;
    let ko = (kb * s.kv_heads + h / groups) * capacity * d;
    let qo = q0 * hd + h * d;
    if seq == 0 {
        return;
    }
    assert!(
        qo + (seq - 1) * hd + d <= q.len() && ko + total * d <= kv.keys.len().min(kv.values.len()),
        "attention_cached: shapes"
    );
    p.resize(seq * total, 0.0);
    // SAFETY: q rows `qo + i·hd .. + d` for i < seq and cache rows `ko + j·d .. + d` for
    // j < total lie inside the slices (checked above); `p` holds seq × total values.
    matmul(
        seq,
        total,
        d,
        p.as_mut_ptr(),
        total,
        1,
        false,
        q.as_ptr().add(qo),
        hd,
        1,
        kv.keys.as_ptr().add(ko),
        1,
        d,
        s.scale,
    );
    for (i, row) in p.chunks_mut(total).enumerate() {
        let end = past + i + 1;
        let start = if window > 0 {
            end.saturating_sub(window)
        } else {
            0
        };
        row[..start].fill(0.0);
        row[end..].fill(0.0);
        let live = &mut row[start..end];
        softmax_in_place(live);
    }
    if seq == 1 {
        // One query (a decoding step): the weighted sum of the visible value rows, kept in
        // registers (a product of one row through gemm costs more).
        let start = if window > 0 {
            total.saturating_sub(window)
        } else {
            0
        };
        // SAFETY: the caller gives this head's `d` columns of `out` at `qo` to this call alone.
        let out = std::slice::from_raw_parts_mut(out.at(qo), d);
        weighted_rows(
            out,
            &p[start..total],
            &kv.values[ko + start * d..ko + total * d],
        );
        return;
    }
    // SAFETY: as above; the caller gives this head's columns of `out` to this call alone.
    matmul(
        seq,
        d,
        total,
        out.at(qo),
        hd,
        1,
        false,
        p.as_ptr(),
        total,
        1,
        kv.values.as_ptr().add(ko),
        d,
        1,
        1.0,
    );
}

/// Attention of `s.seq` new queries per row (`q` `[batch, seq, heads, dim]`, RoPE applied) over
/// the `past + seq` keys and values of a host KV cache (`[batch, kv_heads, capacity, dim]`, the
/// new positions already written): query `i` sees keys `..=past + i` (and, with `window > 0`,
/// only the last `window` of them). Returns `[batch, seq, heads, dim]`. Keys and values are read
/// in place; work is split by (row, head).
pub fn attention_cached(q: &[f32], kv: CachedKv, s: AttnShape, window: usize) -> Vec<f32> {
    assert!(
        q.len() == s.batch * s.seq * s.heads * s.dim,
        "attention_cached: q shape"
    );
    assert!(
        kv.past + s.seq <= kv.capacity,
        "attention_cached: cache shape"
    );
    attention_cached_rows(q, &vec![kv; s.batch], s, window, true)
}

/// [`attention_cached`] with one cache per row (rows of different lengths, as a serving batch):
/// row `b`'s queries attend over `caches[b]` (its kv row 0, or row `b` with `shared` = one
/// cache for the whole batch). All (row, head) pairs are split across threads at once.
pub fn attention_cached_rows(
    q: &[f32],
    caches: &[CachedKv],
    s: AttnShape,
    window: usize,
    shared: bool,
) -> Vec<f32> {
    assert!(
        q.len() == s.batch * s.seq * s.heads * s.dim && caches.len() == s.batch,
        "attention_cached_rows: q is not [rows, seq, heads, dim] with a cache per row"
    );
    let spans: Vec<(usize, usize)> = (0..s.batch).map(|b| (b * s.seq, s.seq)).collect();
    cached_spans(q, caches, &spans, s, window, shared)
}

/// [`attention_cached_rows`] for rows of different numbers of new queries, their tokens one
/// after the other (`q` `[tokens, heads, dim]`, row `b` = `lens[b]` tokens, as a serving step
/// that decodes some rows and prefills a chunk of others): row `b`'s queries attend over
/// `caches[b]` (kv row 0, the new positions already written). `s.batch` and `s.seq` are not
/// read. Returns `[tokens, heads, dim]`.
pub fn attention_cached_ragged(
    q: &[f32],
    caches: &[CachedKv],
    lens: &[usize],
    s: AttnShape,
    window: usize,
) -> Vec<f32> {
    let tokens: usize = lens.iter().sum();
    assert!(
        q.len() == tokens * s.heads * s.dim && caches.len() == lens.len(),
        "attention_cached_ragged: q is not [tokens, heads, dim] with a cache per row"
    );
    let mut spans = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        spans.push((start, len));
        start += len;
    }
    cached_spans(q, caches, &spans, s, window, false)
}

/// Row `b`'s queries (token rows `spans[b].0..` + `spans[b].1` of `q`) over `caches[b]`, every
/// (row, head) at once.
fn cached_spans(
    q: &[f32],
    caches: &[CachedKv],
    spans: &[(usize, usize)],
    s: AttnShape,
    window: usize,
    shared: bool,
) -> Vec<f32> {
    let mut out = zeroed(q.len());
    let optr = Shared(out.as_mut_ptr());
    let task = |p: &mut Vec<f32>, bh: usize| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let kb = if shared { b } else { 0 };
        let (q0, seq) = spans[b];
        // SAFETY: each (row, head) writes its own columns of its own token rows of `out`.
        unsafe { cached_head(p, q, (q0, seq, kb, h), &caches[b], &s, window, &optr) }
    };
    let tasks = spans.len() * s.heads;
    let work: usize = caches
        .iter()
        .zip(spans)
        .map(|(c, &(_, seq))| seq * (c.past + seq) * s.dim * s.heads)
        .sum();
    if work < CACHED_PARALLEL_WORK {
        let mut p = Vec::new();
        (0..tasks).for_each(|bh| task(&mut p, bh));
    } else {
        (0..tasks)
            .into_par_iter()
            .for_each_init(Vec::new, |p, bh| task(p, bh));
    }
    out
}

/// Gradients of [`attention`] with respect to `q`, `k` and `v`, from the output gradient `g`,
/// the forward output `o` and its log-sum-exp rows (probabilities are recomputed, not stored).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    g: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    s: AttnShape,
    vis: Visibility,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (seq, d) = (s.seq, s.dim);
    let groups = s.heads / s.kv_heads;
    let mut dq = zeroed(q.len());
    let mut dk = zeroed(k.len());
    let mut dv = zeroed(v.len());
    let (dqp, dkp, dvp) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let (hd, kd) = (s.heads * d, s.kv_heads * d);
    let block = QUERY_BLOCK.min(seq);
    (0..s.batch * s.kv_heads).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; block * seq],
                vec![0f32; block * seq],
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )
        },
        |(p, dp, tmp, kt, vt), bk| {
            let (b, kvh) = (bk / s.kv_heads, bk % s.kv_heads);
            let ko = s.kv_offset(b, kvh);
            head_transposed(k, ko, kd, (seq, d), tmp, kt);
            head_transposed(v, ko, kd, (seq, d), tmp, vt);
            for gi in 0..groups {
                let h = kvh * groups + gi;
                let qo = s.q_offset(b, h);
                let lse = &lse[(b * s.heads + h) * seq..(b * s.heads + h + 1) * seq];
                for q0 in (0..seq).step_by(QUERY_BLOCK) {
                    let q1 = (q0 + QUERY_BLOCK).min(seq);
                    let (ks, ke) = key_span(&vis, b, q0, q1, seq);
                    let (rows, cols) = (q1 - q0, ke - ks);
                    if cols == 0 {
                        continue; // no key visible: no gradient
                    }
                    let (qb, kb) = (qo + q0 * hd, ko + ks * kd);
                    let mut lse_scratch = [0f32; QUERY_BLOCK];
                    scores(p, q, kt, &s, (qb, rows), (ks, cols));
                    softmax_rows(
                        p,
                        cols,
                        (b, q0, ks, seq),
                        &vis,
                        &mut lse_scratch[..rows],
                        Some(&lse[q0..q1]),
                    );
                    // SAFETY: as in `attention`; the task owns kv head `kvh` of batch `b` and
                    // the query heads of its group, so its writes to dq/dk/dv are disjoint (dk
                    // and dv start at 0 and every block adds to them).
                    unsafe {
                        // dVᵀ [d, cols] += dOᵀ P
                        block_product(
                            (d, cols, rows),
                            (dvp.at(kb), kd),
                            true,
                            (g.as_ptr().add(qb), hd),
                            (p.as_ptr(), cols, 1),
                            1.0,
                        );
                        // dPᵀ [cols, rows] = V dOᵀ (dP row-major)
                        block_product(
                            (cols, rows, d),
                            (dp.as_mut_ptr(), cols),
                            false,
                            (vt.as_ptr().add(ks), seq),
                            (g.as_ptr().add(qb), 1, hd),
                            1.0,
                        );
                    }
                    // dS = P (dP - rowsum(dO o)), scaled for the score's `scale`.
                    for (i, (prow, dprow)) in p[..rows * cols]
                        .chunks_mut(cols)
                        .zip(dp.chunks(cols))
                        .enumerate()
                    {
                        let at = qb + i * hd;
                        let di = dot(&g[at..at + d], &o[at..at + d]);
                        score_gradient_row(prow, dprow, di, s.scale);
                    }
                    unsafe {
                        // dQᵀ [d, rows] = Kᵀ dSᵀ
                        block_product(
                            (d, rows, cols),
                            (dqp.at(qb), hd),
                            false,
                            (k.as_ptr().add(kb), kd),
                            (p.as_ptr(), 1, cols),
                            1.0,
                        );
                        // dKᵀ [d, cols] += Qᵀ dS
                        block_product(
                            (d, cols, rows),
                            (dkp.at(kb), kd),
                            true,
                            (q.as_ptr().add(qb), hd),
                            (p.as_ptr(), cols, 1),
                            1.0,
                        );
                    }
                }
            }
        },
    );
    (dq, dk, dv)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in length");
    let mut out = Vec::with_capacity(gate.len());
    out.spare_capacity_mut()[..gate.len()]
        .par_chunks_mut(16_384)
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384))
        .for_each(|((o, g), u)| {
            swiglu_slice(zero_chunk(o), g, u);
        });
    // SAFETY: the chunks covered all gate.len() values (zero_chunk initialised each).
    unsafe { out.set_len(gate.len()) };
    out
}

/// Gradients of [`swiglu`] with respect to `gate` and `up`.
pub fn swiglu_backward(dout: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = gate.len();
    assert!(
        up.len() == n && dout.len() == n,
        "swiglu_backward: gate, up and the gradient differ in length"
    );
    let (mut dg, mut du) = (Vec::with_capacity(n), Vec::with_capacity(n));
    dg.spare_capacity_mut()[..n]
        .par_chunks_mut(16_384)
        .zip(du.spare_capacity_mut()[..n].par_chunks_mut(16_384))
        .zip(dout.par_chunks(16_384))
        .zip(gate.par_chunks(16_384).zip(up.par_chunks(16_384)))
        .for_each(|(((dg, du), d), (g, u))| {
            swiglu_backward_slice(zero_chunk(dg), zero_chunk(du), d, g, u);
        });
    // SAFETY: the chunks covered all n values of both (zero_chunk initialised each).
    unsafe {
        dg.set_len(n);
        du.set_len(n);
    }
    (dg, du)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Summed negative log-likelihood of `targets` (`< 0` = not counted) under the rows of
/// `logits` `[rows, vocab]`, and each row's log-sum-exp.
pub fn nll_sum(logits: &[f32], vocab: usize, targets: &[i64]) -> (f64, Vec<f32>) {
    let rows = targets.len();
    let mut lse = vec![0f32; rows];
    let chunk = rows_per_task(vocab).max(1);
    let total: f64 = lse
        .par_chunks_mut(chunk)
        .zip(logits.par_chunks(vocab * chunk))
        .zip(targets.par_chunks(chunk))
        .map(|((lse, x), t)| {
            let mut total = 0f64;
            for ((lse, x), &t) in lse.iter_mut().zip(x.chunks(vocab)).zip(t) {
                let max = max(x);
                *lse = max + sum_exp(x, max).ln();
                if t >= 0 {
                    total += f64::from(*lse - x[t as usize]);
                }
            }
            total
        })
        .sum();
    (total, lse)
}

/// Gradient of [`nll_sum`] scaled by `g`: `g · (softmax(row) - onehot(target))` on counted
/// rows, zero on the others.
pub fn nll_sum_backward(
    g: f32,
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    lse: &[f32],
) -> Vec<f32> {
    let mut dx = zeroed(logits.len());
    let chunk = rows_per_task(vocab).max(1);
    dx.par_chunks_mut(vocab * chunk)
        .zip(logits.par_chunks(vocab * chunk))
        .zip(targets.par_chunks(chunk).zip(lse.par_chunks(chunk)))
        .for_each(|((dx, x), (t, lse))| {
            for (((dx, x), &t), &lse) in dx.chunks_mut(vocab).zip(x.chunks(vocab)).zip(t).zip(lse) {
                if t < 0 {
                    continue;
                }
                exp_scaled(dx, x, lse, g);
                dx[t as usize] -= g;
            }
        });
    dx
}

/// Bytes of logits [`linear_nll_sum`] materialises at a time, and the fewest rows it takes at a
/// time whatever the vocabulary. Each block's product packs the whole `[vocab, h]` weight again
/// (gemm transposes it element by element), so blocks are as tall as this budget allows: on a
/// 32k vocabulary, 1,024 rows in one block instead of four of 256 take 20% less time (AMD EPYC,
/// AVX-512).
const LOGIT_BLOCK_BYTES: usize = 128 << 20;
const LOGIT_MIN_ROWS: usize = 256;

/// Rows per block of [`linear_nll_sum`] for `rows` rows over `vocab` logits: the budget's
/// rows (at least [`LOGIT_MIN_ROWS`]), evened out over the blocks `rows` needs.
fn logit_block_rows(rows: usize, vocab: usize) -> usize {
    let cap = (LOGIT_BLOCK_BYTES / (vocab.max(1) * 4)).max(LOGIT_MIN_ROWS);
    let blocks = rows.div_ceil(cap).max(1);
    rows.div_ceil(blocks).max(1)
}

/// Cross-entropy through the output projection without materialising the logits: for
/// `hidden` `[rows, h]` and `weight` `[vocab, h]`, the summed negative log-likelihood of
/// `targets` (`< 0` = ignored) under `hidden · weightᵀ`, and its gradient with respect to
/// `hidden` (`(softmax - onehot) · weight` on counted rows), both computed block by block of
/// rows ([`logit_block_rows`]). The gradient is what the backward pass scales by its incoming gradient.
/// Only counted rows are multiplied: ignored ones (prompt tokens of instruction data, padding)
/// cost no logits and have a zero gradient.
pub fn linear_nll_sum(
    hidden: &[f32],
    weight: &[f32],
    h: usize,
    targets: &[i64],
    want_grad: bool,
) -> (f64, Vec<f32>) {
    let vocab = weight.len() / h;
    let counted: Vec<usize> = (0..targets.len()).filter(|&i| targets[i] >= 0).collect();
    if counted.len() == targets.len() {
        let block_rows = logit_block_rows(targets.len(), vocab);
        return linear_nll_sum_blocks(hidden, weight, h, targets, want_grad, block_rows);
    }
    let kept: Vec<f32> = counted
        .iter()
        .flat_map(|&i| hidden[i * h..(i + 1) * h].iter().copied())
        .collect();
    let kept_targets: Vec<i64> = counted.iter().map(|&i| targets[i]).collect();
    let block_rows = logit_block_rows(counted.len(), vocab);
    let (total, kept_dh) =
        linear_nll_sum_blocks(&kept, weight, h, &kept_targets, want_grad, block_rows);
    if !want_grad {
        return (total, kept_dh);
    }
    let mut dh = zeroed(targets.len() * h);
    for (j, &i) in counted.iter().enumerate() {
        dh[i * h..(i + 1) * h].copy_from_slice(&kept_dh[j * h..(j + 1) * h]);
    }
    (total, dh)
}

/// [`linear_nll_sum`] with `block_rows` rows of logits at a time.
fn linear_nll_sum_blocks(
    hidden: &[f32],
    weight: &[f32],
    h: usize,
    targets: &[i64],
    want_grad: bool,
    block_rows: usize,
) -> (f64, Vec<f32>) {
    let vocab = weight.len() / h;
    let rows = targets.len();
    let mut dh = zeroed(if want_grad { rows * h } else { 0 });
    // Not zeroed: gemm writes every logit of a block before anything reads it (zeroing
    // 128 MiB of them was ~1% of a training step).
    let mut logits: Vec<f32> = Vec::with_capacity(block_rows.min(rows) * vocab);
    let mut total = 0f64;
    for start in (0..rows).step_by(block_rows) {
        let n = block_rows.min(rows - start);
        if super::fma::available() {
            logits.clear();
            let block = &mut logits.spare_capacity_mut()[..n * vocab];
            super::fma::linear_nt_into(
                &hidden[start * h..(start + n) * h],
                weight,
                n,
                vocab,
                h,
                block,
            );
            // SAFETY: linear_nt_into wrote the block's n × vocab logits.
            unsafe { logits.set_len(n * vocab) };
        } else {
            // SAFETY: `hidden` rows start..start+n, `weight` [vocab, h], the block's `n × vocab`
            // floats inside logits' allocation; gemm writes all of them (accumulate false) without
            // reading any, so the first `n × vocab` are initialized after it (the first block is
            // the tallest, so later blocks lie inside the length it sets).
            unsafe {
                gemm(
                    n,
                    vocab,
                    h,
                    logits.as_mut_ptr(),
                    1,
                    vocab as isize,
                    false,
                    hidden.as_ptr().add(start * h),
                    1,
                    h as isize,
                    weight.as_ptr(),
                    h as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::Rayon(0),
                );
                if logits.len() < n * vocab {
                    logits.set_len(n * vocab);
                }
            }
        }
        let block = &mut logits[..n * vocab];
        let t = &targets[start..start + n];
        total += block
            .par_chunks_mut(vocab)
            .zip(t.par_iter())
            .map(|(x, &t)| {
                if t < 0 {
                    x.fill(0.0);
                    return 0.0;
                }
                let target = x[t as usize];
                let lse = softmax_in_place(x);
                let loss = f64::from(lse - target);
                x[t as usize] -= 1.0;
                loss
            })
            .sum::<f64>();
        if !want_grad {
            continue;
        }
        // dh[start..start+n] = block · weight
        matmul_split_depth(
            block,
            weight,
            (n, h, vocab),
            &mut dh[start * h..(start + n) * h],
        );
    }
    (total, dh)
}

/// Depth per thread below which [`matmul_split_depth`] does not split.
const SPLIT_DEPTH_MIN: usize = 4096;

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` (row-major) for a depth `k` far larger than `m × n`
/// wants (the output projection's input gradient: depth = vocabulary): each thread multiplies
/// its own slice of the depth on its own (a single-threaded gemm into a buffer of its own, the
/// first into `dst`), then the partial products are summed by rows. gemm's own threading splits
/// the small output instead and re-reads it once per depth block: on the smol shape's 512 ×
/// 49,152 · 49,152 × 576 (AVX-512 Xeon) 307-337 GFLOP/s that way, 361-383 this way.
fn matmul_split_depth(lhs: &[f32], rhs: &[f32], (m, n, k): (usize, usize, usize), dst: &mut [f32]) {
    assert!(
        lhs.len() >= m * k && rhs.len() >= k * n && dst.len() >= m * n,
        "matmul_split_depth: shapes"
    );
    if m * n == 0 || k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    let parts = (k / SPLIT_DEPTH_MIN).clamp(1, rayon::current_num_threads());
    let chunk = k.div_ceil(parts);
    let product = |k0: usize, out: &mut [f32]| {
        let kc = chunk.min(k - k0);
        // SAFETY: lhs columns k0..k0 + kc of its m rows, rhs rows k0..k0 + kc, out [m, n];
        // gemm writes every element of out without reading it (accumulate false).
        unsafe {
            gemm(
                m,
                n,
                kc,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr().add(k0),
                1,
                k as isize,
                rhs.as_ptr().add(k0 * n),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    };
    if parts == 1 {
        product(0, &mut dst[..m * n]);
        return;
    }
    let mut partial = vec![0f32; (parts - 1) * m * n];
    rayon::scope(|s| {
        for (i, out) in partial.chunks_mut(m * n).enumerate() {
            s.spawn(move |_| product((i + 1) * chunk, out));
        }
        product(0, &mut dst[..m * n]);
    });
    dst[..m * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(r, row)| {
            for p in partial.chunks(m * n) {
                row.iter_mut()
                    .zip(&p[r * n..(r + 1) * n])
                    .for_each(|(d, v)| *d += v);
            }
        });
}

// ---------------------------------------------------------------------------------------------
// LoRA: the adapter's thin products (one side of each is the rank r, 8–64), which gemm's
// multi-threaded path splits badly (a few GFLOP/s on 2 cores). Here each thread runs a
// single-threaded product on its own rows, or on its own slice of the summed dimension with
// the partial sums added at the end.

/// Rows (or summed rows) per thread below which one thread does it all.
const LORA_MIN_ROWS_PER_THREAD: usize = 64;

fn lora_threads(rows: usize) -> usize {
    (rows / LORA_MIN_ROWS_PER_THREAD).clamp(1, rayon::current_num_threads())
}

/// `dst [m, n] = beta · lhs [m, k] · rhs` (row-major `lhs`, `rhs` given by its strides), the
/// rows of `lhs`/`dst` split across threads.
#[allow(clippy::too_many_arguments)]
fn matmul_rows(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) -> Vec<f32> {
    let mut dst = zeroed(m * n);
    matmul_rows_into(&mut dst, false, (m, n, k), lhs, (rhs, rhs_rs, rhs_cs), beta);
    dst
}

/// [`matmul_rows`] into `dst` `[m, n]`, added to what it holds with `accumulate`.
fn matmul_rows_into(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    beta: f32,
) {
    assert!(
        dst.len() >= m * n
            && lhs.len() >= m * k
            && rhs.len() > (k.max(1) - 1) * rhs_rs + (n.max(1) - 1) * rhs_cs
    );
    let threads = lora_threads(m);
    let per = m.div_ceil(threads).max(1);
    dst[..m * n]
        .par_chunks_mut(per * n.max(1))
        .zip(lhs.par_chunks(per * k.max(1)))
        .for_each(|(d, l)| {
            let rows = d.len() / n.max(1);
            // SAFETY: `d` is `rows × n`, `l` is `rows × k` (row-major), `rhs` is `k × n` with the
            // given strides (checked above).
            unsafe {
                matmul(
                    rows,
                    n,
                    k,
                    d.as_mut_ptr(),
                    n,
                    1,
                    accumulate,
                    l.as_ptr(),
                    k,
                    1,
                    rhs.as_ptr(),
                    rhs_rs,
                    rhs_cs,
                    beta,
                )
            }
        });
}

/// `dst [m, n] = beta · aᵀ · b` for row-major `a [rows, m]`, `b [rows, n]` (a sum over the
/// rows), the rows split across threads and the partial sums added.
fn matmul_tn(rows: usize, m: usize, n: usize, a: &[f32], b: &[f32], beta: f32) -> Vec<f32> {
    assert!(a.len() >= rows * m && b.len() >= rows * n);
    let threads = lora_threads(rows);
    let per = rows.div_ceil(threads).max(1);
    let partial = |start: usize| {
        let len = per.min(rows - start);
        let mut d = vec![0f32; m * n];
        // SAFETY: `a[start..start+len]` is `len × m` and `b[...]` is `len × n`, row-major;
        // `aᵀ` is read with row stride 1 and column stride m.
        unsafe {
            matmul(
                m,
                n,
                len,
                d.as_mut_ptr(),
                n,
                1,
                false,
                a.as_ptr().add(start * m),
                1,
                m,
                b.as_ptr().add(start * n),
                n,
                1,
                beta,
            )
        }
        d
    };
    let starts: Vec<usize> = (0..rows).step_by(per).collect();
    let mut parts = starts.into_par_iter().map(partial).collect::<Vec<_>>();
    let mut sum = parts.pop().unwrap_or_else(|| vec![0f32; m * n]);
    for p in parts {
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    sum
}

/// `y [m, n] = x [m, k] · wᵀ` for a row-major `w` `[n, k]`, on every thread: hone's own AVX2
/// tile on the AVX2 path ([`super::fma`]), gemm elsewhere ([`linear_nt_gemm`]).
pub fn linear_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    if super::fma::available() {
        return super::fma::linear_nt(x, w, m, n, k);
    }
    linear_nt_gemm(x, w, m, n, k)
}

/// [`linear_nt`] through gemm on any CPU (what the AVX2 path is measured against:
/// `examples/avx2_products.rs`). `w` is transposed first (8 × 8 AVX blocks, in parallel
/// bands): given `w`'s rows as they are, gemm packs them for its kernel one strided value at a
/// time (measured: ~5% of a training step).
pub fn linear_nt_gemm(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k, "linear_nt: shapes");
    matmul_par(m, n, k, x, &transpose_par(w, n, k))
}

/// `dx [m, k] = g [m, n] · w` for a row-major `w` `[n, k]` (the input gradient of
/// [`linear_nt`]), on every thread: hone's AVX2 tile on the AVX2 path, gemm elsewhere.
pub fn linear_nn(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(g.len() >= m * n && w.len() >= n * k, "linear_nn: shapes");
    if super::fma::available() {
        return super::fma::linear_nn(g, w, m, n, k);
    }
    matmul_par(m, k, n, g, w)
}

/// `lhs [m, k] · rhs [k, n]`, all row-major, on every thread. The result is written whole by
/// gemm (zeroing it first was 3% of a training step).
fn matmul_par(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
    assert!(
        lhs.len() >= m * k && rhs.len() >= k * n,
        "matmul_par: shapes"
    );
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: lhs is [m, k], rhs [k, n] and dst's allocation [m, n], row-major; gemm writes
    // every element of dst without reading it (accumulate false), so dst is initialized after.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
        dst.set_len(m * n);
    }
    dst
}

/// `srcᵀ` (`[cols, rows]`) of `src` `[rows, cols]`: bands of 64 rows in parallel, each
/// transposed straight into its columns of the result (a band buffer and a copy before: the copy
/// was 1.5% of a smol training step's samples on AVX-512, though no whole-step change was
/// measured without it).
fn transpose_par(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BAND: usize = 64;
    assert!(src.len() >= rows * cols, "transpose_par: shapes");
    let mut dst = Vec::with_capacity(rows * cols);
    let out = Shared(dst.as_mut_ptr());
    (0..rows.div_ceil(BAND)).into_par_iter().for_each(|b| {
        let r0 = b * BAND;
        let n = BAND.min(rows - r0);
        // SAFETY: dst's allocation holds [cols, rows]; this band writes columns r0..r0 + n of
        // every row (row stride `rows`), which no other band writes.
        unsafe {
            crate::gguf::matmul::transpose_to(
                &src[r0 * cols..(r0 + n) * cols],
                n,
                cols,
                out.at(r0),
                rows,
            )
        };
    });
    // SAFETY: the bands wrote every element (rows r0..r0 + n of each of the cols rows).
    unsafe { dst.set_len(rows * cols) };
    dst
}

/// Row-major transpose of `x [rows, cols]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// An adapter's gradients `(dx, dA, dB)`, each when asked for.
pub type LoraGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// LoRA's delta `scale · (x Aᵀ) Bᵀ` for `x [rows, in]`, `a [r, in]`, `b [out, r]`: returns
/// the delta `[rows, out]` and `h = x Aᵀ` `[rows, r]` (what the backward pass needs).
pub fn lora_delta(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    rows: usize,
    dims: (usize, usize, usize),
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = zeroed(rows * dims.2);
    let h = add_lora(&mut y, false, x, (a, b), rows, dims, scale);
    (y, h)
}

/// `y (+)= scale · (x Aᵀ) Bᵀ` (`+=` with `accumulate`); returns `h = x Aᵀ`.
fn add_lora(
    y: &mut [f32],
    accumulate: bool,
    x: &[f32],
    (a, b): (&[f32], &[f32]),
    rows: usize,
    (inp, r, out): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    // The small factors transposed once, so each product reads its right side row by row.
    let at = transpose(a, r, inp);
    let bt = transpose(b, out, r);
    let h = matmul_rows(rows, r, inp, x, &at, r, 1, 1.0);
    matmul_rows_into(y, accumulate, (rows, out, r), &h, (&bt, out, 1), scale);
    h
}

/// Gradients of [`lora_delta`] for the output gradient `g [rows, out]`: `(dx, da, db)`, each
/// computed when asked for (`dx [rows, in]`, `da [r, in]`, `db [out, r]`).
#[allow(clippy::too_many_arguments)]
pub fn lora_delta_backward(
    g: &[f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    h: &[f32],
    rows: usize,
    dims: (usize, usize, usize),
    scale: f32,
    want: (bool, bool, bool),
) -> LoraGrads {
    lora_backward(g, x, None, (a, b, h), rows, dims, scale, want)
}

/// The gradients of an adapter, and of the frozen weight `base` `[out, in]` under it when given
/// (its input gradient `g W` then starts `dx`, the adapter's part added into it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_backward(
    g: &[f32],
    x: &[f32],
    base: Option<&[f32]>,
    (a, b, h): (&[f32], &[f32], &[f32]),
    rows: usize,
    (inp, r, out): (usize, usize, usize),
    scale: f32,
    (want_dx, want_da, want_db): (bool, bool, bool),
) -> LoraGrads {
    // dh = s · g B  [rows, r]
    let dh = (want_dx || want_da).then(|| matmul_rows(rows, r, out, g, b, r, 1, scale));
    // db = s · gᵀ h  [out, r]
    let db = want_db.then(|| matmul_tn(rows, out, r, g, h, scale));
    // da = dhᵀ x  [r, in], computed as (xᵀ dh)ᵀ so that the wide side is gemm's row side
    let da = match (&dh, want_da) {
        (Some(dh), true) => Some(transpose(&matmul_tn(rows, inp, r, x, dh, 1.0), inp, r)),
        _ => None,
    };
    // dx (+)= dh A  [rows, in]
    let dx = match (&dh, want_dx) {
        (Some(dh), true) => Some(match base {
            Some(w) => {
                let mut dx = linear_nn(g, w, rows, out, inp);
                matmul_rows_into(&mut dx, true, (rows, inp, r), dh, (a, inp, 1), 1.0);
                dx
            }
            None => matmul_rows(rows, inp, r, dh, a, inp, 1, 1.0),
        }),
        _ => None,
    };
    (dx, da, db)
}

/// A frozen projection with its adapter in one pass: `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` for `x`
/// `[rows, in]`, `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`; the adapter's product is added
/// into the base product's buffer by gemm (no separate delta buffer and no tensor addition
/// after it). Returns `y` and `h = x Aᵀ` (what the backward pass needs).
pub fn lora_linear(
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    rows: usize,
    dims: (usize, usize, usize),
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (inp, _, out) = dims;
    assert!(
        w.len() >= out * inp,
        "lora_linear: weight smaller than [{out}, {inp}]"
    );
    let mut y = linear_nt(x, w, rows, out, inp);
    let h = add_lora(&mut y, true, x, (a, b), rows, dims, scale);
    (y, h)
}

/// Gradients of [`lora_linear`] for the output gradient `g [rows, out]`: `(dx, da, db)`, each
/// computed when asked for; `dx = g W + scale · (g B) A`, the adapter's part added into the base
/// part's buffer.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_backward(
    g: &[f32],
    x: &[f32],
    w: &[f32],
    factors: (&[f32], &[f32], &[f32]),
    rows: usize,
    dims: (usize, usize, usize),
    scale: f32,
    want: (bool, bool, bool),
) -> LoraGrads {
    lora_backward(g, x, Some(w), factors, rows, dims, scale, want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_rows_equal_the_definition_for_every_head_width() {
        // 64 and 128 take the kernels with the head in registers; 40 the general loop.
        for d in [64, 128, 40] {
            let rows = 37;
            let values: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let p: Vec<f32> = (0..rows).map(|j| ((j * 31) % 17) as f32 / 17.0).collect();
            let mut out = vec![f32::NAN; d];
            weighted_rows(&mut out, &p, &values);
            for (c, &got) in out.iter().enumerate() {
                let want: f64 = (0..rows)
                    .map(|j| p[j] as f64 * values[j * d + c] as f64)
                    .sum();
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "d = {d}, column {c}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    /// The frozen-weight product and its input gradient equal the sums written out (in f64),
    /// on shapes with partial transpose bands (out not a multiple of 64) and blocks (not of 8).
    #[test]
    fn linear_products_equal_the_definition() {
        let mut seed = 5u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, n, k) in [(33, 70, 13), (17, 130, 64), (40, 8, 200)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let g: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let y = linear_nt(&x, &w, m, n, k);
            let dx = linear_nn(&g, &w, m, n, k);
            for i in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| f64::from(x[i * k + c]) * f64::from(w[o * k + c]))
                        .sum();
                    assert!((f64::from(y[i * n + o]) - want).abs() < 1e-5, "y[{i}, {o}]");
                }
                for c in 0..k {
                    let want: f64 = (0..n)
                        .map(|o| f64::from(g[i * n + o]) * f64::from(w[o * k + c]))
                        .sum();
                    assert!(
                        (f64::from(dx[i * k + c]) - want).abs() < 1e-5,
                        "dx[{i}, {c}]"
                    );
                }
            }
        }
    }

    /// LoRA's delta and its gradients equal the sums written out (in f64) on shapes whose rows
    /// split unevenly across threads, with out ≠ in.
    #[test]
    fn lora_delta_and_gradients_equal_the_definition() {
        let (rows, inp, r, out, scale) = (203usize, 40usize, 5usize, 33usize, 1.75f32);
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
        let a: Vec<f32> = (0..r * inp).map(|_| next()).collect();
        let b: Vec<f32> = (0..out * r).map(|_| next()).collect();
        let g: Vec<f32> = (0..rows * out).map(|_| next()).collect();
        let s = scale as f64;
        let h_ref: Vec<f64> = (0..rows * r)
            .map(|i| {
                (0..inp)
                    .map(|k| x[i / r * inp + k] as f64 * a[i % r * inp + k] as f64)
                    .sum()
            })
            .collect();
        let y_ref: Vec<f64> = (0..rows * out)
            .map(|i| {
                s * (0..r)
                    .map(|j| h_ref[i / out * r + j] * b[i % out * r + j] as f64)
                    .sum::<f64>()
            })
            .collect();
        let dh: Vec<f64> = (0..rows * r)
            .map(|i| {
                s * (0..out)
                    .map(|o| g[i / r * out + o] as f64 * b[o * r + i % r] as f64)
                    .sum::<f64>()
            })
            .collect();
        let dx_ref: Vec<f64> = (0..rows * inp)
            .map(|i| {
                (0..r)
                    .map(|j| dh[i / inp * r + j] * a[j * inp + i % inp] as f64)
                    .sum()
            })
            .collect();
        let da_ref: Vec<f64> = (0..r * inp)
            .map(|i| {
                (0..rows)
                    .map(|m| dh[m * r + i / inp] * x[m * inp + i % inp] as f64)
                    .sum()
            })
            .collect();
        let db_ref: Vec<f64> = (0..out * r)
            .map(|i| {
                s * (0..rows)
                    .map(|m| g[m * out + i / r] as f64 * h_ref[m * r + i % r])
                    .sum::<f64>()
            })
            .collect();

        let close = |what: &str, got: &[f32], want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{what}[{i}]: {g} vs {w}"
                );
            }
        };
        let (y, h) = lora_delta(&x, &a, &b, rows, (inp, r, out), scale);
        close("h", &h, &h_ref);
        close("delta", &y, &y_ref);
        let backward =
            |want| lora_delta_backward(&g, &x, &a, &b, &h, rows, (inp, r, out), scale, want);
        let (dx, da, db) = backward((true, true, true));
        close("dx", &dx.unwrap(), &dx_ref);
        close("dA", &da.unwrap(), &da_ref);
        close("dB", &db.unwrap(), &db_ref);
        let (dx, da, db) = backward((false, false, true));
        assert!(dx.is_none() && da.is_none());
        close("dB alone", &db.unwrap(), &db_ref);

        // With the frozen weight in the same pass: y = x Wᵀ + delta, dx = g W + the adapter's.
        let w: Vec<f32> = (0..out * inp).map(|_| next()).collect();
        let base: Vec<f64> = (0..rows * out)
            .map(|i| {
                (0..inp)
                    .map(|k| x[i / out * inp + k] as f64 * w[i % out * inp + k] as f64)
                    .sum()
            })
            .collect();
        let dx_base: Vec<f64> = (0..rows * inp)
            .map(|i| {
                (0..out)
                    .map(|o| g[i / inp * out + o] as f64 * w[o * inp + i % inp] as f64)
                    .sum()
            })
            .collect();
        let sum =
            |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(a, b)| a + b).collect() };
        let (y, h) = lora_linear(&x, &w, &a, &b, rows, (inp, r, out), scale);
        close("h (fused)", &h, &h_ref);
        close("y (fused)", &y, &sum(&base, &y_ref));
        let backward =
            |want| lora_linear_backward(&g, &x, &w, (&a, &b, &h), rows, (inp, r, out), scale, want);
        let (dx, da, db) = backward((true, true, true));
        close("dx (fused)", &dx.unwrap(), &sum(&dx_base, &dx_ref));
        close("dA (fused)", &da.unwrap(), &da_ref);
        close("dB (fused)", &db.unwrap(), &db_ref);
        let (dx, da, db) = backward((false, true, false));
        assert!(dx.is_none() && db.is_none());
        close("dA alone (fused)", &da.unwrap(), &da_ref);
    }

    /// The blocked cross-entropy through the output projection equals the definition (f64) when
    /// the rows take several blocks (the last one shorter), ignored targets included; and the
    /// block height stays within the budget and covers every row.
    #[test]
    fn products_split_over_the_depth_equal_the_definition() {
        // Depths that split into 1, 2 and 3 parts (whole multiples of SPLIT_DEPTH_MIN and not),
        // on pools of 1, 2 and 3 threads.
        let (m, n) = (7usize, 9usize);
        for k in [0, 100, 2 * SPLIT_DEPTH_MIN, 3 * SPLIT_DEPTH_MIN + 5] {
            let lhs: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let rhs: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104_729) % 89) as f32 / 44.0 - 1.0)
                .collect();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut dst = vec![f32::NAN; m * n + 3];
                pool.install(|| matmul_split_depth(&lhs, &rhs, (m, n, k), &mut dst[..m * n]));
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| lhs[i * k + l] as f64 * rhs[l * n + j] as f64)
                            .sum();
                        let got = dst[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "k {k}, {threads} threads, ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
                assert!(dst[m * n..].iter().all(|v| v.is_nan()), "wrote past m × n");
            }
        }
    }

    #[test]
    fn linear_nll_sum_in_blocks_equals_the_definition() {
        let (rows, h, vocab) = (23usize, 6usize, 37usize);
        let mut seed = 99u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let hidden: Vec<f32> = (0..rows * h).map(|_| next() * 4.0).collect();
        let weight: Vec<f32> = (0..vocab * h).map(|_| next()).collect();
        let targets: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 4 == 1 {
                    -100
                } else {
                    (i * 7 % vocab) as i64
                }
            })
            .collect();
        let mut loss_ref = 0f64;
        let mut dh_ref = vec![0f64; rows * h];
        for (i, &t) in targets.iter().enumerate() {
            if t < 0 {
                continue;
            }
            let logits: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..h)
                        .map(|k| hidden[i * h + k] as f64 * weight[v * h + k] as f64)
                        .sum()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            loss_ref += lse - logits[t as usize];
            for (v, l) in logits.iter().enumerate() {
                let p = (l - lse).exp() - if v == t as usize { 1.0 } else { 0.0 };
                for k in 0..h {
                    dh_ref[i * h + k] += p * weight[v * h + k] as f64;
                }
            }
        }
        for block_rows in [5, 8, rows] {
            let (loss, dh) = linear_nll_sum_blocks(&hidden, &weight, h, &targets, true, block_rows);
            assert!(
                (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs(),
                "{block_rows}: {loss} vs {loss_ref}"
            );
            for (i, (g, w)) in dh.iter().zip(&dh_ref).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5,
                    "{block_rows}: dh[{i}] {g} vs {w}"
                );
            }
        }
        for (rows, vocab) in [
            (1024, 32_000),
            (1024, 49_152),
            (4096, 128_256),
            (100, 10),
            (0, 5),
        ] {
            let b = logit_block_rows(rows, vocab);
            let blocks = rows.div_ceil(b);
            assert!(b * blocks >= rows && b >= 1, "{rows} rows, {vocab}: {b}");
            assert!(
                b <= LOGIT_MIN_ROWS.max(LOGIT_BLOCK_BYTES / (vocab * 4)),
                "{rows} rows, {vocab}: {b}"
            );
        }
    }
}
