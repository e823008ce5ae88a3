//! Q4_0 and Q4_1 weights regrouped for 8-bit activations: rows interleaved by eight, so that
//! one vector load brings four bytes of each of eight rows and the eight lanes of an integer dot
//! product are eight output rows (llama.cpp repacks Q4_0 the same way at load).
//!
//! A weight `[rows, cols]` (`rows` a multiple of [`ROWS`]) keeps its size: group `g` (rows
//! `8g..8g + 8`) holds, per block `b` of 32 columns, the eight rows' f16 scales `d` (16 bytes),
//! for Q4_1 their f16 minima `m` (16 bytes), then 128 bytes of nibbles in four chunks of 32: in
//! chunk `c`, bytes `4r..4r + 4` are bytes `4c..4c + 4` of row `r`'s 16 nibble bytes (low nibble
//! of byte `i`: value `i`, high nibble: value `i + 16`, as in the file). So chunk `c` masked with
//! `0x0F` is values `4c..4c + 4` of every row, and shifted by four, values `16 + 4c..20 + 4c`:
//! each input row needs a broadcast of four of its bytes per half chunk and no horizontal sums.
//! Scales are eight f16 side by side: one conversion gives the eight rows' scales.
//!
//! [`super::QuantWeight`] stores this layout as its only copy when its products take 8-bit
//! activations, and turns it back into rows ([`row_bytes`]) where a reader needs rows.

use super::int8::Q8Rows;
use super::quant::GgmlType;

/// Rows per interleaved group.
pub(crate) const ROWS: usize = 8;

/// Whether a `[rows, cols]` weight of type `ty` is regrouped when its products take 8-bit
/// activations: Q4_0 or Q4_1, whole groups of rows, and a CPU with the 8-bit kernels.
pub(crate) fn applies(ty: GgmlType, rows: usize, cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1)
            && rows > 0
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

/// Bytes of one block's scales (and minima) in a group.
fn header(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_1 {
        32
    } else {
        16
    }
}

/// The rows `bytes` (whole groups of [`ROWS`] rows of `cols` values) regrouped.
pub(crate) fn interleave(ty: GgmlType, bytes: &[u8], cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    let (bb, hdr) = (ty.block_bytes(), header(ty));
    let (blocks, fields) = (cols / 32, hdr / 16);
    let rb = blocks * bb;
    for (group, dst) in bytes
        .chunks_exact(ROWS * rb)
        .zip(out.chunks_exact_mut(ROWS * rb))
    {
        for (b, dst) in dst.chunks_exact_mut(ROWS * bb).enumerate() {
            for r in 0..ROWS {
                let src = &group[r * rb + b * bb..r * rb + (b + 1) * bb];
                for f in 0..fields {
                    dst[16 * f + 2 * r..16 * f + 2 * r + 2].copy_from_slice(&src[2 * f..2 * f + 2]);
                }
                for c in 0..4 {
                    let at = hdr + 32 * c + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[hdr / 8 + 4 * c..hdr / 8 + 4 * c + 4]);
                }
            }
        }
    }
    out
}

/// Rows `r0..r0 + out.len() / row bytes` (`r0` a multiple of [`ROWS`]) of the regrouped
/// `bytes`, as the file stores them.
pub(crate) fn row_bytes(ty: GgmlType, bytes: &[u8], cols: usize, r0: usize, out: &mut [u8]) {
    let (bb, hdr) = (ty.block_bytes(), header(ty));
    let (blocks, fields) = (cols / 32, hdr / 16);
    let rb = blocks * bb;
    assert!(r0.is_multiple_of(ROWS), "repack::row_bytes: r0");
    assert!(out.len().is_multiple_of(rb), "repack::row_bytes: out");
    for (i, dst) in out.chunks_exact_mut(rb).enumerate() {
        let (g, r) = ((r0 + i) / ROWS, (r0 + i) % ROWS);
        let group = &bytes[g * ROWS * rb..(g + 1) * ROWS * rb];
        for (b, dst) in dst.chunks_exact_mut(bb).enumerate() {
            let src = &group[b * ROWS * bb..(b + 1) * ROWS * bb];
            for f in 0..fields {
                dst[2 * f..2 * f + 2].copy_from_slice(&src[16 * f + 2 * r..16 * f + 2 * r + 2]);
            }
            for c in 0..4 {
                let at = hdr + 32 * c + 4 * r;
                dst[hdr / 8 + 4 * c..hdr / 8 + 4 * c + 4].copy_from_slice(&src[at..at + 4]);
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
        let q41 = ty == GgmlType::Q4_1;
        match isa {
            #[cfg(feature = "avx512")]
            Isa::Vnni => x86::vnni(q41, groups, xq, y, ldy, lane),
            Isa::Avx2 => x86::avx2(q41, groups, xq, y, ldy, lane),
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

    /// Regrouped rows against input rows `i0..i0 + MI`: per block, eight scales in one
    /// conversion, four loads of nibbles for eight rows, and per input row eight integer dot
    /// products against broadcasts of four input bytes (AVX2: the sixteen 16-bit products
    /// summed before one widening, which cannot overflow: 16 · 15 · 127 < 2¹⁵).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const Q41: bool, const VNNI: bool, const MI: usize>(
        groups: &[u8],
        xq: &Q8Rows,
        i0: usize,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        let (cols, units) = (xq.cols, xq.cols / 32);
        let (bb8, hdr) = if Q41 { (160, 32) } else { (144, 16) };
        let xs = xq.qs.as_ptr() as *const u8;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for (g, group) in groups.chunks_exact(units * bb8).enumerate() {
            let p = group.as_ptr();
            let mut acc = [_mm256_setzero_ps(); MI];
            for u in 0..units {
                let b = p.add(u * bb8);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(b as *const __m128i));
                // Two chains per input row (low and high nibbles), for the latency of one row.
                let mut s = [[_mm256_setzero_si256(); 2]; MI];
                for c in 0..4 {
                    let raw = _mm256_loadu_si256(b.add(hdr + 32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    for (i, s) in s.iter_mut().enumerate() {
                        let at = xs.add((i0 + i) * cols + 32 * u + 4 * c);
                        let xl = _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32));
                        let xh =
                            _mm256_set1_epi32(std::ptr::read_unaligned(at.add(16) as *const i32));
                        if VNNI {
                            #[cfg(feature = "avx512")]
                            {
                                s[0] = _mm256_dpbusd_epi32(s[0], lo, xl);
                                s[1] = _mm256_dpbusd_epi32(s[1], hi, xh);
                            }
                        } else {
                            s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(lo, xl));
                            s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(hi, xh));
                        }
                    }
                }
                let m = if Q41 {
                    _mm256_cvtph_ps(_mm_loadu_si128(b.add(16) as *const __m128i))
                } else {
                    _mm256_setzero_ps()
                };
                for (i, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                    let row = i0 + i;
                    let dx = *xq.d.get_unchecked(row * units + u);
                    let sx = *xq.s16.get_unchecked(row * 2 * units + 2 * u)
                        + *xq.s16.get_unchecked(row * 2 * units + 2 * u + 1);
                    let sum = if VNNI {
                        _mm256_add_epi32(s[0], s[1])
                    } else {
                        _mm256_madd_epi16(_mm256_add_epi16(s[0], s[1]), ones)
                    };
                    let sum = _mm256_cvtepi32_ps(sum);
                    if Q41 {
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
                let out = y.add((i0 + i) * ldy + g * ROWS * lane);
                if lane == 1 {
                    _mm256_storeu_ps(out, *acc);
                } else {
                    let mut lanes = [0f32; ROWS];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                    for (r, v) in lanes.iter().enumerate() {
                        *out.add(r * lane) = *v;
                    }
                }
            }
        }
    }

    /// [`rows`] for every input row of `xq`, six at a time (the vector registers of AVX2 hold
    /// the accumulators of six).
    #[inline(always)]
    unsafe fn all_rows<const Q41: bool, const VNNI: bool>(
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        const MI: usize = 6;
        let mut i0 = 0;
        while i0 + MI <= xq.m {
            rows::<Q41, VNNI, MI>(groups, xq, i0, y, ldy, lane);
            i0 += MI;
        }
        match xq.m - i0 {
            1 => rows::<Q41, VNNI, 1>(groups, xq, i0, y, ldy, lane),
            2 => rows::<Q41, VNNI, 2>(groups, xq, i0, y, ldy, lane),
            3 => rows::<Q41, VNNI, 3>(groups, xq, i0, y, ldy, lane),
            4 => rows::<Q41, VNNI, 4>(groups, xq, i0, y, ldy, lane),
            5 => rows::<Q41, VNNI, 5>(groups, xq, i0, y, ldy, lane),
            _ => {}
        }
    }

    /// AVX-512 VNNI (`vpdpbusd` on 256-bit vectors).
    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn vnni(
        q41: bool,
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        if q41 {
            all_rows::<true, true>(groups, xq, y, ldy, lane)
        } else {
            all_rows::<false, true>(groups, xq, y, ldy, lane)
        }
    }

    /// AVX2 (`vpmaddubsw`, 16-bit sums, one `vpmaddwd` per block).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2(
        q41: bool,
        groups: &[u8],
        xq: &Q8Rows,
        y: *mut f32,
        ldy: usize,
        lane: usize,
    ) {
        if q41 {
            all_rows::<true, false>(groups, xq, y, ldy, lane)
        } else {
            all_rows::<false, false>(groups, xq, y, ldy, lane)
        }
    }
}
