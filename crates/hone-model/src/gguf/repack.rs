//! Q4_0, Q4_1, Q4_K and Q5_K weights regrouped for 8-bit activations: rows interleaved by
//! eight, so that one vector load brings four bytes of each of eight rows and the eight lanes of
//! an integer dot product are eight output rows (llama.cpp repacks Q4_0 and Q4_K the same way
//! at load).
//!
//! Every block of these formats is a few f16 fields followed by whole 4-byte words: Q4_0 `d` and
//! 16 nibble bytes (4 words), Q4_1 `d`, `m` and 4 words, Q4_K `d`, `dmin`, 12 bytes of 6-bit
//! scales and minima and 128 nibble bytes (3 + 32 words), Q5_K the same with 32 bytes of fifth
//! bits before the nibbles (3 + 8 + 32 words). A weight `[rows, cols]` (`rows` a
//! multiple of [`ROWS`]) keeps its size: group `g` (rows `8g..8g + 8`) holds, per block, each
//! f16 field of the eight rows side by side (16 bytes: one conversion gives eight rows' scales),
//! then each word of the eight rows side by side (32 bytes: lane `r` is row `r`'s word). Nibble
//! word `c` masked with `0x0F` is four values of every row and shifted by four the four values
//! 16 (Q4_0, Q4_1) or 32 (Q4_K, Q5_K) further, as the file orders them, so each input row needs a
//! broadcast of four of its bytes per half word and no horizontal sums.
//!
//! [`super::QuantWeight`] stores this layout as its only copy when its products take 8-bit
//! activations, and turns it back into rows ([`row_bytes`]) where a reader needs rows.

use super::int8::Q8Rows;
use super::quant::GgmlType;

/// Rows per interleaved group.
pub(crate) const ROWS: usize = 8;

/// Whether a `[rows, cols]` weight of type `ty` is regrouped when its products take 8-bit
/// activations: Q4_0, Q4_1, Q4_K or Q5_K, whole groups of rows, and a CPU with the 8-bit
/// kernels.
pub(crate) fn applies(ty: GgmlType, rows: usize, cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K
        ) && rows > 0
            && rows.is_multiple_of(ROWS)
            && cols > 0
            && super::int8::isa(ty, cols).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, rows, cols);
        false
    }
}

/// The f16 fields and the 4-byte words of a block of `ty`.
fn block_fields(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (1, 4),
        GgmlType::Q4_1 => (2, 4),
        GgmlType::Q4K => (2, 35),
        GgmlType::Q5K => (2, 43),
        _ => unreachable!("repack::applies admits Q4_0, Q4_1, Q4_K and Q5_K"),
    }
}

/// Where row `r`'s f16 fields (2 bytes each) and words (4 bytes each) go in a group's block:
/// `(offset in the row's block, offset in the group's block)`.
fn places(
    ty: GgmlType,
    r: usize,
) -> (
    impl Iterator<Item = (usize, usize)>,
    impl Iterator<Item = (usize, usize)>,
) {
    let (fields, words) = block_fields(ty);
    (
        (0..fields).map(move |f| (2 * f, 16 * f + 2 * r)),
        (0..words).map(move |w| (2 * fields + 4 * w, 16 * fields + 32 * w + 4 * r)),
    )
}

/// The rows `bytes` (whole groups of [`ROWS`] rows of `cols` values) regrouped.
pub(crate) fn interleave(ty: GgmlType, bytes: &[u8], cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    let bb = ty.block_bytes();
    let rb = ty.byte_len(cols);
    for (group, dst) in bytes
        .chunks_exact(ROWS * rb)
        .zip(out.chunks_exact_mut(ROWS * rb))
    {
        for (b, dst) in dst.chunks_exact_mut(ROWS * bb).enumerate() {
            for r in 0..ROWS {
                let row = &group[r * rb + b * bb..r * rb + (b + 1) * bb];
                let (fields, words) = places(ty, r);
                for (at_row, at_group) in fields {
                    dst[at_group..at_group + 2].copy_from_slice(&row[at_row..at_row + 2]);
                }
                for (at_row, at_group) in words {
                    dst[at_group..at_group + 4].copy_from_slice(&row[at_row..at_row + 4]);
                }
            }
        }
    }
    out
}

/// Rows `r0..r0 + out.len() / row bytes` (`r0` a multiple of [`ROWS`]) of the regrouped
/// `bytes`, as the file stores them.
pub(crate) fn row_bytes(ty: GgmlType, bytes: &[u8], cols: usize, r0: usize, out: &mut [u8]) {
    let bb = ty.block_bytes();
    let rb = ty.byte_len(cols);
    assert!(r0.is_multiple_of(ROWS), "repack::row_bytes: r0");
    assert!(out.len().is_multiple_of(rb), "repack::row_bytes: out");
    for (i, dst) in out.chunks_exact_mut(rb).enumerate() {
        let (g, r) = ((r0 + i) / ROWS, (r0 + i) % ROWS);
        let group = &bytes[g * ROWS * rb..(g + 1) * ROWS * rb];
        for (b, dst) in dst.chunks_exact_mut(bb).enumerate() {
            let src = &group[b * ROWS * bb..(b + 1) * ROWS * bb];
            let (fields, words) = places(ty, r);
            for (at_row, at_group) in fields {
                dst[at_row..at_row + 2].copy_from_slice(&src[at_group..at_group + 2]);
            }
            for (at_row, at_group) in words {
                dst[at_row..at_row + 4].copy_from_slice(&src[at_group..at_group + 4]);
            }
        }
    }
}

/// `y[i·ldy + r·lane] = Σ_k W[r, k] · x[i, k]` for the regrouped rows `groups` (whole groups)
/// and every input row of `xq`. `true` when written; `false` (nothing written) where the CPU
/// lacks the kernels (then [`applies`] was false and nothing was regrouped).
///
/// # Safety
/// `y` holds `xq.m` rows of stride `ldy` and `groups.len() / row bytes` outputs of stride `lane`.
pub(crate) unsafe fn dot(
    ty: GgmlType,
    groups: &[u8],
    xq: &Q8Rows,
    y: *mut f32,
    ldy: usize,
    lane: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::int8::Isa;
        let Some((isa, _)) = super::int8::isa(ty, xq.cols) else {
            return false;
        };
        let format = match ty {
            GgmlType::Q4_0 => x86::Q4_0,
            GgmlType::Q4_1 => x86::Q4_1,
            GgmlType::Q4K => x86::Q4K,
            _ => x86::Q5K,
        };
        match isa {
            #[cfg(feature = "avx512")]
            Isa::Vnni => x86::vnni(format, groups, xq, y, ldy, lane),
            Isa::Avx2 => x86::avx2(format, groups, xq, y, ldy, lane),
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, groups, xq, y, ldy, lane);
        false
    }
}

/// `y [m, n] = x · Wᵀ` for the `n` regrouped rows `bytes` and many input rows `xq` (prefill):
/// groups split across threads. `false` (nothing written) as [`dot`].
pub(crate) fn gemm(ty: GgmlType, bytes: &[u8], n: usize, xq: &Q8Rows, y: &mut [f32]) -> bool {
    use rayon::prelude::*;

    use crate::kernels::cpu::Shared;

    if !applies(ty, n, xq.cols) {
        return false;
    }
    let rb = ty.byte_len(xq.cols);
    assert_eq!(bytes.len(), n * rb, "repack::gemm: weight bytes");
    assert_eq!(y.len(), xq.m * n, "repack::gemm: output");
    let dst = Shared(y.as_mut_ptr());
    super::int8::groups_in_parallel(n / ROWS).for_each(|g| {
        let group = &bytes[g * ROWS * rb..(g + 1) * ROWS * rb];
        // SAFETY: output columns 8g..8g + 8 of every row of the [m, n] output belong to this
        // group alone.
        unsafe { dot(ty, group, xq, dst.at(g * ROWS), n, 1) };
    });
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::int8::Q8Rows;
    use super::ROWS;

    // The formats, as const parameters.
    pub(super) const Q4_0: u8 = 0;
    pub(super) const Q4_1: u8 = 1;
    pub(super) const Q4K: u8 = 2;
    pub(super) const Q5K: u8 = 3;

    /// `acc + Σ w·x` of each 4 bytes (`w` unsigned nibbles, `x` signed): VNNI's 32-bit sums, or
    /// AVX2's 16-bit pair sums (summed 16 products at most before [`widen`]: 16 · 15 · 127 <
    /// 2¹⁵).
    #[inline(always)]
    unsafe fn dot_add<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        if VNNI {
            #[cfg(feature = "avx512")]
            return _mm256_dpbusd_epi32(acc, w, x);
        }
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x))
    }

    /// The sums of [`dot_add`] as f32 lanes.
    #[inline(always)]
    unsafe fn widen<const VNNI: bool>(s: __m256i) -> __m256 {
        if VNNI {
            _mm256_cvtepi32_ps(s)
        } else {
            _mm256_cvtepi32_ps(_mm256_madd_epi16(s, _mm256_set1_epi16(1)))
        }
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Eight f16 at `p` as f32.
    #[inline(always)]
    unsafe fn halves(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// The four bytes at `p` in every lane.
    #[inline(always)]
    unsafe fn bcast(p: *const u8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Byte `j` of every 32-bit lane of `v`, as a number.
    #[inline(always)]
    unsafe fn byte(v: __m256i, j: usize) -> __m256i {
        _mm256_and_si256(
            _mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * j as i32)),
            _mm256_set1_epi32(0xFF),
        )
    }

    /// Stores the eight outputs of `acc` (lane `r`: output `r`, stride `lane`).
    #[inline(always)]
    unsafe fn store(out: *mut f32, acc: __m256, lane: usize) {
        if lane == 1 {
            _mm256_storeu_ps(out, acc);
        } else {
            let mut lanes = [0f32; ROWS];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for (r, v) in lanes.iter().enumerate() {
                *out.add(r * lane) = *v;
            }
        }
    }

    /// Q4_0 or Q4_1 groups against input rows `i0..i0 + MI`: per block, eight scales in one
    /// conversion, four loads of nibbles for eight rows, and per input row eight integer dot
    /// products against broadcasts of four input bytes.
    #[inline(always)]
    unsafe fn block_rows<const F: u8, const VNNI: bool, const MI: usize>(
        groups: &[u8],
        xq: &Q8Rows,
        i0: usize,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        let (cols, units) = (xq.cols, xq.cols / 32);
        let (bb8, hdr) = if F == Q4_1 { (160, 32) } else { (144, 16) };
        let xs = xq.qs.as_ptr() as *const u8;
        let mask = _mm256_set1_epi8(0x0F);
        for (g, group) in groups.chunks_exact(units * bb8).enumerate() {
            let p = group.as_ptr();
            let mut acc = [_mm256_setzero_ps(); MI];
            for u in 0..units {
                let b = p.add(u * bb8);
                if MI == 1 {
                    crate::gguf::matvec::x86::prefetch_ahead::<3>(b);
                }
                let d = halves(b);
                // Two chains per input row (low and high nibbles), for the latency of one row.
                let mut s = [[_mm256_setzero_si256(); 2]; MI];
                for c in 0..4 {
                    let raw = load(b.add(hdr + 32 * c));
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    for (i, s) in s.iter_mut().enumerate() {
                        let at = xs.add((i0 + i) * cols + 32 * u + 4 * c);
                        s[0] = dot_add::<VNNI>(s[0], lo, bcast(at));
                        s[1] = dot_add::<VNNI>(s[1], hi, bcast(at.add(16)));
                    }
                }
                let m = if F == Q4_1 {
                    halves(b.add(16))
                } else {
                    _mm256_setzero_ps()
                };
                for (i, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                    let row = i0 + i;
                    let dx = *xq.d.get_unchecked(row * units + u);
                    let sx = *xq.s16.get_unchecked(row * 2 * units + 2 * u)
                        + *xq.s16.get_unchecked(row * 2 * units + 2 * u + 1);
                    let sum = if VNNI {
                        _mm256_cvtepi32_ps(_mm256_add_epi32(s[0], s[1]))
                    } else {
                        widen::<VNNI>(_mm256_add_epi16(s[0], s[1]))
                    };
                    if F == Q4_1 {
                        // d·dx·Σ q·qx + m·dx·Σ qx.
                        *acc = _mm256_fmadd_ps(d, _mm256_mul_ps(sum, _mm256_set1_ps(dx)), *acc);
                        *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(sx), *acc);
                    } else {
                        // d·(dx·Σ q·qx - 8·dx·Σ qx).
                        let t = _mm256_fmadd_ps(sum, _mm256_set1_ps(dx), _mm256_set1_ps(-8.0 * sx));
                        *acc = _mm256_fmadd_ps(d, t, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                store(y.add((i0 + i) * ldy + g * ROWS * lane), *acc, lane);
            }
        }
    }

    /// The scale and minimum of 32-value unit `j` of eight Q4_K rows (lane `r`: row `r`) from
    /// their 12 bytes as three words `w` (as ggml's `get_scale_min_k4`: units 0..4 the low six
    /// bits of bytes `j` and `j + 4`; units 4..8 four bits of byte `j + 4` and the two high bits
    /// of bytes `j - 4` and `j`), times `d` and `dmin`.
    #[inline(always)]
    unsafe fn k_scale(w: &[__m256i; 3], j: usize, d: __m256, dmin: __m256) -> (__m256, __m256) {
        let six = _mm256_set1_epi32(63);
        let (sc, mn) = if j < 4 {
            (
                _mm256_and_si256(byte(w[0], j), six),
                _mm256_and_si256(byte(w[1], j), six),
            )
        } else {
            let (lo, a, b) = (byte(w[2], j - 4), byte(w[0], j - 4), byte(w[1], j - 4));
            (
                _mm256_or_si256(
                    _mm256_and_si256(lo, _mm256_set1_epi32(15)),
                    _mm256_slli_epi32(_mm256_srli_epi32(a, 6), 4),
                ),
                _mm256_or_si256(
                    _mm256_srli_epi32(lo, 4),
                    _mm256_slli_epi32(_mm256_srli_epi32(b, 6), 4),
                ),
            )
        };
        (
            _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)),
            _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn)),
        )
    }

    /// Bit `n` of every byte of `bits`, as 16 or 0.
    #[inline(always)]
    unsafe fn fifth(bits: __m256i, n: usize) -> __m256i {
        let v = _mm256_srl_epi16(bits, _mm_cvtsi32_si128(n as i32));
        _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi8(1)), 4)
    }

    /// Q4_K (or with `FIVE` Q5_K) groups against input rows `i0..i0 + MI`: per 256-value
    /// block, the eight rows' scales decoded side by side, then per 64 values eight loads of
    /// nibbles for eight rows (Q5_K: and their fifth bits, one load per four values of the 32)
    /// and per input row sixteen integer dot products.
    #[inline(always)]
    unsafe fn k_rows<const FIVE: bool, const VNNI: bool, const MI: usize>(
        groups: &[u8],
        xq: &Q8Rows,
        i0: usize,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        // Bytes of a block of eight rows; where the nibble words start (after d, dmin, the
        // three words of scales and, for Q5_K, the eight words of fifth bits).
        let (bb8, qs) = if FIVE { (8 * 176, 384) } else { (8 * 144, 128) };
        let (cols, units) = (xq.cols, xq.cols / 32);
        let xs = xq.qs.as_ptr() as *const u8;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for (g, group) in groups.chunks_exact(cols / 256 * bb8).enumerate() {
            let p = group.as_ptr();
            let mut acc = [_mm256_setzero_ps(); MI];
            for sb in 0..cols / 256 {
                let b = p.add(sb * bb8);
                let (d, dmin) = (halves(b), halves(b.add(16)));
                let w = [load(b.add(32)), load(b.add(64)), load(b.add(96))];
                for pair in 0..4 {
                    let mut s = [[_mm256_setzero_si256(); 2]; MI];
                    // AVX2 with 5-bit values: the 16-bit sums of the first four words, widened
                    // (eight products of at most 31 · 127 each fit 16 bits, sixteen do not).
                    let mut first = [[_mm256_setzero_si256(); 2]; MI];
                    for c in 0..8 {
                        let raw = load(b.add(qs + 256 * pair + 32 * c));
                        let mut lo = _mm256_and_si256(raw, mask);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        if FIVE {
                            // Bit 2·pair (2·pair + 1) of each byte of word c of the fifth bits
                            // is the fifth bit of the low (high) nibble of that byte's value.
                            let bits = load(b.add(128 + 32 * c));
                            lo = _mm256_or_si256(lo, fifth(bits, 2 * pair));
                            hi = _mm256_or_si256(hi, fifth(bits, 2 * pair + 1));
                        }
                        for (i, s) in s.iter_mut().enumerate() {
                            let at = xs.add((i0 + i) * cols + 256 * sb + 64 * pair + 4 * c);
                            s[0] = dot_add::<VNNI>(s[0], lo, bcast(at));
                            s[1] = dot_add::<VNNI>(s[1], hi, bcast(at.add(32)));
                        }
                        if FIVE && !VNNI && c == 3 {
                            for (first, s) in first.iter_mut().zip(s.iter_mut()) {
                                for h in 0..2 {
                                    first[h] = _mm256_madd_epi16(s[h], ones);
                                    s[h] = _mm256_setzero_si256();
                                }
                            }
                        }
                    }
                    let scales = [
                        k_scale(&w, 2 * pair, d, dmin),
                        k_scale(&w, 2 * pair + 1, d, dmin),
                    ];
                    for (i, ((acc, s), first)) in acc.iter_mut().zip(&s).zip(&first).enumerate() {
                        let row = i0 + i;
                        for (h, (sc, mn)) in scales.iter().enumerate() {
                            let u = 8 * sb + 2 * pair + h;
                            let dx = *xq.d.get_unchecked(row * units + u);
                            let sx = *xq.s16.get_unchecked(row * 2 * units + 2 * u)
                                + *xq.s16.get_unchecked(row * 2 * units + 2 * u + 1);
                            let sum = if FIVE && !VNNI {
                                let ints =
                                    _mm256_add_epi32(first[h], _mm256_madd_epi16(s[h], ones));
                                _mm256_cvtepi32_ps(ints)
                            } else {
                                widen::<VNNI>(s[h])
                            };
                            let sum = _mm256_mul_ps(sum, _mm256_set1_ps(dx));
                            // d·sc·dx·Σ q·qx - dmin·mn·dx·Σ qx.
                            *acc = _mm256_fmadd_ps(*sc, sum, *acc);
                            *acc = _mm256_fnmadd_ps(*mn, _mm256_set1_ps(sx), *acc);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                store(y.add((i0 + i) * ldy + g * ROWS * lane), *acc, lane);
            }
        }
    }

    /// The kernel of format `F` for input rows `i0..i0 + MI`.
    #[inline(always)]
    unsafe fn rows<const F: u8, const VNNI: bool, const MI: usize>(
        groups: &[u8],
        xq: &Q8Rows,
        i0: usize,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        if F == Q4K {
            k_rows::<false, VNNI, MI>(groups, xq, i0, y, ldy, lane)
        } else if F == Q5K {
            k_rows::<true, VNNI, MI>(groups, xq, i0, y, ldy, lane)
        } else {
            block_rows::<F, VNNI, MI>(groups, xq, i0, y, ldy, lane)
        }
    }

    /// [`rows`] for every input row of `xq`, six at a time (the vector registers of AVX2 hold
    /// the accumulators of six).
    #[inline(always)]
    unsafe fn all_rows<const F: u8, const VNNI: bool>(
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        const MI: usize = 6;
        let mut i0 = 0;
        while i0 + MI <= xq.m {
            rows::<F, VNNI, MI>(groups, xq, i0, y, ldy, lane);
            i0 += MI;
        }
        match xq.m - i0 {
            1 => rows::<F, VNNI, 1>(groups, xq, i0, y, ldy, lane),
            2 => rows::<F, VNNI, 2>(groups, xq, i0, y, ldy, lane),
            3 => rows::<F, VNNI, 3>(groups, xq, i0, y, ldy, lane),
            4 => rows::<F, VNNI, 4>(groups, xq, i0, y, ldy, lane),
            5 => rows::<F, VNNI, 5>(groups, xq, i0, y, ldy, lane),
            _ => {}
        }
    }

    /// `all_rows::<F, $vnni>` for the format `$format`.
    macro_rules! by_format {
        ($vnni:expr, $format:expr, $($arg:expr),*) => {
            match $format {
                Q4_0 => all_rows::<Q4_0, $vnni>($($arg),*),
                Q4_1 => all_rows::<Q4_1, $vnni>($($arg),*),
                Q4K => all_rows::<Q4K, $vnni>($($arg),*),
                _ => all_rows::<Q5K, $vnni>($($arg),*),
            }
        };
    }

    /// AVX-512 VNNI (`vpdpbusd` on 256-bit vectors).
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn vnni(
        format: u8,
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        by_format!(true, format, groups, xq, y, ldy, lane)
    }

    /// AVX2 (`vpmaddubsw`, 16-bit sums, one `vpmaddwd` per 32 values).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2(
        format: u8,
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        by_format!(false, format, groups, xq, y, ldy, lane)
    }
}
