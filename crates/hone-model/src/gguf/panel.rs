//! F16 and BF16 weights held in panels of 16 rows, and their products.
//!
//! Panel `p` (rows `16p..16p + 16` of a weight `[rows, cols]`) stores, for each input column
//! `k`, the 16 rows' values side by side (32 bytes): one load and one conversion give a column
//! of 16 output rows, which a product multiplies by a broadcast input value into 16 × N
//! accumulators (outer products, as a gemm microkernel does on packed operands). The weight is
//! put in this layout once, at load, in place of its rows (llama.cpp repacks its block types at
//! load the same way), so prefill and training read the file's 16-bit values straight into
//! registers: before, each product converted every 64-row tile of `W` to f32 and transposed
//! it into a scratch buffer (~8% of F16 prefill), which gemm then packed again, one product
//! at a time (a layer's 192-row k and v projections made three tiles for two threads).
//!
//! One kernel family serves every row count: a task multiplies its panels by N ≤ 6 (AVX2) or
//! ≤ 12 (AVX-512) input rows at a time, reading the inputs where they are (rows of `x`);
//! decoding is N = 1. Compiled for AVX-512 or AVX2 + FMA + F16C and chosen at run time; the
//! conversions are exact, so results equal `x · dequantize(W)ᵀ` up to f32 summation order
//! (each output sums its products in column order).

use rayon::prelude::*;

use super::quant::GgmlType;
use crate::kernels::cpu::Shared;

/// Rows per panel.
pub(crate) const ROWS: usize = 16;

/// Panel rows per task of a many-row product (two panels: one AVX-512 kernel call).
const TASK_ROWS: usize = 2 * ROWS;

/// Input rows per task of a many-row product (a multiple of both kernels' widths).
const TASK_TOKENS: usize = 240;

/// Which kernels this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(feature = "avx512")]
    V4,
    V3,
}

fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("f16c") {
            return None;
        }
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Isa::V4);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Isa::V3);
        }
    }
    None
}

/// Whether a `[rows, cols]` weight of type `ty` is held in panels: F16 or BF16, whole panels
/// of rows, and a CPU with the kernels.
pub(crate) fn applies(ty: GgmlType, rows: usize, cols: usize) -> bool {
    matches!(ty, GgmlType::F16 | GgmlType::BF16)
        && rows > 0
        && rows.is_multiple_of(ROWS)
        && cols > 0
        && isa().is_some()
}

/// The rows `bytes` (`[rows, cols]` of 16-bit values, `rows` a multiple of [`ROWS`]) in panels.
pub(crate) fn interleave(bytes: &[u8], cols: usize) -> std::sync::Arc<[u8]> {
    // Written in place in the shared allocation (a `Vec` and then an `Arc` of it held three
    // copies of each tensor at load: +55 MB peak for SmolLM2 F16).
    let mut out = std::sync::Arc::<[u8]>::new_zeroed_slice(bytes.len());
    let slice = std::sync::Arc::get_mut(&mut out).expect("a new allocation");
    // SAFETY: zeroed bytes are initialized u8.
    interleave_into(bytes, cols, unsafe {
        &mut *(slice as *mut [_] as *mut [u8])
    });
    // SAFETY: as above.
    unsafe { out.assume_init() }
}

fn interleave_into(bytes: &[u8], cols: usize, out: &mut [u8]) {
    let pb = 2 * ROWS * cols;
    assert!(
        bytes.len().is_multiple_of(pb) && out.len() == bytes.len(),
        "panel::interleave: not whole panels"
    );
    out.par_chunks_exact_mut(pb)
        .zip(bytes.par_chunks_exact(pb))
        .for_each(|(dst, src)| {
            for (k, column) in dst.chunks_exact_mut(2 * ROWS).enumerate() {
                for (r, value) in column.chunks_exact_mut(2).enumerate() {
                    let at = 2 * (r * cols + k);
                    value.copy_from_slice(&src[at..at + 2]);
                }
            }
        });
}

/// Rows `r0..r0 + out.len() / (2 · cols)` of the panels `bytes`, as the file stores them.
pub(crate) fn row_bytes(bytes: &[u8], cols: usize, r0: usize, out: &mut [u8]) {
    assert!(
        out.len().is_multiple_of(2 * cols),
        "panel::row_bytes: out is not whole rows"
    );
    for (i, row) in out.chunks_exact_mut(2 * cols).enumerate() {
        let (p, r) = ((r0 + i) / ROWS, (r0 + i) % ROWS);
        let panel = &bytes[p * 2 * ROWS * cols..(p + 1) * 2 * ROWS * cols];
        for (k, value) in row.chunks_exact_mut(2).enumerate() {
            let at = 2 * (k * ROWS + r);
            value.copy_from_slice(&panel[at..at + 2]);
        }
    }
}

/// A weight in panels: `[rows, cols]`, F16 or BF16.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Panels<'a> {
    pub bf16: bool,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Panels<'a> {
    /// `ty`'s panels `bytes`; `None` for a type without them.
    pub(crate) fn new(ty: GgmlType, bytes: &'a [u8], rows: usize, cols: usize) -> Option<Self> {
        let bf16 = match ty {
            GgmlType::F16 => false,
            GgmlType::BF16 => true,
            _ => return None,
        };
        assert!(
            rows.is_multiple_of(ROWS) && bytes.len() == 2 * rows * cols,
            "panel::Panels: {} bytes for [{rows}, {cols}]",
            bytes.len()
        );
        Some(Self {
            bf16,
            bytes,
            rows,
            cols,
        })
    }
}

/// `yt[r·m + i] = Σ_k W[r, k] · x[i, k]` for the whole panels `w` (rows of a task) and the `m`
/// rows of `x`: the few-row products' layout (one output row's inputs side by side).
///
/// # Panics
/// When the slices do not match the shapes, or where [`applies`] is false.
pub(crate) fn dot_rows(w: Panels<'_>, x: &[f32], m: usize, yt: &mut [f32]) {
    let k = w.cols;
    assert!(
        x.len() >= m * k && yt.len() >= w.rows * m,
        "panel::dot_rows: shapes"
    );
    if m == 1 {
        // SAFETY: x holds k values, yt w.rows.
        unsafe { block(w, 0, w.rows, x.as_ptr(), k, 1, yt.as_mut_ptr(), w.rows) };
        return;
    }
    let mut y = vec![0f32; m * w.rows];
    // SAFETY: x is [m, k]; y is [m, rows].
    unsafe { block(w, 0, w.rows, x.as_ptr(), k, m, y.as_mut_ptr(), w.rows) };
    for i in 0..m {
        for r in 0..w.rows {
            yt[r * m + i] = y[i * w.rows + r];
        }
    }
}

/// `y [m, rows] = x [m, cols] · Wᵀ` for each weight of `ws` (the same `cols`), as one parallel
/// loop over tasks of [`TASK_ROWS`] rows and up to [`TASK_TOKENS`] input rows of every weight.
///
/// With `bf16_x`, where every weight is BF16, `cols` is even and the CPU has AVX-512 BF16
/// ([`bf16_dot_applies`]), `x` is first rounded to bfloat16 (to nearest, ties to even) and the
/// products run on the CPU's bfloat16 dot products (`vdpbf16ps`: two products per f32 lane and
/// instruction, summed in f32), as llama.cpp multiplies BF16 weights; the result is then
/// `bf16(x) · Wᵀ` up to summation order, not `x · Wᵀ`. Otherwise `bf16_x` changes nothing.
///
/// # Panics
/// When the shapes differ, or where [`applies`] is false.
pub(crate) fn matmul_many(ws: &[Panels<'_>], x: &[f32], m: usize, bf16_x: bool) -> Vec<Vec<f32>> {
    let Some(k) = ws.first().map(|w| w.cols) else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.cols == k) && x.len() == m * k,
        "panel::matmul_many: shapes"
    );
    if bf16_x && ws.iter().all(|w| bf16_dot_applies(w.bf16, k)) {
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        return matmul_many_bf16(ws, x, m);
    }
    // SAFETY: x is [m, k].
    in_tasks(ws, m, |w, r0, rows, t0, mt, y| unsafe {
        block(w, r0, rows, x.as_ptr().add(t0 * k), k, mt, y, w.rows)
    })
}

/// `y [m, rows]` for each weight of `ws`, written by `task(w, r0, rows, t0, mt, y)` for tasks of
/// [`TASK_ROWS`] rows `r0..r0 + rows` and up to [`TASK_TOKENS`] input rows `t0..t0 + mt` of
/// every weight, run as one parallel loop; `y` points at output row `t0`, column `r0` of `w`'s
/// `[m, w.rows]` result, and the task must write that block (`mt` rows `w.rows` apart, `rows`
/// values each) and nothing else: no other task writes it.
fn in_tasks(
    ws: &[Panels<'_>],
    m: usize,
    task: impl Fn(Panels<'_>, usize, usize, usize, usize, *mut f32) + Sync,
) -> Vec<Vec<f32>> {
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    let outs: Vec<Shared> = ys.iter_mut().map(|y| Shared(y.as_mut_ptr())).collect();
    let mut tasks = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        for r0 in (0..w.rows).step_by(TASK_ROWS) {
            for t0 in (0..m).step_by(TASK_TOKENS) {
                tasks.push((i, r0, t0));
            }
        }
    }
    tasks.into_par_iter().for_each(|(i, r0, t0)| {
        let w = ws[i];
        let rows = TASK_ROWS.min(w.rows - r0);
        let mt = TASK_TOKENS.min(m - t0);
        // The block y[t0..t0 + mt, r0..r0 + rows] of product i's output.
        task(w, r0, rows, t0, mt, outs[i].at(t0 * w.rows + r0));
    });
    ys
}

/// Whether products by a weight in panels (`bf16`: of BF16 values) with `cols` inputs can take
/// bfloat16 activations ([`matmul_many`]'s `bf16_x`): BF16, an even `cols` (the dot products
/// take pairs of inputs), and a CPU with AVX-512 BF16 in a build with the AVX-512 kernels.
pub(crate) fn bf16_dot_applies(bf16: bool, cols: usize) -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    {
        bf16 && cols.is_multiple_of(2)
            && isa() == Some(Isa::V4)
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "avx512")))]
    {
        let _ = (bf16, cols);
        false
    }
}

/// [`matmul_many`] with bfloat16 activations ([`bf16_dot_applies`] holds for every weight):
/// `x` rounded once to pairs of bfloat16 (one `u32` per two inputs), then the tasks of
/// [`matmul_many`] on [`x86::block_bf16`].
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
fn matmul_many_bf16(ws: &[Panels<'_>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let k = ws[0].cols;
    let kp = k / 2;
    let mut xb = vec![0u32; m * kp];
    xb.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        // SAFETY: bf16_dot_applies checked the CPU; both rows hold `k` inputs.
        .for_each(|(dst, src)| unsafe { x86::round_bf16_pairs(src, dst) });
    // SAFETY: bf16_dot_applies checked the CPU; xb is [m, k / 2]; r0 and rows are whole panels.
    in_tasks(ws, m, |w, r0, rows, t0, mt, y| unsafe {
        x86::block_bf16(
            w.bytes.as_ptr().add(2 * r0 * k) as *const u16,
            rows / ROWS,
            k,
            xb.as_ptr().add(t0 * kp),
            mt,
            y,
            w.rows,
        )
    })
}

/// `y[t·ys + r - r0] = Σ_k W[r, k] · x[t·ldx + k]` for rows `r0..r0 + rows` (whole panels) and
/// `t < mt`.
///
/// # Safety
/// `x` must hold `mt` rows of `w.cols` values `ldx` apart and `y` `mt` rows of `rows` values
/// `ys` apart; `r0` and `rows` whole panels of `w`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    w: Panels<'_>,
    r0: usize,
    rows: usize,
    x: *const f32,
    ldx: usize,
    mt: usize,
    y: *mut f32,
    ys: usize,
) {
    assert!(
        r0.is_multiple_of(ROWS) && rows.is_multiple_of(ROWS) && r0 + rows <= w.rows,
        "panel::block: rows {r0}..{} of {}",
        r0 + rows,
        w.rows
    );
    let k = w.cols;
    let p = w.bytes.as_ptr().add(2 * r0 * k) as *const u16;
    let np = rows / ROWS;
    // One input row (decoding one sequence) takes the 256-bit kernel even where AVX-512 is
    // present: on Zen 4 SmolLM2 F16 decoded at 101–117 vs 78–96 tokens/s (four alternated
    // pairs); from two rows on the 512-bit one is ahead (four rows: 218–249 vs 195–230).
    #[cfg(feature = "avx512")]
    let isa = match isa() {
        Some(Isa::V4) if mt == 1 => Some(Isa::V3),
        other => other,
    };
    #[cfg(not(feature = "avx512"))]
    let isa = isa();
    #[cfg(target_arch = "x86_64")]
    match (isa, w.bf16) {
        #[cfg(feature = "avx512")]
        (Some(Isa::V4), false) => return x86::block_v4::<false>(p, np, k, x, ldx, mt, y, ys),
        #[cfg(feature = "avx512")]
        (Some(Isa::V4), true) => return x86::block_v4::<true>(p, np, k, x, ldx, mt, y, ys),
        (Some(Isa::V3), false) => return x86::block_v3::<false>(p, np, k, x, ldx, mt, y, ys),
        (Some(Isa::V3), true) => return x86::block_v3::<true>(p, np, k, x, ldx, mt, y, ys),
        (None, _) => {}
    }
    let _ = (p, np, k, x, ldx, mt, y, ys);
    panic!("panel products without AVX2 + FMA + F16C (panel::applies was false)");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Input rows per kernel call: 6 (AVX2: 12 accumulators of 8) and 12 (AVX-512: 24 of 16).
    const N3: usize = 6;
    #[cfg(feature = "avx512")]
    const N4: usize = 12;

    #[inline(always)]
    unsafe fn load8<const BF16: bool>(p: *const u16) -> __m256 {
        crate::gguf::matvec::half::load8_v3::<BF16>(p as *const u8)
    }

    /// `y[t·ys + r] = Σ_k w[k·16 + r] · x[t·ldx + k]`, `r < 16`, `t < N` (one panel, AVX2).
    #[inline(always)]
    unsafe fn tile_v3<const BF16: bool, const N: usize>(
        w: *const u16,
        k: usize,
        x: *const f32,
        ldx: usize,
        y: *mut f32,
        ys: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for kk in 0..k {
            let wp = w.add(kk * 16);
            if N == 1 && kk % 2 == 0 {
                crate::gguf::matvec::x86::prefetch_ahead::<1>(wp as *const u8);
            }
            let w0 = load8::<BF16>(wp);
            let w1 = load8::<BF16>(wp.add(8));
            for (t, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*x.add(t * ldx + kk));
                acc[0] = _mm256_fmadd_ps(w0, b, acc[0]);
                acc[1] = _mm256_fmadd_ps(w1, b, acc[1]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(t * ys), acc[0]);
            _mm256_storeu_ps(y.add(t * ys + 8), acc[1]);
        }
    }

    /// [`super::block`] with the AVX2 kernels: `np` panels at `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block_v3<const BF16: bool>(
        w: *const u16,
        np: usize,
        k: usize,
        x: *const f32,
        ldx: usize,
        mt: usize,
        y: *mut f32,
        ys: usize,
    ) {
        let mut t = 0;
        while t < mt {
            let n = N3.min(mt - t);
            let (xt, yt) = (x.add(t * ldx), y.add(t * ys));
            for p in 0..np {
                let (wp, yp) = (w.add(p * 16 * k), yt.add(p * 16));
                match n {
                    1 => tile_v3::<BF16, 1>(wp, k, xt, ldx, yp, ys),
                    2 => tile_v3::<BF16, 2>(wp, k, xt, ldx, yp, ys),
                    3 => tile_v3::<BF16, 3>(wp, k, xt, ldx, yp, ys),
                    4 => tile_v3::<BF16, 4>(wp, k, xt, ldx, yp, ys),
                    5 => tile_v3::<BF16, 5>(wp, k, xt, ldx, yp, ys),
                    _ => tile_v3::<BF16, 6>(wp, k, xt, ldx, yp, ys),
                }
            }
            t += n;
        }
    }

    #[cfg(feature = "avx512")]
    #[inline(always)]
    unsafe fn load16<const BF16: bool>(p: *const u16) -> __m512 {
        crate::gguf::matvec::half::load16_v4::<BF16>(p as *const u8)
    }

    /// `y[t·ys + 16q + r] = Σ_k w[q·16k + k·16 + r] · x[t·ldx + k]`: `P` panels, `N` input
    /// rows (AVX-512).
    #[cfg(feature = "avx512")]
    #[inline(always)]
    unsafe fn tile_v4<const BF16: bool, const P: usize, const N: usize>(
        w: *const u16,
        k: usize,
        x: *const f32,
        ldx: usize,
        y: *mut f32,
        ys: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; N];
        for kk in 0..k {
            let mut wv = [_mm512_setzero_ps(); P];
            for (q, wv) in wv.iter_mut().enumerate() {
                *wv = load16::<BF16>(w.add(q * 16 * k + kk * 16));
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(t * ldx + kk));
                for q in 0..P {
                    acc[q] = _mm512_fmadd_ps(wv[q], b, acc[q]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (q, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(y.add(t * ys + 16 * q), *acc);
            }
        }
    }

    #[cfg(feature = "avx512")]
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles_v4<const BF16: bool, const P: usize>(
        n: usize,
        w: *const u16,
        k: usize,
        x: *const f32,
        ldx: usize,
        y: *mut f32,
        ys: usize,
    ) {
        match n {
            1 => tile_v4::<BF16, P, 1>(w, k, x, ldx, y, ys),
            2 => tile_v4::<BF16, P, 2>(w, k, x, ldx, y, ys),
            3 => tile_v4::<BF16, P, 3>(w, k, x, ldx, y, ys),
            4 => tile_v4::<BF16, P, 4>(w, k, x, ldx, y, ys),
            5 => tile_v4::<BF16, P, 5>(w, k, x, ldx, y, ys),
            6 => tile_v4::<BF16, P, 6>(w, k, x, ldx, y, ys),
            7 => tile_v4::<BF16, P, 7>(w, k, x, ldx, y, ys),
            8 => tile_v4::<BF16, P, 8>(w, k, x, ldx, y, ys),
            9 => tile_v4::<BF16, P, 9>(w, k, x, ldx, y, ys),
            10 => tile_v4::<BF16, P, 10>(w, k, x, ldx, y, ys),
            11 => tile_v4::<BF16, P, 11>(w, k, x, ldx, y, ys),
            _ => tile_v4::<BF16, P, 12>(w, k, x, ldx, y, ys),
        }
    }

    /// `out[j]` = the bfloat16 values of `x[2j]` (low half) and `x[2j + 1]` (high half), each
    /// rounded to nearest, ties to even.
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_bf16_pairs(x: &[f32], out: &mut [u32]) {
        assert_eq!(x.len(), 2 * out.len(), "round_bf16_pairs: lengths");
        let full = out.len() / 16;
        for c in 0..full {
            let lo = _mm512_loadu_ps(x.as_ptr().add(32 * c));
            let hi = _mm512_loadu_ps(x.as_ptr().add(32 * c + 16));
            // Lane i of the result's low 256 bits is the second operand's value i.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * c) as *mut _, v);
        }
        for j in 16 * full..out.len() {
            let (a, b) = (x[2 * j], x[2 * j + 1]);
            let pair = _mm_cvtneps_pbh(_mm_setr_ps(a, b, 0.0, 0.0));
            let bits: __m128i = std::mem::transmute(pair);
            out[j] = _mm_cvtsi128_si32(bits) as u32;
        }
    }

    /// `y[t·ys + 16q + r] = Σ_j (w[q·16k + 2j·16 + r] · x_t[2j] + w[q·16k + (2j+1)·16 + r] ·
    /// x_t[2j+1])` with `x_t` the bfloat16 pairs `xb[t·k/2 ..]`: `P` panels, `N` input rows, on
    /// bfloat16 dot products. A panel stores a column's 16 rows side by side, so one 64-byte
    /// load holds two columns, which one permutation interleaves into the pairs the dot
    /// product takes (amortised over the `N` rows).
    #[cfg(feature = "avx512")]
    #[inline(always)]
    unsafe fn tile_bf16<const P: usize, const N: usize>(
        w: *const u16,
        k: usize,
        xb: *const u32,
        y: *mut f32,
        ys: usize,
    ) {
        const PAIRS: [u16; 32] = {
            let mut idx = [0u16; 32];
            let mut r = 0;
            while r < 16 {
                idx[2 * r] = r as u16;
                idx[2 * r + 1] = 16 + r as u16;
                r += 1;
            }
            idx
        };
        let idx = _mm512_loadu_si512(PAIRS.as_ptr() as *const _);
        let kp = k / 2;
        let mut acc = [[_mm512_setzero_ps(); P]; N];
        for j in 0..kp {
            let mut wv = [_mm512_setzero_si512(); P];
            for (q, wv) in wv.iter_mut().enumerate() {
                let cols = _mm512_loadu_si512(w.add(q * 16 * k + j * 32) as *const _);
                *wv = _mm512_permutexvar_epi16(idx, cols);
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let b: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xb.add(t * kp + j) as i32));
                for q in 0..P {
                    let a: __m512bh = std::mem::transmute(wv[q]);
                    acc[q] = _mm512_dpbf16_ps(acc[q], a, b);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (q, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(y.add(t * ys + 16 * q), *acc);
            }
        }
    }

    /// [`super::matmul_many_bf16`]'s tasks: `np` panels at `w` (BF16, `k` even) by `mt` rows
    /// of bfloat16 pairs at `xb` (`k / 2` apart) into `y` (`mt` rows `ys` apart).
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn block_bf16(
        w: *const u16,
        np: usize,
        k: usize,
        xb: *const u32,
        mt: usize,
        y: *mut f32,
        ys: usize,
    ) {
        macro_rules! widths {
            ($p:literal, $n:expr, $w:expr, $x:expr, $y:expr) => {
                match $n {
                    1 => tile_bf16::<$p, 1>($w, k, $x, $y, ys),
                    2 => tile_bf16::<$p, 2>($w, k, $x, $y, ys),
                    3 => tile_bf16::<$p, 3>($w, k, $x, $y, ys),
                    4 => tile_bf16::<$p, 4>($w, k, $x, $y, ys),
                    5 => tile_bf16::<$p, 5>($w, k, $x, $y, ys),
                    6 => tile_bf16::<$p, 6>($w, k, $x, $y, ys),
                    7 => tile_bf16::<$p, 7>($w, k, $x, $y, ys),
                    8 => tile_bf16::<$p, 8>($w, k, $x, $y, ys),
                    9 => tile_bf16::<$p, 9>($w, k, $x, $y, ys),
                    10 => tile_bf16::<$p, 10>($w, k, $x, $y, ys),
                    11 => tile_bf16::<$p, 11>($w, k, $x, $y, ys),
                    _ => tile_bf16::<$p, 12>($w, k, $x, $y, ys),
                }
            };
        }
        let mut t = 0;
        while t < mt {
            let n = N4.min(mt - t);
            let (xt, yt) = (xb.add(t * (k / 2)), y.add(t * ys));
            let mut p = 0;
            while p < np {
                let (wp, yp) = (w.add(p * 16 * k), yt.add(p * 16));
                if np - p >= 2 {
                    widths!(2, n, wp, xt, yp);
                    p += 2;
                } else {
                    widths!(1, n, wp, xt, yp);
                    p += 1;
                }
            }
            t += n;
        }
    }

    /// [`super::block`] with the AVX-512 kernels: `np` panels at `w`, two at a time.
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block_v4<const BF16: bool>(
        w: *const u16,
        np: usize,
        k: usize,
        x: *const f32,
        ldx: usize,
        mt: usize,
        y: *mut f32,
        ys: usize,
    ) {
        let mut t = 0;
        while t < mt {
            let n = N4.min(mt - t);
            let (xt, yt) = (x.add(t * ldx), y.add(t * ys));
            let mut p = 0;
            while p < np {
                let (wp, yp) = (w.add(p * 16 * k), yt.add(p * 16));
                if np - p >= 2 {
                    tiles_v4::<BF16, 2>(n, wp, k, xt, ldx, yp, ys);
                    p += 2;
                } else {
                    tiles_v4::<BF16, 1>(n, wp, k, xt, ldx, yp, ys);
                    p += 1;
                }
            }
            t += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::quant::dequantize;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Rows of `ty` values with random contents, as a file stores them.
    fn rows_of(ty: GgmlType, n: usize, seed: &mut u64) -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                let v = lcg(seed);
                match ty {
                    GgmlType::F16 => half::f16::from_f32(v).to_le_bytes(),
                    _ => half::bf16::from_f32(v).to_le_bytes(),
                }
            })
            .collect()
    }

    #[test]
    fn panels_give_back_the_rows() {
        let mut seed = 7;
        let (rows, cols) = (48, 37);
        let bytes = rows_of(GgmlType::F16, rows * cols, &mut seed);
        let panels = interleave(&bytes, cols);
        assert_ne!(&panels[..], &bytes[..]);
        // Element (r, k) sits at panel r / 16, column k, lane r % 16.
        let (r, k) = (21, 5);
        let at = 2 * ((r / ROWS) * ROWS * cols + k * ROWS + r % ROWS);
        assert_eq!(
            panels[at..at + 2],
            bytes[2 * (r * cols + k)..2 * (r * cols + k) + 2]
        );
        for (r0, n) in [(0, rows), (16, 16), (5, 30), (47, 1)] {
            let mut out = vec![0u8; 2 * n * cols];
            row_bytes(&panels, cols, r0, &mut out);
            assert_eq!(
                out,
                bytes[2 * r0 * cols..2 * (r0 + n) * cols],
                "rows {r0}+{n}"
            );
        }
    }

    /// With bfloat16 activations, every kernel width and both panel counts against the f64
    /// product of the decoded weights and the inputs rounded by `half` (to nearest, ties to
    /// even: llama.cpp's rounding), tight enough that exact f32 inputs would fail it; and
    /// unchanged results where the path does not apply (F16 weights, odd widths).
    #[test]
    fn bf16_activations_equal_the_rounded_definition() {
        if isa().is_none() {
            return;
        }
        let mut seed = 13;
        for ty in [GgmlType::BF16, GgmlType::F16] {
            for (rows, cols) in [(16, 2), (48, 38), (32, 64), (80, 576), (32, 37)] {
                let bytes = rows_of(ty, rows * cols, &mut seed);
                let mut w = vec![0f32; rows * cols];
                dequantize(ty, &bytes, &mut w);
                let panels = interleave(&bytes, cols);
                let p = Panels::new(ty, &panels, rows, cols).expect("16-bit type");
                let rounded = bf16_dot_applies(p.bf16, cols);
                for m in [1, 2, 11, 12, 13, 25, 250] {
                    // Inputs with low bits that rounding to bfloat16 drops.
                    let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed) * 3.3).collect();
                    let xr: Vec<f32> = if rounded {
                        x.iter()
                            .map(|&v| half::bf16::from_f32(v).to_f32())
                            .collect()
                    } else {
                        x.clone()
                    };
                    let y = matmul_many(&[p, p], &x, m, true);
                    let exact = matmul_many(&[p], &x, m, false).pop().expect("one product");
                    let mut far_from_exact = false;
                    for i in 0..m {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|k| f64::from(w[r * cols + k]) * f64::from(xr[i * cols + k]))
                                .sum();
                            let got = y[0][i * rows + r];
                            let tol = 2e-6 * (cols as f64).sqrt() * (1.0 + want.abs());
                            assert!(
                                (f64::from(got) - want).abs() <= tol,
                                "{ty} [{rows}, {cols}] m={m} ({i}, {r}): {got} vs {want}"
                            );
                            assert_eq!(y[1][i * rows + r], got);
                            far_from_exact |= (exact[i * rows + r] - got).abs() > 1e-3;
                        }
                    }
                    if !rounded {
                        assert_eq!(y[0], exact, "{ty} [{rows}, {cols}]: path does not apply");
                    } else if cols >= 64 {
                        assert!(far_from_exact, "[{rows}, {cols}] m={m}: inputs not rounded");
                    }
                }
            }
        }
    }

    /// Every kernel width and both panel counts against the f64 product of the decoded values.
    #[test]
    fn products_equal_the_definition() {
        if isa().is_none() {
            return;
        }
        let mut seed = 11;
        for ty in [GgmlType::F16, GgmlType::BF16] {
            for (rows, cols) in [(16, 1), (48, 37), (32, 64), (80, 576)] {
                let bytes = rows_of(ty, rows * cols, &mut seed);
                let mut w = vec![0f32; rows * cols];
                dequantize(ty, &bytes, &mut w);
                let panels = interleave(&bytes, cols);
                let p = Panels::new(ty, &panels, rows, cols).expect("16-bit type");
                for m in [1, 2, 5, 6, 7, 12, 13, 25, 250] {
                    let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
                    let want = |i: usize, r: usize| -> f64 {
                        (0..cols)
                            .map(|k| f64::from(w[r * cols + k]) * f64::from(x[i * cols + k]))
                            .sum()
                    };
                    let close = |got: f32, want: f64, what: &str| {
                        let tol = 1e-5 * (cols as f64).sqrt() * (1.0 + want.abs());
                        assert!(
                            (f64::from(got) - want).abs() <= tol,
                            "{ty} [{rows}, {cols}] m={m} {what}: {got} vs {want}"
                        );
                    };
                    let y = matmul_many(&[p, p], &x, m, false);
                    for i in 0..m {
                        for r in 0..rows {
                            close(y[0][i * rows + r], want(i, r), "matmul_many");
                            assert_eq!(y[1][i * rows + r], y[0][i * rows + r]);
                        }
                    }
                    if m <= 8 {
                        let mut yt = vec![f32::NAN; rows * m];
                        dot_rows(p, &x, m, &mut yt);
                        for i in 0..m {
                            for r in 0..rows {
                                close(yt[r * m + i], want(i, r), "dot_rows");
                            }
                        }
                    }
                }
            }
        }
    }
}
