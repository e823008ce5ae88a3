//! Matrix products with weights kept in ggml's block formats: `y = x · Wᵀ` for `W` `[out, in]`
//! stored as GGUF stores a linear layer's weight (each of the `out` rows is `in / block` blocks),
//! without ever holding `W` in f32.
//!
//! - Few input rows (decoding, `m ≤` [`SMALL_M`]): each output row's blocks are decoded into
//!   registers and multiplied into every input row at once; the weights are read once, which is
//!   what bounds decoding. Rows of `W` are split across threads.
//! - Many input rows (prefill, training): tiles of [`TILE_ROWS`] rows of `W` are decoded into a
//!   per-task f32 buffer and multiplied by gemm, so decoding costs `1/m` of the product.
//! - With [`Activations::Q8`] (opt-in), the block and K formats multiply inputs rounded to 8
//!   bits with integer dot products instead ([`super::int8`]), for few and many rows alike; a
//!   [`super::QuantWeight`] of Q4_0, Q4_1, Q4_K or Q5_K then holds its rows regrouped by eight
//!   (`gguf/repack.rs`), and its products (a `Product` with `regrouped`) take those kernels.
//! - F16 and BF16 weights are held in panels of sixteen rows (`gguf/panel.rs`: a `Product` with
//!   `panels`), whose kernels convert the 16-bit values in registers for any number of rows;
//!   the many-row products of one input (a layer's q/k/v) run as one parallel loop.
//!
//! Both are compiled for AVX-512 or AVX2+FMA when the CPU has them (run-time dispatch, as the
//! fused kernels). Results equal `x · dequantize(W)ᵀ` up to f32 summation order.

use rayon::prelude::*;

use super::quant::{decode_block, decode_plain32, GgmlType};
use crate::kernels::cpu::{matmul, multiversion, Shared};

/// Input rows up to which the direct (decode-in-registers) path is used.
pub const SMALL_M: usize = 8;
/// Rows of `W` decoded per task on the gemm path. 32 rather than 64: a layer's 576-row
/// projections made nine tiles for two threads and its 192-row k and v three (SmolLM2 F32
/// prefill, Zen 4, alternated runs: AVX2 696–725 vs 570–660 tokens/s, AVX-512 median 628 vs 590).
pub const TILE_ROWS: usize = 32;

const LANES: usize = 16;

/// A weight matrix `[out, in]` in a block format, rows contiguous.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub ty: GgmlType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl QuantMatrix<'_> {
    fn row_bytes(&self) -> usize {
        self.ty.byte_len(self.cols)
    }

    /// Checks the byte length and block alignment against the shape.
    pub fn validate(&self) -> Result<(), String> {
        let bs = self.ty.block_size();
        if !self.cols.is_multiple_of(bs) {
            return Err(format!(
                "{} rows of {} values are not whole blocks of {bs}",
                self.ty, self.cols
            ));
        }
        if self.bytes.len() != self.rows * self.row_bytes() {
            return Err(format!(
                "{} bytes for a [{}, {}] {} matrix (expected {})",
                self.bytes.len(),
                self.rows,
                self.cols,
                self.ty,
                self.rows * self.row_bytes()
            ));
        }
        Ok(())
    }
}

/// How the few-row products multiply activations by quantized weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activations {
    /// In f32: the exact product `x · dequantize(W)ᵀ` (up to summation order).
    #[default]
    F32,
    /// Quantized to 8 bits per 32 values (Q8_0) and multiplied with integer dot products, as
    /// llama.cpp does ([`super::int8`]): faster decoding and prefill of the block and K
    /// formats, at the cost of rounding `x`. The 16-bit float types stay exact, and so does
    /// training (its weights never take this).
    Q8,
    /// Rounded to bfloat16 where they multiply BF16 weights in many-row products (prefill,
    /// batched serving) on a CPU with AVX-512 BF16 (Zen 4, Sapphire Rapids and later): the
    /// CPU's bfloat16 dot products take two products per f32 lane and instruction, as
    /// llama.cpp multiplies BF16 weights ([`super::panel::matmul_many`]). Decoding (few rows),
    /// the other weight types and training stay exact.
    Bf16,
}

impl Activations {
    /// [`Activations::Q8`] when `q8` (a `--q8-activations` flag), else [`Activations::F32`].
    pub fn q8_if(q8: bool) -> Self {
        if q8 {
            Self::Q8
        } else {
            Self::F32
        }
    }

    /// The activations of the `--q8-activations` / `--bf16-activations` flags (at most one:
    /// the command line rejects both), [`Activations::F32`] without either.
    pub fn from_flags(q8: bool, bf16: bool) -> Self {
        if bf16 {
            Self::Bf16
        } else {
            Self::q8_if(q8)
        }
    }
}

/// `y [m, out] = x [m, in] · Wᵀ`.
///
/// # Panics
/// When the slices do not match the shapes (a caller bug: shapes come from a validated file).
pub fn matmul_quant(w: QuantMatrix<'_>, x: &[f32], m: usize) -> Vec<f32> {
    matmul_quant_with(w, x, m, Activations::F32)
}

/// [`matmul_quant`] with the activations of `activations`.
///
/// # Panics
/// As [`matmul_quant`].
pub fn matmul_quant_with(
    w: QuantMatrix<'_>,
    x: &[f32],
    m: usize,
    activations: Activations,
) -> Vec<f32> {
    product(Product::rows(w, activations), x, m)
}

/// One product by a quantized weight: the matrix, its activations, and whether its rows are
/// regrouped by eight ([`super::repack`]: only with [`Activations::Q8`] where it applies) or
/// held in panels of sixteen ([`super::panel`]: F16 and BF16).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product<'a> {
    pub w: QuantMatrix<'a>,
    pub activations: Activations,
    pub regrouped: bool,
    pub panels: bool,
}

impl<'a> Product<'a> {
    /// `w` with its rows as the file stores them.
    pub(crate) fn rows(w: QuantMatrix<'a>, activations: Activations) -> Self {
        Self {
            w,
            activations,
            regrouped: false,
            panels: false,
        }
    }

    /// The weight in panels ([`super::panel`]) when it is held so.
    fn panels(&self) -> Option<super::panel::Panels<'a>> {
        let w = self.w;
        self.panels
            .then(|| super::panel::Panels::new(w.ty, w.bytes, w.rows, w.cols))
            .flatten()
    }
}

/// `y [m, out] = x [m, in] · Wᵀ` for the product `p`.
pub(crate) fn product(p: Product<'_>, x: &[f32], m: usize) -> Vec<f32> {
    let w = p.w;
    w.validate().expect("quantized matrix shape");
    assert_eq!(x.len(), m * w.cols, "matmul_quant: x is not [m, in]");
    if m > 0 && m <= SMALL_M {
        return small_m_many(&[p], x, m).pop().expect("one product");
    }
    if let Some(panels) = p.panels().filter(|_| m > 0) {
        let bf16_x = p.activations == Activations::Bf16;
        return super::panel::matmul_many(&[panels], x, m, bf16_x)
            .pop()
            .expect("one product");
    }
    let mut y = vec![0f32; m * w.rows];
    if m == 0 || w.rows == 0 {
        return y;
    }
    if p.regrouped {
        let xq = super::int8::Q8Rows::quantize(x, m, w.cols);
        assert!(
            super::repack::gemm(w.ty, w.bytes, w.rows, &xq, &mut y),
            "regrouped rows without the 8-bit kernels"
        );
        return y;
    }
    if !(q8_applies(&w, p.activations)
        && super::int8::gemm(
            w.ty,
            w.bytes,
            w.rows,
            &super::int8::Q8Rows::quantize(x, m, w.cols),
            &mut y,
        ))
    {
        tiled(w, x, m, &mut y);
    }
    y
}

/// Whether products by `w` round their inputs to 8 bits ([`Activations::Q8`] on a block or K
/// format whose rows the 8-bit kernels take).
fn q8_applies(w: &QuantMatrix<'_>, activations: Activations) -> bool {
    activations == Activations::Q8
        && w.cols.is_multiple_of(32)
        && w.cols <= super::int8::MAX_COLS
        && w.ty.is_quantized()
}

/// `y [m, out] = x [m, in] · Wᵀ` for a dense f32 `w` `[out, in]` and few rows `m` (decoding):
/// each row of `w` is streamed once from memory and multiplied into every input row while it
/// is in registers (AVX-512 or AVX2, chosen at run time); rows of `w` are split across threads.
///
/// # Panics
/// When the slices do not match the shapes.
pub fn matmul_dense_few(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "matmul_dense_few: w is not [out, in]");
    assert_eq!(x.len(), m * cols, "matmul_dense_few: x is not [m, in]");
    let mut y = vec![0f32; m * rows];
    if m == 0 || rows == 0 {
        return y;
    }
    // Tasks of at least 32 KiB of weights, up to eight per thread.
    let tasks = (rows * cols / 8192).clamp(1, 8 * rayon::current_num_threads().max(1));
    let per_task = rows.div_ceil(tasks);
    let mut transposed = Vec::new();
    let yt: &mut [f32] = if m == 1 {
        &mut y
    } else {
        transposed.resize(rows * m, 0f32);
        &mut transposed
    };
    yt.par_chunks_mut(per_task * m)
        .zip(w.par_chunks(per_task * cols))
        .for_each(|(yt, w)| super::matvec::dense_rows_dot(w, cols, x, m, yt));
    if m > 1 {
        for r in 0..rows {
            for i in 0..m {
                y[i * rows + r] = transposed[r * m + i];
            }
        }
    }
    y
}

/// Output rows per task on the direct path: enough work per task to amortise scheduling, and
/// at most about four tasks per thread for a large weight (the 49k-row output head made ~440
/// tasks of 112 rows, each a few microseconds; fewer, larger ones: +1–3% decode, A/B); a
/// multiple of 8 (the 8-bit-activation kernels take eight rows at a time).
fn rows_per_task(w: &QuantMatrix<'_>) -> usize {
    let per_task = (65_536 / w.cols.max(1)).clamp(8, 256) / 8 * 8;
    let few_tasks = w.rows.div_ceil(4 * rayon::current_num_threads().max(1));
    per_task.max(few_tasks.div_ceil(8) * 8)
}

/// `x · Wᵀ` for each `W` of `ws` (the same input width), few rows: every product's row ranges
/// as tasks of one parallel loop (one fork and join for a layer's q/k/v), and the input
/// quantized once where 8-bit activations apply.
fn small_m_many(ws: &[Product<'_>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    // Quantized once for every product and task; `None` where the 8-bit kernels do not apply.
    let xq = ws
        .iter()
        .any(|p| q8_applies(&p.w, p.activations))
        .then(|| super::int8::Q8Rows::quantize(x, m, first.w.cols));
    // yt: [out, m] per product, so that each task writes one contiguous range (y itself when
    // m = 1).
    let mut yts: Vec<Vec<f32>> = ws.iter().map(|p| vec![0f32; p.w.rows * m]).collect();
    let mut tasks = Vec::new();
    for (p, yt) in ws.iter().zip(yts.iter_mut()) {
        let w = &p.w;
        // A multiple of eight rows: whole regrouped groups per task (sixteen: whole panels).
        let per_task = if p.panels {
            rows_per_task(w).next_multiple_of(super::panel::ROWS)
        } else {
            rows_per_task(w)
        };
        let xq = xq.as_ref().filter(|_| q8_applies(w, p.activations));
        let chunks = yt.chunks_mut(per_task * m);
        for (yt, rows) in chunks.zip(w.bytes.chunks(per_task * w.row_bytes())) {
            tasks.push((w.ty, w.cols, xq, p.regrouped, p.panels, rows, yt));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(ty, cols, xq, regrouped, panels, rows, yt)| {
            if panels {
                let n = rows.len() / (2 * cols);
                let w = super::panel::Panels::new(ty, rows, n, cols).expect("panels are 16-bit");
                super::panel::dot_rows(w, x, m, yt);
                return;
            }
            if regrouped {
                let xq = xq.expect("regrouped rows take 8-bit activations");
                // SAFETY: yt is [rows, m]: input i of row r at r·m + i.
                let written = unsafe { super::repack::dot(ty, rows, xq, yt.as_mut_ptr(), 1, m) };
                assert!(written, "regrouped rows without the 8-bit kernels");
                return;
            }
            if xq.is_some_and(|xq| super::int8::rows_dot(ty, rows, xq, yt)) {
                return;
            }
            if !super::matvec::rows_dot(ty, rows, cols, x, m, yt)
                && !super::matvec::half_rows_dot(ty, rows, cols, x, m, yt)
            {
                rows_dot(ty, rows, cols, x, m, yt)
            }
        });
    if m == 1 {
        return yts;
    }
    yts.into_iter()
        .map(|yt| {
            let rows = yt.len() / m;
            let mut y = vec![0f32; m * rows];
            for r in 0..rows {
                for i in 0..m {
                    y[i * rows + r] = yt[r * m + i];
                }
            }
            y
        })
        .collect()
}

/// `x · Wᵀ` for each `(W, activations)` of `ws` (weights of the same input width, as a layer's
/// q/k/v or gate/up projections): the products of [`matmul_quant_with`], with few input rows
/// run as one parallel loop and the input quantized once.
///
/// # Panics
/// As [`matmul_quant`], and when the widths differ.
pub fn matmul_quant_many(
    ws: &[(QuantMatrix<'_>, Activations)],
    x: &[f32],
    m: usize,
) -> Vec<Vec<f32>> {
    let products: Vec<_> = ws.iter().map(|&(w, a)| Product::rows(w, a)).collect();
    products_many(&products, x, m)
}

/// [`matmul_quant_many`] of [`Product`]s.
pub(crate) fn products_many(ws: &[Product<'_>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    for p in ws {
        p.w.validate().expect("quantized matrix shape");
        assert_eq!(
            p.w.cols, first.w.cols,
            "matmul_quant_many: input widths differ"
        );
    }
    assert_eq!(
        x.len(),
        m * first.w.cols,
        "matmul_quant_many: x is not [m, in]"
    );
    if m > SMALL_M {
        // Products in panels as one parallel loop (a layer's q/k/v or gate/up together).
        let panels: Vec<_> = ws.iter().filter_map(|p| p.panels()).collect();
        if panels.len() == ws.len() {
            let bf16_x = ws.iter().all(|p| p.activations == Activations::Bf16);
            return super::panel::matmul_many(&panels, x, m, bf16_x);
        }
    }
    if m == 0 || m > SMALL_M {
        return ws.iter().map(|&p| product(p, x, m)).collect();
    }
    small_m_many(ws, x, m)
}

multiversion! {
    /// `yt[r, i] = Σ_k W[r, k] · x[i, k]` for the rows of `rows` (ggml blocks, `cols` wide).
    fn rows_dot(ty: GgmlType, rows: &[u8], cols: usize, x: &[f32], m: usize, yt: &mut [f32]) {
        let (bs, bb) = (ty.block_size(), ty.block_bytes());
        let rb = cols / bs * bb;
        // Decoded in units of a block, or of 32 values for the plain float types.
        let unit = bs.max(32);
        let unit_bytes = unit / bs * bb;
        let full = cols / unit;
        let mut buf = [0f32; 256];
        for (row, out) in rows.chunks_exact(rb).zip(yt.chunks_exact_mut(m)) {
            let mut acc = [[0f32; LANES]; SMALL_M];
            for u in 0..full {
                let bytes = &row[u * unit_bytes..(u + 1) * unit_bytes];
                if bs == 1 {
                    let y: &mut [f32; 32] = (&mut buf[..32]).try_into().expect("32 values");
                    decode_plain32(ty, bytes, y);
                } else {
                    decode_block(ty, bytes, &mut buf[..unit]);
                }
                for i in 0..m {
                    let xs = &x[i * cols + u * unit..i * cols + (u + 1) * unit];
                    for (w16, x16) in buf[..unit].chunks_exact(LANES).zip(xs.chunks_exact(LANES)) {
                        for l in 0..LANES {
                            acc[i][l] += w16[l] * x16[l];
                        }
                    }
                }
            }
            // Plain float rows whose width is not a multiple of 32.
            for e in full * unit..cols {
                decode_block(ty, &row[e * bb..(e + 1) * bb], &mut buf[..1]);
                for i in 0..m {
                    acc[i][0] += buf[0] * x[i * cols + e];
                }
            }
            for i in 0..m {
                out[i] = acc[i].iter().sum();
            }
        }
    }
}

multiversion! {
    /// Decodes whole rows of blocks into `out` (f32, row-major).
    fn decode_rows(ty: GgmlType, rows: &[u8], out: &mut [f32]) {
        let (bs, bb) = (ty.block_size(), ty.block_bytes());
        if bs == 1 {
            // Plain floats: 32 values at a time, then the rest.
            let mut bytes = rows.chunks_exact(32 * bb);
            let mut values = out.chunks_exact_mut(32);
            for (b, y) in (&mut bytes).zip(&mut values) {
                let y: &mut [f32; 32] = y.try_into().expect("32 values");
                decode_plain32(ty, b, y);
            }
            let (b, y) = (bytes.remainder(), values.into_remainder());
            for (block, y) in b.chunks_exact(bb).zip(y.chunks_exact_mut(1)) {
                decode_block(ty, block, y);
            }
            return;
        }
        for (block, y) in rows.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
            decode_block(ty, block, y);
        }
    }
}

fn tiled(w: QuantMatrix<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    let rb = w.row_bytes();
    tiles_transposed(n, k, m, x, y, |r0, rows, scratch, staging| {
        let bytes = &w.bytes[r0 * rb..(r0 + rows) * rb];
        if transpose_half_into(w.ty, bytes, rows, k, scratch) {
            return;
        }
        decode_rows(w.ty, bytes, &mut staging[..rows * k]);
        transpose_into(&staging[..rows * k], rows, k, scratch);
    });
}

/// `dst [cols, rows] = decode(src)ᵀ` for F16 or BF16 rows `src` (`[rows, cols]`), in one pass:
/// 8 × 8 blocks converted and transposed in AVX registers (decoding to f32 first and then
/// transposing read and wrote the tile twice: F16 prefill ran below F32's). `false` (nothing
/// written) for the other types or without AVX2 + F16C.
fn transpose_half_into(
    ty: GgmlType,
    src: &[u8],
    rows: usize,
    cols: usize,
    dst: &mut [f32],
) -> bool {
    if !matches!(ty, GgmlType::F16 | GgmlType::BF16) {
        return false;
    }
    assert!(
        src.len() >= 2 * rows * cols && dst.len() >= rows * cols,
        "transpose_half_into: buffers smaller than {rows} × {cols}"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
        // SAFETY: the CPU has AVX2 and F16C; the blocks lie inside the buffers checked above.
        unsafe {
            transpose_half_blocks(ty == GgmlType::BF16, src, rows, cols, full_r, full_c, dst)
        };
        // The edges, value by value.
        for r in 0..rows {
            let from = if r < full_r { full_c } else { 0 };
            for c in from..cols {
                let mut v = [0f32];
                decode_block(ty, &src[2 * (r * cols + c)..2 * (r * cols + c) + 2], &mut v);
                dst[c * rows + r] = v[0];
            }
        }
        return true;
    }
    false
}

/// The 8 × 8 block of rows `r0..r0 + 8` of an `[8, ·]` block `a` (row `i` in `a[i]`) stored
/// transposed at `d` (`[·, rows]`, columns `c0..c0 + 8`).
///
/// # Safety
/// The CPU has AVX; the block lies inside `d`'s buffer.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_transposed8(
    a: [std::arch::x86_64::__m256; 8],
    d: *mut f32,
    rows: usize,
    r0: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
    let (t0, t1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
    let (t2, t3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
    let (t4, t5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
    let (t6, t7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    macro_rules! put {
        ($j:expr, $v:expr) => {
            _mm256_storeu_ps(d.add((c0 + $j) * rows + r0), $v)
        };
    }
    put!(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
    put!(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
    put!(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
    put!(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
    put!(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
    put!(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
    put!(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
    put!(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
}

/// Rows ahead of the 8 × 8 transposes whose next cache line is prefetched: the transposes read
/// eight rows side by side, a stride the hardware prefetchers follow late.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 16;

/// Prefetches the cache line at `p` in each of eight rows `stride` bytes apart.
///
/// # Safety
/// None beyond the CPU's SSE (prefetching never faults); `p` need not be in bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_rows(p: *const u8, stride: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..8 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i * stride) as *const i8);
    }
}

/// [`transpose_half_into`] on the top-left `full_r × full_c` block (multiples of 8).
///
/// # Safety
/// The CPU has AVX2 and F16C; `src` holds `rows × cols` 16-bit values and `dst` `cols × rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,f16c")]
unsafe fn transpose_half_blocks(
    bf16: bool,
    src: &[u8],
    rows: usize,
    cols: usize,
    full_r: usize,
    full_c: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    for r0 in (0..full_r).step_by(8) {
        for c0 in (0..full_c).step_by(8) {
            // A cache line holds 32 values of a row: once per line, ask for the same line of
            // the rows two blocks down (+3% prefill on SmolLM2 F16, both ISAs).
            if c0 % 32 == 0 && r0 + PREFETCH_ROWS < full_r {
                prefetch_rows(
                    s.add((r0 + PREFETCH_ROWS) * cols + c0) as *const u8,
                    2 * cols,
                );
            }
            let mut a = [_mm256_setzero_ps(); 8];
            for (i, a) in a.iter_mut().enumerate() {
                let h = _mm_loadu_si128(s.add((r0 + i) * cols + c0) as *const __m128i);
                *a = if bf16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                } else {
                    _mm256_cvtph_ps(h)
                };
            }
            store_transposed8(a, d, rows, r0, c0);
        }
    }
}

/// `y [m, out] = x [m, in] · Wᵀ` for a dense f32 `w` `[out, in]` and many rows `m` (prefill):
/// tiles of [`TILE_ROWS`] rows of `w` are transposed into a per-task buffer `[in, rows]` and
/// multiplied by gemm, one tile per task. gemm packs a row-major right-hand side with vector
/// copies, where the transposed view of `w` costs it a strided gather: 1.1–2.8× faster than
/// `x · wᵀ` through burn on SmolLM2's shapes (AVX-512).
///
/// # Panics
/// When the slices do not match the shapes.
pub fn matmul_dense_many(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        rows * cols,
        "matmul_dense_many: w is not [out, in]"
    );
    assert_eq!(x.len(), m * cols, "matmul_dense_many: x is not [m, in]");
    let mut y = vec![0f32; m * rows];
    if m == 0 || rows == 0 {
        return y;
    }
    tiles_transposed(rows, cols, m, x, &mut y, |r0, n, scratch, _| {
        transpose_into(&w[r0 * cols..(r0 + n) * cols], n, cols, scratch);
    });
    y
}

/// `dst [cols, rows] = srcᵀ` for `src` `[rows, cols]`: 8 × 8 blocks transposed in AVX
/// registers where the CPU has AVX (element by element, the gemm path of a 32-row decoding
/// step spent more time here than in gemm), the edges and other CPUs element by element.
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose_into: buffers smaller than {rows} × {cols}"
    );
    // SAFETY: dst holds cols rows of `rows` values, checked above.
    unsafe { transpose_to(src, rows, cols, dst.as_mut_ptr(), rows) };
}

/// [`transpose_into`] with the rows of `dst` `stride` values apart: `src`'s value `(r, c)` goes
/// to `dst + c · stride + r` (so a band of `src`'s rows lands in its columns of a larger
/// transpose, written in place).
///
/// # Safety
/// `src` holds `rows × cols` values, `stride >= rows`, `dst + c · stride + r` is valid for
/// writes for every `r < rows`, `c < cols`, and nothing else accesses those values meanwhile.
pub(crate) unsafe fn transpose_to(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: *mut f32,
    stride: usize,
) {
    assert!(
        src.len() >= rows * cols && stride >= rows,
        "transpose_to: source smaller than {rows} × {cols} or stride below {rows}"
    );
    let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the blocks lie inside the buffers (the caller's contract).
        unsafe { transpose_blocks_avx(src, (rows, cols), (full_r, full_c), dst, stride) };
        // SAFETY: as above.
        unsafe { transpose_scalar(src, (rows, cols), (full_r, full_c), dst, stride) };
        return;
    }
    // SAFETY: as above.
    unsafe { transpose_scalar(src, (rows, cols), (0, 0), dst, stride) };
}

/// The elements of `dst = srcᵀ` (rows `stride` apart) outside the top-left `done_r × done_c`
/// block of `src`.
///
/// # Safety
/// As [`transpose_to`].
unsafe fn transpose_scalar(
    src: &[f32],
    (rows, cols): (usize, usize),
    (done_r, done_c): (usize, usize),
    dst: *mut f32,
    stride: usize,
) {
    for r in 0..rows {
        let from = if r < done_r { done_c } else { 0 };
        for c in from..cols {
            // SAFETY: inside dst by the caller's contract.
            unsafe { *dst.add(c * stride + r) = src[r * cols + c] };
        }
    }
}

/// `dst = srcᵀ` (rows `stride` apart) on the top-left `full_r × full_c` block (multiples of
/// 8), 8 × 8 at a time.
///
/// # Safety
/// The CPU has AVX; otherwise as [`transpose_to`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(
    src: &[f32],
    (_, cols): (usize, usize),
    (full_r, full_c): (usize, usize),
    d: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    let s = src.as_ptr();
    for r0 in (0..full_r).step_by(8) {
        for c0 in (0..full_c).step_by(8) {
            // As in `transpose_half_blocks` (16 values a line; +1.7% F32 prefill, AVX2).
            if c0 % 16 == 0 && r0 + PREFETCH_ROWS < full_r {
                prefetch_rows(
                    s.add((r0 + PREFETCH_ROWS) * cols + c0) as *const u8,
                    4 * cols,
                );
            }
            let mut a = [_mm256_setzero_ps(); 8];
            for (i, a) in a.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(s.add((r0 + i) * cols + c0));
            }
            store_transposed8(a, d, stride, r0, c0);
        }
    }
}

thread_local! {
    /// [`tiles_transposed`]'s two tile buffers of this thread.
    static TILE_BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y [m, n] = x [m, k] · Wᵀ` where `fill(r0, rows, scratch, staging)` writes rows
/// `r0..r0 + rows` of `W` transposed into `scratch` (`[k, rows]`, row-major; `staging` is a
/// second buffer of the same size); tiles of [`TILE_ROWS`] rows run as parallel tasks, each a
/// single-threaded gemm call.
fn tiles_transposed<F>(n: usize, k: usize, m: usize, x: &[f32], y: &mut [f32], fill: F)
where
    F: Fn(usize, usize, &mut [f32], &mut [f32]) + Sync,
{
    let tiles = n.div_ceil(TILE_ROWS);
    let dst = Shared(y.as_mut_ptr());
    (0..tiles).into_par_iter().for_each(|t| {
        TILE_BUFFERS.with_borrow_mut(|(scratch, staging)| {
            // Buffers kept per thread (rayon's per-split init allocated and zeroed ~0.8 MB
            // for every few tiles: 6% of a decoding step at 32 rows); `fill` overwrites them.
            if scratch.len() < TILE_ROWS * k {
                scratch.resize(TILE_ROWS * k, 0.0);
                staging.resize(TILE_ROWS * k, 0.0);
            }
            let r0 = t * TILE_ROWS;
            let rows = TILE_ROWS.min(n - r0);
            fill(r0, rows, &mut scratch[..rows * k], staging);
            // y[:, r0..r0+rows] = x · scratch: rhs[kk, j] = scratch[kk·rows + j].
            // SAFETY: x is [m, k]; scratch holds k·rows values; the destination columns
            // r0..r0+rows of the [m, n] output belong to this tile alone.
            unsafe {
                matmul(
                    m,
                    rows,
                    k,
                    dst.at(r0),
                    n,
                    1,
                    false,
                    x.as_ptr(),
                    k,
                    1,
                    scratch.as_ptr(),
                    rows,
                    1,
                    1.0,
                );
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::{transpose_into, transpose_to};

    #[test]
    fn transposes_bands_into_the_columns_of_a_strided_destination() {
        // Bands of 16 rows (the last partial) of a 37 × 21 source, each written at its column
        // offset of a destination whose rows are 40 apart: the whole transpose, gaps untouched.
        let (rows, cols, stride) = (37, 21, 40);
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut dst = vec![f32::NAN; cols * stride];
        for r0 in (0..rows).step_by(16) {
            let n = 16.min(rows - r0);
            // SAFETY: every (r, c) of the band lands at c * stride + r0 + r < cols * stride.
            unsafe {
                transpose_to(
                    &src[r0 * cols..(r0 + n) * cols],
                    n,
                    cols,
                    dst.as_mut_ptr().add(r0),
                    stride,
                )
            };
        }
        for c in 0..cols {
            for r in 0..stride {
                let got = dst[c * stride + r];
                if r < rows {
                    assert_eq!(got, src[r * cols + c], "at {r},{c}");
                } else {
                    assert!(got.is_nan(), "gap {r},{c} written");
                }
            }
        }
    }

    #[test]
    fn transposes_every_shape_including_partial_blocks() {
        for (rows, cols) in [(1, 1), (7, 9), (8, 8), (13, 24), (64, 577), (3, 64)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}×{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
