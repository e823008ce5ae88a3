//! Few-row products with 8-bit activations (opt-in, [`super::matmul::Activations::Q8`]):
//! llama.cpp's trade. The input rows are quantized once per product to Q8_0 (per 32 values,
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
        quantize_blocks(x, &mut rows.qs, &mut rows.d, &mut rows.s16);
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

/// `yt[r·m + i] = Σ_k W[r, k] · x[i, k]` (`x` quantized in `xq`) for the rows of `W` in
/// `rows`, when `ty` and the CPU are covered (the block and K formats, AVX2 + FMA + F16C);
/// `false` (nothing written) otherwise.
pub(crate) fn rows_dot(ty: GgmlType, rows: &[u8], xq: &Q8Rows, yt: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use GgmlType as T;
        let (cols, m) = (xq.cols, xq.m);
        let covered = matches!(
            ty,
            T::Q4_0 | T::Q4_1 | T::Q5_0 | T::Q5_1 | T::Q8_0 | T::Q4K | T::Q5K | T::Q6K
        );
        if !covered || cols % ty.block_size() != 0 || cols > MAX_COLS || m == 0 {
            return false;
        }
        let rb = ty.byte_len(cols);
        assert!(rows.len().is_multiple_of(rb), "int8::rows_dot: rows");
        assert!(yt.len() >= rows.len() / rb * m, "int8::rows_dot: output");
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
            // SAFETY: the CPU has the features; the slices hold the shapes checked above.
            unsafe { x86::vnni(kind, rows, xq, yt) };
            return true;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above.
            unsafe { x86::avx2(kind, rows, xq, yt) };
            return true;
        }
        false
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, rows, xq, yt);
        false
    }
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
