//! Products with 8-bit activations (opt-in, [`super::matmul::Activations::Q8`]): llama.cpp's
//! trade. Few input rows (decoding) take [`rows_dot`], many (prefill) [`gemm`]. The input rows are quantized once per product to Q8_0 (per 32 values,
//! `d = max|x| / 127` stored as f16, values rounded half away from zero: the bytes
//! [`super::quantize::quantize`] writes for Q8_0), and each 32 weights are multiplied into them
//! as bytes with integer dot products (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` +
//! `vpmaddwd`), one float scaling per 32 values. A 4-bit weight is never converted to a float,
//! which is what bounds the f32 path of [`super::matvec`] when decoding.
//!
//! Every weight format is read as 32-value units of unsigned bytes `q` with per-16-value scales
//! `s` and offsets `o` (the weight is `s·q + o`: Q4_0 `d·q - 8d`, Q4_1 `d·q + m`, Q8_0 through
//! VNNI `d·(q ^ 0x80) - 128d`, Q4_K/Q5_K `d·sc·q - dmin·mn` per 32, Q6_K `d·sc·q - 32·d·sc` per
//! 16), so that with `x ≈ dx·qx` a unit contributes `s·dx·Σ q·qx + o·dx·Σ qx`: the first sum is
//! the integer dot product, the second is read from the row's per-16 sums of `qx` computed at
//! quantization, once per output row for all units together.
//!
//! The result equals `dequantize(W) · dequantize(Q8_0(x))` up to f32 summation order (checked
//! against f64 in `tests/gguf.rs`); it differs from the exact f32 product by the rounding of
//! `x` to 8 bits (about 0.4% of a block's largest value per element).

use half::f16;

use super::quant::GgmlType;
use crate::kernels::cpu::multiversion;

/// Widest rows covered (the per-row corrections live in a stack buffer of this many / 16).
pub(crate) const MAX_COLS: usize = 32_768;

/// Input rows quantized to Q8_0: `qs` `[m, cols]`, `d` (the f16 scale, as f32) per 32 values,
/// `s16` (`d · Σ qs`) per 16 values.
#[derive(Clone, Debug, Default)]
pub struct Q8Rows {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s16: Vec<f32>,
    pub m: usize,
    pub cols: usize,
}

impl Q8Rows {
    /// `x` `[m, cols]` (`cols` a multiple of 32) quantized.
    ///
    /// # Panics
    /// When `cols` is not a multiple of 32 or `x` is not `[m, cols]`.
    pub fn quantize(x: &[f32], m: usize, cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(32),
            "Q8Rows: {cols} columns are not whole blocks of 32"
        );
        assert_eq!(x.len(), m * cols, "Q8Rows: x is not [m, cols]");
        let mut rows = Self {
            qs: vec![0; m * cols],
            d: vec![0.0; m * cols / 32],
            s16: vec![0.0; m * cols / 16],
            m,
            cols,
        };
        // Rows in parallel when there are many (prefill), in tasks of at least 32k values.
        let per_task = (32_768 / cols.max(1)).max(1) * cols;
        if m * cols > per_task {
            use rayon::prelude::*;
            rows.qs
                .par_chunks_mut(per_task)
                .zip(rows.d.par_chunks_mut(per_task / 32))
                .zip(rows.s16.par_chunks_mut(per_task / 16))
                .zip(x.par_chunks(per_task))
                .for_each(|(((qs, d), s16), x)| quantize_blocks(x, qs, d, s16));
        } else {
            quantize_blocks(x, &mut rows.qs, &mut rows.d, &mut rows.s16);
        }
        rows
    }
}

multiversion! {
    /// Q8_0 blocks of `x` into `qs` (values), `d` (scales) and `s16` (`d · Σ qs` per 16).
    fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s16: &mut [f32]) {
        for (((xb, qb), d), s) in x
            .chunks_exact(32)
            .zip(qs.chunks_exact_mut(32))
            .zip(d.iter_mut())
            .zip(s16.chunks_exact_mut(2))
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let mut sums = [0i32; 2];
            for (h, (q16, x16)) in qb.chunks_exact_mut(16).zip(xb.chunks_exact(16)).enumerate() {
                for (q, &v) in q16.iter_mut().zip(x16) {
                    *q = (v * inverse).round() as i8;
                }
                sums[h] = q16.iter().map(|&q| i32::from(q)).sum();
            }
            *d = f16::from_f32(scale).to_f32();
            s[0] = *d * sums[0] as f32;
            s[1] = *d * sums[1] as f32;
        }
    }
}

/// The integer dot products this CPU has, for a format `ty` and rows of `cols` values: `None`
/// where the 8-bit kernels do not apply (another format, widths that are not whole blocks, no
/// AVX2).
#[cfg(target_arch = "x86_64")]
pub(super) fn isa(ty: GgmlType, cols: usize) -> Option<(Isa, u8)> {
    use GgmlType as T;
    let covered = matches!(
        ty,
        T::Q4_0 | T::Q4_1 | T::Q5_0 | T::Q5_1 | T::Q8_0 | T::Q4K | T::Q5K | T::Q6K
    );
    if !covered || !cols.is_multiple_of(ty.block_size()) || cols > MAX_COLS {
        return None;
    }
    let kind = match ty {
        T::Q4K | T::Q5K | T::Q6K => super::matvec::x86::kind_k(ty),
        _ => super::matvec::x86::kind(ty),
    };
    #[cfg(feature = "avx512")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        return Some((Isa::Vnni, kind));
    }
    (std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c"))
    .then_some((Isa::Avx2, kind))
}

/// Which integer dot product the kernels use.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) enum Isa {
    /// AVX-512 VNNI `vpdpbusd` on 256-bit vectors.
    #[cfg(feature = "avx512")]
    Vnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`.
    Avx2,
}

/// `yt[r·m + i] = Σ_k W[r, k] · x[i, k]` (`x` quantized in `xq`) for the rows of `W` in
/// `rows`, when `ty` and the CPU are covered (the block and K formats, AVX2 + FMA + F16C);
/// `false` (nothing written) otherwise.
pub(crate) fn rows_dot(ty: GgmlType, rows: &[u8], xq: &Q8Rows, yt: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let Some((isa, kind)) = isa(ty, xq.cols).filter(|_| xq.m > 0) else {
            return false;
        };
        let rb = ty.byte_len(xq.cols);
        assert!(rows.len().is_multiple_of(rb), "int8::rows_dot: rows");
        assert!(yt.len() >= rows.len() / rb * xq.m, "int8::rows_dot: output");
        // SAFETY: the CPU has the features of `isa`; the slices hold the shapes checked above.
        unsafe {
            match isa {
                #[cfg(feature = "avx512")]
                Isa::Vnni => x86::vnni(kind, rows, xq, yt),
                Isa::Avx2 => x86::avx2(kind, rows, xq, yt),
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, rows, xq, yt);
        false
    }
}

/// Output rows per packed group of [`gemm`] (the lanes of a 256-bit vector of i32).
const GROUP: usize = 8;

thread_local! {
    /// [`gemm`]'s packed group of this thread: weight bytes, then scales and offsets.
    static PACKED: std::cell::RefCell<(Vec<u8>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y [m, n] = x · Wᵀ` for the `n` rows of `W` in `bytes` and many input rows (prefill) in
/// `xq`, when `ty` and the CPU are covered (as [`rows_dot`]); `false` (nothing written)
/// otherwise. Groups of eight rows of `W` are decoded once into a packed copy (per 32-value
/// unit, eight vectors whose lane `r` holds four bytes of row `r`, then the rows' scales and
/// offsets), and every input row meets a group through integer dot products whose eight lanes
/// are the eight output rows: no horizontal sums, and the float work of a unit shared by the
/// eight rows. Groups are split across threads.
pub(crate) fn gemm(ty: GgmlType, bytes: &[u8], n: usize, xq: &Q8Rows, y: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;

        use crate::kernels::cpu::Shared;

        let Some((isa, kind)) = isa(ty, xq.cols).filter(|_| xq.m > 0) else {
            return false;
        };
        let rb = ty.byte_len(xq.cols);
        assert_eq!(bytes.len(), n * rb, "int8::gemm: weight bytes");
        assert_eq!(y.len(), xq.m * n, "int8::gemm: output");
        let groups = n.div_ceil(GROUP);
        let units = xq.cols / 32;
        let dst = Shared(y.as_mut_ptr());
        groups_in_parallel(groups).for_each(|g| {
            PACKED.with_borrow_mut(|(q, f)| {
                if q.len() < units * x86::UNIT_BYTES {
                    q.resize(units * x86::UNIT_BYTES, 0);
                    f.resize(units * x86::UNIT_FLOATS, 0.0);
                }
                let r0 = g * GROUP;
                let valid = GROUP.min(n - r0);
                let rows = &bytes[r0 * rb..(r0 + valid) * rb];
                // SAFETY: the CPU has the features of `isa`; `rows` holds `valid` rows of
                // `xq.cols` values, the buffers a packed group; the output columns
                // r0..r0 + valid of every row of the [m, n] output belong to this group alone.
                unsafe {
                    match isa {
                        #[cfg(feature = "avx512")]
                        Isa::Vnni => x86::vnni_gemm(kind, rows, valid, xq, dst.at(r0), n, q, f),
                        Isa::Avx2 => x86::avx2_gemm(kind, rows, valid, xq, dst.at(r0), n, q, f),
                    }
                }
            })
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, bytes, n, xq, y);
        false
    }
}

/// The groups `0..groups` as a parallel iterator of a few tasks per thread.
pub(super) fn groups_in_parallel(
    groups: usize,
) -> impl rayon::iter::ParallelIterator<Item = usize> {
    use rayon::prelude::*;
    let tasks = (4 * rayon::current_num_threads().max(1)).min(groups).max(1);
    let per_task = groups.div_ceil(tasks);
    (0..groups.div_ceil(per_task))
        .into_par_iter()
        .flat_map_iter(move |t| t * per_task..((t + 1) * per_task).min(groups))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::matvec::x86::{
        block_bytes, k_block_bytes, k_scales, scale, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0,
    };
    use super::{Q8Rows, MAX_COLS};

    /// One 32-value unit of a weight row: the bytes `q` (AVX2's Q8_0: the magnitudes, with the
    /// signs in `sign`), the per-lane scale `s` (lanes 0..4 the first 16 values, 4..8 the
    /// others) and the offsets `o` of the two halves.
    struct Unit {
        q: __m256i,
        sign: __m256i,
        s: __m256,
        o: [f32; 2],
    }

    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Every byte of `v` shifted right by `n` (the caller masks the bits of the next byte).
    #[inline(always)]
    unsafe fn shift(v: __m256i, n: usize) -> __m256i {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
    }

    /// The 16 bytes at `p` as 32 nibbles: the low ones (values 0..16) then the high ones.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// 16 in byte `j` where bit `j` of `bits` is set, 0 elsewhere.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// The one unit of the 32-value block at `p`.
    #[inline(always)]
    unsafe fn block_unit<const K: u8, const VNNI: bool>(p: *const u8) -> Unit {
        let (d, o) = scale::<K>(p);
        let zero = _mm256_setzero_si256();
        let (q, sign, o) = match K {
            Q4_0 => (nibbles(p.add(2)), zero, o),
            Q4_1 => (nibbles(p.add(4)), zero, o),
            Q5_0 | Q5_1 => {
                let (h, qs) = if K == Q5_0 { (2, 6) } else { (4, 8) };
                let bits = std::ptr::read_unaligned(p.add(h) as *const u32);
                (
                    _mm256_or_si256(nibbles(p.add(qs)), fifth_bits(bits)),
                    zero,
                    o,
                )
            }
            _ => {
                let q = load32(p.add(2));
                if VNNI {
                    // Unsigned `q + 128`, the 128 taken back through the offset.
                    (
                        _mm256_xor_si256(q, _mm256_set1_epi8(-128)),
                        zero,
                        -128.0 * d,
                    )
                } else {
                    (_mm256_sign_epi8(q, q), q, 0.0)
                }
            }
        };
        Unit {
            q,
            sign,
            s: _mm256_set1_ps(d),
            o: [o, o],
        }
    }

    /// Unit `j` (values `32j..32j + 32`) of the K block at `p`, whose chunk scales and offsets
    /// are `(s, o)`.
    #[inline(always)]
    unsafe fn k_unit<const K: u8>(p: *const u8, j: usize, s: &[f32; 16], o: &[f32; 16]) -> Unit {
        let low4 = _mm256_set1_epi8(0x0F);
        let q = match K {
            Q6K => {
                let (h, quarter) = (j / 4, j % 4);
                let lo = load32(p.add(h * 64 + 32 * (quarter % 2)));
                let lo = _mm256_and_si256(shift(lo, 4 * (quarter / 2)), low4);
                let hi = load32(p.add(128 + h * 32));
                let hi = _mm256_and_si256(shift(hi, 2 * quarter), _mm256_set1_epi8(3));
                _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))
            }
            _ => {
                let qs = if K == Q5K { 48 } else { 16 };
                let q = load32(p.add(qs + (j / 2) * 32));
                let q = _mm256_and_si256(shift(q, 4 * (j % 2)), low4);
                if K == Q5K {
                    let bit = _mm256_and_si256(shift(load32(p.add(16)), j), _mm256_set1_epi8(1));
                    _mm256_or_si256(q, _mm256_slli_epi16(bit, 4))
                } else {
                    q
                }
            }
        };
        Unit {
            q,
            sign: _mm256_setzero_si256(),
            s: _mm256_set_m128(_mm_set1_ps(s[2 * j + 1]), _mm_set1_ps(s[2 * j])),
            o: [o[2 * j], o[2 * j + 1]],
        }
    }

    /// `Σ q·x` of each 4 bytes as 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot<const K: u8, const VNNI: bool>(u: &Unit, x: __m256i) -> __m256i {
        if VNNI {
            #[cfg(feature = "avx512")]
            return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u.q, x);
        }
        let x = if K == Q8_0 {
            _mm256_sign_epi8(x, u.sign)
        } else {
            x
        };
        _mm256_madd_epi16(_mm256_maddubs_epi16(u.q, x), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `Σ a[k]·b[k]`.
    #[inline(always)]
    unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut k = 0;
        while k + 8 <= n {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(k)),
                _mm256_loadu_ps(b.as_ptr().add(k)),
                acc,
            );
            k += 8;
        }
        let mut sum = hsum(acc);
        while k < n {
            sum += a[k] * b[k];
            k += 1;
        }
        sum
    }

    /// The quantized input rows of a group: values from `qs`, scales from `ds`.
    struct Inputs {
        qs: *const u8,
        ds: *const f32,
        cols: usize,
        units: usize,
    }

    /// Independent accumulators per input row: one chain of multiply-adds per unit would wait
    /// on its own latency when few rows share the decoded weights.
    const fn chains(m: usize) -> usize {
        if m == 1 {
            4
        } else if m == 2 {
            2
        } else {
            1
        }
    }

    /// Unit `u` of an output row into the accumulators of the group's input rows.
    #[inline(always)]
    unsafe fn accumulate<const K: u8, const M: usize, const VNNI: bool>(
        x: &Inputs,
        u: usize,
        unit: Unit,
        acc: &mut [[__m256; 4]; M],
        c: usize,
        offsets: &mut [f32],
    ) {
        offsets[2 * u] = unit.o[0];
        offsets[2 * u + 1] = unit.o[1];
        for (i, acc) in acc.iter_mut().enumerate() {
            let q = load32(x.qs.add(i * x.cols + u * 32));
            let sum = _mm256_cvtepi32_ps(dot::<K, VNNI>(&unit, q));
            let s = _mm256_mul_ps(unit.s, _mm256_set1_ps(*x.ds.add(i * x.units + u)));
            acc[c] = _mm256_fmadd_ps(sum, s, acc[c]);
        }
    }

    /// Output rows of `rows` against input rows `i0..i0 + M` of `xq`.
    #[inline(always)]
    unsafe fn group<const K: u8, const M: usize, const VNNI: bool>(
        rows: &[u8],
        xq: &Q8Rows,
        i0: usize,
        yt: *mut f32,
    ) {
        let (cols, m) = (xq.cols, xq.m);
        let k_format = matches!(K, Q4K | Q5K | Q6K);
        let (bs, bb) = if k_format {
            (256, k_block_bytes(K))
        } else {
            (32, block_bytes(K))
        };
        let units = cols / 32;
        let rb = cols / bs * bb;
        // The offsets of every 16 values of the row, dotted with the inputs' `d · Σ qx` at the end.
        let mut offsets = [0f32; MAX_COLS / 16];
        let offsets = &mut offsets[..2 * units];
        let with_offsets = K != Q8_0 || VNNI;
        let qs = xq.qs.as_ptr().add(i0 * cols) as *const u8;
        let ds = xq.d.as_ptr().add(i0 * units);
        for (r, row) in rows.chunks_exact(rb).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 4]; M];
            let x = Inputs {
                qs,
                ds,
                cols,
                units,
            };
            let p = row.as_ptr();
            // Chains are indexed by constants (a loop of a constant count, unrolled), so that
            // the accumulators stay in registers.
            if k_format {
                for b in 0..cols / 256 {
                    let bp = p.add(b * bb);
                    let (s, o) = k_scales::<K>(bp);
                    for j in 0..8 {
                        let unit = k_unit::<K>(bp, j, &s, &o);
                        accumulate::<K, M, VNNI>(
                            &x,
                            8 * b + j,
                            unit,
                            &mut acc,
                            j % chains(M),
                            offsets,
                        );
                    }
                }
            } else {
                let step = chains(M);
                let mut u = 0;
                while u + step <= units {
                    if M == 1 {
                        crate::gguf::matvec::x86::prefetch_ahead::<4>(p.wrapping_add(u * bb));
                    }
                    for c in 0..step {
                        let unit = block_unit::<K, VNNI>(p.add((u + c) * bb));
                        accumulate::<K, M, VNNI>(&x, u + c, unit, &mut acc, c, offsets);
                    }
                    u += step;
                }
                for u in u..units {
                    let unit = block_unit::<K, VNNI>(p.add(u * bb));
                    accumulate::<K, M, VNNI>(&x, u, unit, &mut acc, 0, offsets);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let mut y = hsum(_mm256_add_ps(
                    _mm256_add_ps(acc[0], acc[1]),
                    _mm256_add_ps(acc[2], acc[3]),
                ));
                if with_offsets {
                    let s16 = &xq.s16[(i0 + i) * 2 * units..(i0 + i + 1) * 2 * units];
                    y += dot_f32(offsets, s16);
                }
                *yt.add(r * m + i0 + i) = y;
            }
        }
    }

    /// The 8-lane sums of `v[r]` in lane `r` (a tree of horizontal adds).
    #[inline(always)]
    unsafe fn lane_sums(v: &[__m256i; 8]) -> __m256i {
        let a01 = _mm256_hadd_epi32(v[0], v[1]);
        let a23 = _mm256_hadd_epi32(v[2], v[3]);
        let a45 = _mm256_hadd_epi32(v[4], v[5]);
        let a67 = _mm256_hadd_epi32(v[6], v[7]);
        // Lanes 0..4: rows 0..4 over their values' first halves; 4..8: the second halves.
        let b0 = _mm256_hadd_epi32(a01, a23);
        let b1 = _mm256_hadd_epi32(a45, a67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256(b0, b1, 0x20),
            _mm256_permute2x128_si256(b0, b1, 0x31),
        )
    }

    /// One input row (decoding one sequence) against a 4- or 5-bit block format: eight output
    /// rows at a time, so that their scales, offsets and sums share vectors (lane `r` is output
    /// row `r`) and each unit costs one integer dot product plus an eighth of the float work.
    /// Rows past the last eight go through [`group`]. Q8_0 takes [`group`] alone: its 34-byte
    /// blocks read from eight rows side by side made the 49k-row output head slower than the
    /// f32 path (measured), where one row at a time is not.
    #[inline(always)]
    unsafe fn single<const K: u8, const VNNI: bool>(rows: &[u8], xq: &Q8Rows, yt: *mut f32) {
        let cols = xq.cols;
        let (bb, units) = (block_bytes(K), cols / 32);
        let rb = units * bb;
        let n = rows.len() / rb;
        let qs = xq.qs.as_ptr() as *const u8;
        // The next eight rows are fetched while these are multiplied: eight rows read side by
        // side are eight streams, which the hardware prefetchers do not follow as they follow one.
        let lines = (8 * rb).div_ceil(64);
        let per_unit = lines.div_ceil(units);
        let end = rows.as_ptr_range().end;
        for r0 in (0..n - n % 8).step_by(8) {
            let p = rows.as_ptr().add(r0 * rb);
            let next = p.wrapping_add(16 * rb);
            let (mut acc, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for u in 0..units {
                for l in u * per_unit..((u + 1) * per_unit).min(lines) {
                    let line = next.wrapping_add(64 * l);
                    if line < end {
                        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                    }
                }
                let x = load32(qs.add(u * 32));
                let mut dots = [_mm256_setzero_si256(); 8];
                let (mut s, mut o) = ([0f32; 8], [0f32; 8]);
                for (r, dot_r) in dots.iter_mut().enumerate() {
                    let unit = block_unit::<K, VNNI>(p.add(r * rb + u * bb));
                    *dot_r = dot::<K, VNNI>(&unit, x);
                    s[r] = _mm256_cvtss_f32(unit.s);
                    o[r] = unit.o[0];
                }
                let sums = _mm256_cvtepi32_ps(lane_sums(&dots));
                let dx = _mm256_set1_ps(xq.d[u]);
                acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(_mm256_loadu_ps(s.as_ptr()), dx), acc);
                let sx = _mm256_set1_ps(xq.s16[2 * u] + xq.s16[2 * u + 1]);
                off = _mm256_fmadd_ps(_mm256_loadu_ps(o.as_ptr()), sx, off);
            }
            _mm256_storeu_ps(yt.add(r0), _mm256_add_ps(acc, off));
        }
        let tail = n - n % 8;
        if tail < n {
            group::<K, 1, VNNI>(&rows[tail * rb..], xq, 0, yt.add(tail));
        }
    }

    /// Bytes of a packed unit (eight vectors of 32 bytes) and its floats (the eight rows'
    /// scales of each half, then their offsets of each half).
    pub(super) const UNIT_BYTES: usize = 256;
    pub(super) const UNIT_FLOATS: usize = 32;

    /// The 8 × 8 transpose of 32-bit elements: lane `l` of `v[r]` to lane `r` of `out[l]`.
    #[inline(always)]
    unsafe fn transpose8(v: &[__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
        let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
        let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
        let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
        let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
        let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
        let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
        let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
        // Lanes l and l + 4 of rows 0..4 (u0..u4) and of rows 4..8 (u4..u8).
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256(u0, u4, 0x20),
            _mm256_permute2x128_si256(u1, u5, 0x20),
            _mm256_permute2x128_si256(u2, u6, 0x20),
            _mm256_permute2x128_si256(u3, u7, 0x20),
            _mm256_permute2x128_si256(u0, u4, 0x31),
            _mm256_permute2x128_si256(u1, u5, 0x31),
            _mm256_permute2x128_si256(u2, u6, 0x31),
            _mm256_permute2x128_si256(u3, u7, 0x31),
        ]
    }

    /// Stores unit `u` of a group: the rows' bytes `v` transposed, scales `s` and offsets `o`
    /// (per half, lane = row).
    #[inline(always)]
    unsafe fn store_unit(
        u: usize,
        v: &[__m256i; 8],
        s: &[[f32; 8]; 2],
        o: &[[f32; 8]; 2],
        q: *mut u8,
        f: *mut f32,
    ) {
        let t = transpose8(v);
        for (j, t) in t.iter().enumerate() {
            _mm256_storeu_si256(q.add(u * UNIT_BYTES + 32 * j) as *mut __m256i, *t);
        }
        let f = f.add(u * UNIT_FLOATS);
        for h in 0..2 {
            _mm256_storeu_ps(f.add(8 * h), _mm256_loadu_ps(s[h].as_ptr()));
            _mm256_storeu_ps(f.add(16 + 8 * h), _mm256_loadu_ps(o[h].as_ptr()));
        }
    }

    /// Decodes the `valid` (≤ 8) rows at `rows` (rows of `units` 32-value units) into a packed
    /// group; missing rows are zeros. The bytes are what [`dot`] takes (AVX2's Q8_0: the signed
    /// values, whose magnitudes and signs the kernel splits).
    #[inline(always)]
    unsafe fn pack_group<const K: u8, const VNNI: bool>(
        rows: &[u8],
        valid: usize,
        units: usize,
        q: *mut u8,
        f: *mut f32,
    ) {
        let p = rows.as_ptr();
        let zero = _mm256_setzero_si256();
        if matches!(K, Q4K | Q5K | Q6K) {
            let bb = k_block_bytes(K);
            let rb = units / 8 * bb;
            for b in 0..units / 8 {
                let mut scales = [([0f32; 16], [0f32; 16]); 8];
                for (r, sc) in scales.iter_mut().enumerate().take(valid) {
                    *sc = k_scales::<K>(p.add(r * rb + b * bb));
                }
                for j in 0..8 {
                    let (mut v, mut s, mut o) = ([zero; 8], [[0f32; 8]; 2], [[0f32; 8]; 2]);
                    for r in 0..valid {
                        let (rs, ro) = &scales[r];
                        let unit = k_unit::<K>(p.add(r * rb + b * bb), j, rs, ro);
                        v[r] = unit.q;
                        (s[0][r], s[1][r]) = (rs[2 * j], rs[2 * j + 1]);
                        (o[0][r], o[1][r]) = (unit.o[0], unit.o[1]);
                    }
                    store_unit(8 * b + j, &v, &s, &o, q, f);
                }
            }
        } else {
            let bb = block_bytes(K);
            let rb = units * bb;
            for u in 0..units {
                let (mut v, mut s, mut o) = ([zero; 8], [[0f32; 8]; 2], [[0f32; 8]; 2]);
                for r in 0..valid {
                    let unit = block_unit::<K, VNNI>(p.add(r * rb + u * bb));
                    v[r] = if !VNNI && K == Q8_0 {
                        unit.sign
                    } else {
                        unit.q
                    };
                    let d = _mm256_cvtss_f32(unit.s);
                    (s[0][r], s[1][r]) = (d, d);
                    (o[0][r], o[1][r]) = (unit.o[0], unit.o[1]);
                }
                store_unit(u, &v, &s, &o, q, f);
            }
        }
    }

    /// `acc + Σ w·x` of each 4 bytes (`w` unsigned, `x` signed).
    #[inline(always)]
    unsafe fn dot_add<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        if VNNI {
            #[cfg(feature = "avx512")]
            return _mm256_dpbusd_epi32(acc, w, x);
        }
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Input rows `i0..i0 + MI` of `xq` against a packed group: `y[i, r]` for the group's
    /// `valid` rows (`y` row stride `ldy`).
    #[inline(always)]
    unsafe fn packed_rows<const K: u8, const VNNI: bool, const MI: usize>(
        q: *const u8,
        f: *const f32,
        xq: &Q8Rows,
        i0: usize,
        y: *mut f32,
        ldy: usize,
        valid: usize,
    ) {
        let (cols, units) = (xq.cols, xq.cols / 32);
        // Q6_K scales every 16 values; the other formats every 32 (both halves equal).
        let halves = K == Q6K;
        let signs = !VNNI && K == Q8_0;
        let offsets = !signs;
        let xs = xq.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); MI];
        for u in 0..units {
            let w = q.add(u * UNIT_BYTES);
            let mut lo = [_mm256_setzero_si256(); MI];
            let mut hi = [_mm256_setzero_si256(); MI];
            for j in 0..8 {
                let wv = load32(w.add(32 * j));
                let wu = if signs { _mm256_sign_epi8(wv, wv) } else { wv };
                for i in 0..MI {
                    let at = xs.add((i0 + i) * cols + 32 * u + 4 * j);
                    let bx = _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32));
                    let bx = if signs { _mm256_sign_epi8(bx, wv) } else { bx };
                    if halves && j >= 4 {
                        hi[i] = dot_add::<VNNI>(hi[i], wu, bx);
                    } else {
                        lo[i] = dot_add::<VNNI>(lo[i], wu, bx);
                    }
                }
            }
            let fu = f.add(u * UNIT_FLOATS);
            let (s0, s1) = (_mm256_loadu_ps(fu), _mm256_loadu_ps(fu.add(8)));
            let (o0, o1) = (_mm256_loadu_ps(fu.add(16)), _mm256_loadu_ps(fu.add(24)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let row = i0 + i;
                let dx = _mm256_set1_ps(*xq.d.get_unchecked(row * units + u));
                let (sx0, sx1) = (
                    *xq.s16.get_unchecked(row * 2 * units + 2 * u),
                    *xq.s16.get_unchecked(row * 2 * units + 2 * u + 1),
                );
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[i]), _mm256_mul_ps(s0, dx), *acc);
                if halves {
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[i]), _mm256_mul_ps(s1, dx), *acc);
                    *acc = _mm256_fmadd_ps(o0, _mm256_set1_ps(sx0), *acc);
                    *acc = _mm256_fmadd_ps(o1, _mm256_set1_ps(sx1), *acc);
                } else if offsets {
                    *acc = _mm256_fmadd_ps(o0, _mm256_set1_ps(sx0 + sx1), *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let out = y.add((i0 + i) * ldy);
            if valid == 8 {
                _mm256_storeu_ps(out, *acc);
            } else {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out, valid);
            }
        }
    }

    /// Packs the group `rows` (`valid` rows) and multiplies every input row of `xq` into it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_group<const K: u8, const VNNI: bool>(
        rows: &[u8],
        valid: usize,
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        q: &mut [u8],
        f: &mut [f32],
    ) {
        let units = xq.cols / 32;
        let (q, f) = (q.as_mut_ptr(), f.as_mut_ptr());
        pack_group::<K, VNNI>(rows, valid, units, q, f);
        const MI: usize = 6;
        let m = xq.m;
        let mut i0 = 0;
        while i0 + MI <= m {
            packed_rows::<K, VNNI, MI>(q, f, xq, i0, y, ldy, valid);
            i0 += MI;
        }
        match m - i0 {
            1 => packed_rows::<K, VNNI, 1>(q, f, xq, i0, y, ldy, valid),
            2 => packed_rows::<K, VNNI, 2>(q, f, xq, i0, y, ldy, valid),
            3 => packed_rows::<K, VNNI, 3>(q, f, xq, i0, y, ldy, valid),
            4 => packed_rows::<K, VNNI, 4>(q, f, xq, i0, y, ldy, valid),
            5 => packed_rows::<K, VNNI, 5>(q, f, xq, i0, y, ldy, valid),
            _ => {}
        }
    }

    /// `$f::<K, VNNI>` for any covered format `$kind`.
    macro_rules! by_any_kind {
        ($f:ident, $vnni:expr, $kind:expr, $($arg:expr),*) => {
            match $kind {
                Q4_0 => $f::<Q4_0, $vnni>($($arg),*),
                Q4_1 => $f::<Q4_1, $vnni>($($arg),*),
                Q5_0 => $f::<Q5_0, $vnni>($($arg),*),
                Q5_1 => $f::<Q5_1, $vnni>($($arg),*),
                Q8_0 => $f::<Q8_0, $vnni>($($arg),*),
                Q4K => $f::<Q4K, $vnni>($($arg),*),
                Q5K => $f::<Q5K, $vnni>($($arg),*),
                _ => $f::<Q6K, $vnni>($($arg),*),
            }
        };
    }

    /// [`gemm_group`] with AVX-512 VNNI.
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn vnni_gemm(
        kind: u8,
        rows: &[u8],
        valid: usize,
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        q: &mut [u8],
        f: &mut [f32],
    ) {
        by_any_kind!(gemm_group, true, kind, rows, valid, xq, y, ldy, q, f)
    }

    /// [`gemm_group`] with AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx2_gemm(
        kind: u8,
        rows: &[u8],
        valid: usize,
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        q: &mut [u8],
        f: &mut [f32],
    ) {
        by_any_kind!(gemm_group, false, kind, rows, valid, xq, y, ldy, q, f)
    }

    /// `$f::<K, VNNI>` for the 4- and 5-bit block format `$kind`.
    macro_rules! by_block_kind {
        ($f:ident, $vnni:expr, $kind:expr, $($arg:expr),*) => {
            match $kind {
                Q4_0 => $f::<Q4_0, $vnni>($($arg),*),
                Q4_1 => $f::<Q4_1, $vnni>($($arg),*),
                Q5_0 => $f::<Q5_0, $vnni>($($arg),*),
                _ => $f::<Q5_1, $vnni>($($arg),*),
            }
        };
    }

    /// Runs [`group`] over the input rows of `xq` in groups of at most `MAX` (≤ 8).
    macro_rules! by_groups {
        ($vnni:expr, $max:expr, $kind:expr, $rows:expr, $xq:expr, $yt:expr) => {{
            macro_rules! by_kind {
                ($g:literal, $i0:expr) => {
                    match $kind {
                        Q4_0 => group::<Q4_0, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q4_1 => group::<Q4_1, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q5_0 => group::<Q5_0, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q5_1 => group::<Q5_1, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q8_0 => group::<Q8_0, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q4K => group::<Q4K, $g, $vnni>($rows, $xq, $i0, $yt),
                        Q5K => group::<Q5K, $g, $vnni>($rows, $xq, $i0, $yt),
                        _ => group::<Q6K, $g, $vnni>($rows, $xq, $i0, $yt),
                    }
                };
            }
            let mut i0 = 0;
            while i0 < $xq.m {
                let g = ($max).min($xq.m - i0);
                match g {
                    1 => by_kind!(1, i0),
                    2 => by_kind!(2, i0),
                    3 => by_kind!(3, i0),
                    4 => by_kind!(4, i0),
                    5 => by_kind!(5, i0),
                    6 => by_kind!(6, i0),
                    7 => by_kind!(7, i0),
                    _ => by_kind!(8, i0),
                }
                i0 += g;
            }
        }};
    }

    /// AVX-512 VNNI (`vpdpbusd` on 256-bit vectors).
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn vnni(kind: u8, rows: &[u8], xq: &Q8Rows, yt: &mut [f32]) {
        let yt = yt.as_mut_ptr();
        if xq.m == 1 && kind < Q8_0 {
            return by_block_kind!(single, true, kind, rows, xq, yt);
        }
        by_groups!(true, 8, kind, rows, xq, yt)
    }

    /// AVX2 (`vpmaddubsw` + `vpmaddwd`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2(kind: u8, rows: &[u8], xq: &Q8Rows, yt: &mut [f32]) {
        let yt = yt.as_mut_ptr();
        if xq.m == 1 && kind < Q8_0 {
            return by_block_kind!(single, false, kind, rows, xq, yt);
        }
        by_groups!(false, 4, kind, rows, xq, yt)
    }
}
