//! Few-row products (decoding) for the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
//! and the K formats (Q4_K, Q5_K, Q6_K: 256-value blocks read as 16 chunks of 16 values, each
//! with its own `s·q + o` from the block's packed scales), written with x86 intrinsics: each
//! block is decoded into AVX-512 registers (two per 32 values; AVX2: four) as `d·q + m` in f32
//! and multiplied into every input row while it is in registers, so
//! the weights are read once at the speed the CPU decodes them (the portable loop of
//! [`super::matmul`] stores each block to memory and reads it back, about four times slower).
//!
//! Activations stay f32 (llama.cpp quantizes them to 8 bits for integer dot products; hone keeps
//! the exact product): results equal `x · dequantize(W)ᵀ` up to f32 summation order (a block's
//! `d·q + m` is one fused multiply-add, so Q4_1/Q5_1 weights may differ from the decoded ones by
//! one rounding). [`rows_dot`] returns `false` for the types and CPUs it does not cover; the
//! caller then takes the portable loop.

use super::quant::GgmlType;

/// `yt[r·m + i] = Σ_k W[r, k] · x[i, k]` for the rows of `W` in `rows` (`cols` wide), when `ty`
/// and the CPU are covered; `false` (nothing written) otherwise.
pub(crate) fn rows_dot(
    ty: GgmlType,
    rows: &[u8],
    cols: usize,
    x: &[f32],
    m: usize,
    yt: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let k_format = matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K);
        if !(k_format
            || matches!(
                ty,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
            ))
            || !cols.is_multiple_of(ty.block_size())
        {
            return false;
        }
        let rb = ty.byte_len(cols);
        assert!(
            rows.len().is_multiple_of(rb) && x.len() >= m * cols,
            "rows_dot: shapes"
        );
        assert!(yt.len() >= rows.len() / rb * m, "rows_dot: output");
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features; the slices hold the shapes checked above.
            unsafe {
                if k_format {
                    x86::v4::rows_dot_k(ty, rows, cols, x, m, yt)
                } else {
                    x86::v4::rows_dot(ty, rows, cols, x, m, yt)
                }
            };
            return true;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above.
            unsafe {
                if k_format {
                    x86::v3::rows_dot_k(ty, rows, cols, x, m, yt)
                } else {
                    x86::v3::rows_dot(ty, rows, cols, x, m, yt)
                }
            };
            return true;
        }
        false
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, rows, cols, x, m, yt);
        false
    }
}

/// [`rows_dot`] for dense f32 rows `w` (`cols` wide): `yt[r·m + i] = Σ_k w[r, k] · x[i, k]`.
/// Always computes (a portable loop where the CPU has neither AVX-512 nor AVX2).
pub(crate) fn dense_rows_dot(w: &[f32], cols: usize, x: &[f32], m: usize, yt: &mut [f32]) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    assert!(
        w.len() == rows * cols && x.len() >= m * cols && yt.len() >= rows * m,
        "dense_rows_dot: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features; the slices hold the shapes checked above.
            unsafe { x86::v4::dense_rows_dot(w, cols, x, m, yt) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { x86::v3::dense_rows_dot(w, cols, x, m, yt) };
            return;
        }
    }
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for i in 0..m {
            let xi = &x[i * cols..(i + 1) * cols];
            yt[r * m + i] = row.iter().zip(xi).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// How far ahead of the weights being read the one-input-row products (decoding) fetch
    /// them. The hardware prefetchers of an Intel Xeon (Emerald Rapids, 2 vCPUs) left those
    /// products stalled on memory (one core streamed ~14 GB/s of a plain read, ~5 GB/s in the
    /// Q8_0 product). SmolLM2 decode there, alternated runs without / 2 KiB / 4 KiB ahead: F16
    /// 51-54 / 68-70 / 66-76 tokens/s, F32 37-38 / 38-41 / 43-44, Q8_0 with 8-bit activations
    /// 75-87 / 115 / 120-129, Q4_1 likewise 149-193 / 196-221 / 216. On a later Xeon (model 167,
    /// 480 MiB L3, 2 vCPUs), 4 KiB / 8 KiB ahead, three alternated pairs each: F32 34.8-37.2 /
    /// 39.4-40.7 tokens/s (llama.cpp 40.6-46.2 there), Q4_1 63.0-67.1 / 64.4-69.1; 16 KiB was
    /// no faster than 8 and 32 KiB slower than 4. The block and K formats with f32 activations
    /// (`group`, `group_k`) fetched nothing ahead until later: on that Xeon their one-row
    /// products ran at ~4 GB/s of weights, a third of their cache-resident rate; one line per
    /// block fetched ahead, SmolLM2 exact decode Q4_1 53-56 -> 130-136 tokens/s, Q8_0 79-81 ->
    /// 154-167, the Q6_K file 69 -> 118-142 (alternated runs).
    pub(in crate::gguf) const PREFETCH_AHEAD: usize = 8192;

    /// Fetches the `LINES` cache lines [`PREFETCH_AHEAD`] bytes past `p` (weights read once, in
    /// order; the address may lie past them, where a prefetch is dropped).
    #[inline(always)]
    pub(in crate::gguf) unsafe fn prefetch_ahead<const LINES: usize>(p: *const u8) {
        let ahead = p.wrapping_add(PREFETCH_AHEAD);
        for l in 0..LINES {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
        }
    }

    /// The f16 at `p` as f32.
    #[inline(always)]
    pub(in crate::gguf) unsafe fn f16(p: *const u8) -> f32 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
    }

    /// The f16 at `p` in all eight lanes. A 16-bit broadcast from memory writes the whole
    /// register: converting one lane instead ([`f16`], then a broadcast) compiles to an insert
    /// into whatever register LLVM picks (`vpinsrw $0, mem, %xmmN, ...`, the other lanes being
    /// unused), and in the block loops it picked the accumulator (AVX2) or the previous block's
    /// scale (AVX-512), so every block waited for the one before: the AVX2 kernel ran at ~19
    /// cycles per 32-value block.
    #[inline(always)]
    pub(in crate::gguf) unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(p as *const i16)))
    }

    /// [`scale`] in every lane (see [`f16x8`]).
    #[inline(always)]
    pub(in crate::gguf) unsafe fn scale8<const K: u8>(p: *const u8) -> (__m256, __m256) {
        let d = f16x8(p);
        let m = match K {
            Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
            Q5_0 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
            Q4_1 | Q5_1 => f16x8(p.add(2)),
            _ => _mm256_setzero_ps(),
        };
        (d, m)
    }

    // The block formats, as const parameters (so that every kernel is specialised to one).
    pub(in crate::gguf) const Q4_0: u8 = 0;
    pub(in crate::gguf) const Q4_1: u8 = 1;
    pub(in crate::gguf) const Q5_0: u8 = 2;
    pub(in crate::gguf) const Q5_1: u8 = 3;
    pub(in crate::gguf) const Q8_0: u8 = 4;

    pub(in crate::gguf) fn kind(ty: super::GgmlType) -> u8 {
        use super::GgmlType as T;
        match ty {
            T::Q4_0 => Q4_0,
            T::Q4_1 => Q4_1,
            T::Q5_0 => Q5_0,
            T::Q5_1 => Q5_1,
            T::Q8_0 => Q8_0,
            _ => unreachable!("rows_dot checked the type"),
        }
    }

    /// Bytes per block.
    pub(in crate::gguf) const fn block_bytes(k: u8) -> usize {
        match k {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 34,
        }
    }

    /// `(d, m)` of the block at `p`: values are `d·q + m` (`m = -8d` / `-16d` for the
    /// symmetric types, exact in f32: a power of two times `d`).
    #[inline(always)]
    pub(in crate::gguf) unsafe fn scale<const K: u8>(p: *const u8) -> (f32, f32) {
        match K {
            Q4_0 => {
                let d = f16(p);
                (d, -8.0 * d)
            }
            Q5_0 => {
                let d = f16(p);
                (d, -16.0 * d)
            }
            Q4_1 | Q5_1 => (f16(p), f16(p.add(2))),
            _ => (f16(p), 0.0),
        }
    }

    /// Runs `$group::<M>` over the input rows in groups of at most `$max` (1..=8).
    macro_rules! for_dense_groups {
        ($group:ident, $max:expr, $w:expr, $cols:expr, $x:expr, $m:expr, $yt:expr) => {{
            let mut i0 = 0;
            while i0 < $m {
                let g = ($max).min($m - i0);
                let (xp, yp) = ($x.as_ptr().add(i0 * $cols), $yt.as_mut_ptr().add(i0));
                match g {
                    1 => $group::<1>($w, $cols, xp, $m, yp),
                    2 => $group::<2>($w, $cols, xp, $m, yp),
                    3 => $group::<3>($w, $cols, xp, $m, yp),
                    4 => $group::<4>($w, $cols, xp, $m, yp),
                    5 => $group::<5>($w, $cols, xp, $m, yp),
                    6 => $group::<6>($w, $cols, xp, $m, yp),
                    7 => $group::<7>($w, $cols, xp, $m, yp),
                    _ => $group::<8>($w, $cols, xp, $m, yp),
                }
                i0 += g;
            }
        }};
    }

    /// Runs `$group::<K, M>` over the input rows in groups of at most `$max` (1..=8), `K` the
    /// kind `$kind` among `$kinds`.
    macro_rules! for_groups {
        ($group:ident, $max:expr, $kind:expr, [$($k:ident),* ; $last:ident], $rows:expr, $cols:expr, $x:expr, $m:expr, $yt:expr) => {{
            macro_rules! by_kind {
                ($g:literal, $xp:expr, $yp:expr) => {
                    match $kind {
                        $($k => $group::<$k, $g>($rows, $cols, $xp, $m, $yp),)*
                        _ => $group::<$last, $g>($rows, $cols, $xp, $m, $yp),
                    }
                };
            }
            let mut i0 = 0;
            while i0 < $m {
                let g = ($max).min($m - i0);
                let (xp, yp) = ($x.as_ptr().add(i0 * $cols), $yt.as_mut_ptr().add(i0));
                match g {
                    1 => by_kind!(1, xp, yp),
                    2 => by_kind!(2, xp, yp),
                    3 => by_kind!(3, xp, yp),
                    4 => by_kind!(4, xp, yp),
                    5 => by_kind!(5, xp, yp),
                    6 => by_kind!(6, xp, yp),
                    7 => by_kind!(7, xp, yp),
                    _ => by_kind!(8, xp, yp),
                }
                i0 += g;
            }
        }};
    }

    // The K formats (256-value blocks read as 16 chunks of 16 values, each `s·q + o`).
    pub(in crate::gguf) const Q4K: u8 = 5;
    pub(in crate::gguf) const Q5K: u8 = 6;
    pub(in crate::gguf) const Q6K: u8 = 7;

    pub(in crate::gguf) fn kind_k(ty: super::GgmlType) -> u8 {
        use super::GgmlType as T;
        match ty {
            T::Q4K => Q4K,
            T::Q5K => Q5K,
            T::Q6K => Q6K,
            _ => unreachable!("rows_dot checked the type"),
        }
    }

    /// Bytes per 256-value block of a K format.
    pub(in crate::gguf) const fn k_block_bytes(k: u8) -> usize {
        match k {
            Q4K => 144,
            Q5K => 176,
            _ => 210,
        }
    }

    /// Scale and offset of each 16-value chunk of the K block at `p`: its values are
    /// `s[c]·q + o[c]` (Q4_K/Q5_K: `d·sc·q - dmin·mn` per 32 values; Q6_K: `d·sc·(q - 32)` per 16).
    #[inline(always)]
    pub(in crate::gguf) unsafe fn k_scales<const K: u8>(p: *const u8) -> ([f32; 16], [f32; 16]) {
        let (mut s, mut o) = ([0f32; 16], [0f32; 16]);
        if K == Q6K {
            let d = f16(p.add(208));
            for c in 0..16 {
                let sc = d * f32::from(*p.add(192 + c) as i8);
                (s[c], o[c]) = (sc, -32.0 * sc);
            }
        } else {
            let (d, dmin) = (f16(p), f16(p.add(2)));
            let (sc, mn) =
                super::super::quant::k_scales_mins(std::slice::from_raw_parts(p.add(4), 12));
            for sub in 0..8 {
                let (dl, ml) = (d * f32::from(sc[sub]), dmin * f32::from(mn[sub]));
                (s[2 * sub], s[2 * sub + 1]) = (dl, dl);
                (o[2 * sub], o[2 * sub + 1]) = (-ml, -ml);
            }
        }
        (s, o)
    }

    #[inline(always)]
    unsafe fn load16(p: *const u8, offset: usize) -> __m128i {
        _mm_loadu_si128(p.add(offset) as *const __m128i)
    }

    /// `v >> shift` in every byte of `v` (16-bit shifts; the caller masks the bits that came
    /// from the neighbouring byte).
    #[inline(always)]
    unsafe fn shift_bytes(v: __m128i, shift: usize) -> __m128i {
        _mm_srl_epi16(v, _mm_cvtsi32_si128(shift as i32))
    }

    /// The 16 quantized values (0..=63) of chunk `c` (values `16c..16c + 16`) of the K block at
    /// `p`, as bytes (the layouts of [`super::quant::decode_block`]).
    #[inline(always)]
    unsafe fn k_chunk<const K: u8>(p: *const u8, c: usize) -> __m128i {
        if K == Q6K {
            let (h, quarter, half) = (c / 8, (c % 8) / 2, c % 2);
            let lo = load16(p, h * 64 + 32 * (quarter % 2) + 16 * half);
            let lo = _mm_and_si128(shift_bytes(lo, 4 * (quarter / 2)), _mm_set1_epi8(0x0F));
            let hi = load16(p, 128 + h * 32 + 16 * half);
            let hi = _mm_and_si128(shift_bytes(hi, 2 * quarter), _mm_set1_epi8(0x03));
            _mm_or_si128(lo, _mm_slli_epi16(hi, 4))
        } else {
            let (sub, half) = (c / 2, c % 2);
            let qs = if K == Q5K { 48 } else { 16 };
            let q = load16(p, qs + (sub / 2) * 32 + 16 * half);
            let q = _mm_and_si128(shift_bytes(q, 4 * (sub % 2)), _mm_set1_epi8(0x0F));
            if K == Q5K {
                let qh = load16(p, 16 + 16 * half);
                let bit = _mm_and_si128(shift_bytes(qh, sub), _mm_set1_epi8(1));
                _mm_or_si128(q, _mm_slli_epi16(bit, 4))
            } else {
                q
            }
        }
    }

    #[cfg(feature = "avx512")]
    pub(super) mod v4 {
        use super::*;

        /// Input rows per pass: two accumulators each, 16 of the 32 registers.
        const GROUP: usize = 8;

        /// The f16 at `p` in all sixteen lanes (as [`f16x8`]).
        #[inline(always)]
        unsafe fn f16x16(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_set1_epi16(std::ptr::read_unaligned(p as *const i16)))
        }

        /// [`scale`] in every lane.
        #[inline(always)]
        unsafe fn scale16<const K: u8>(p: *const u8) -> (__m512, __m512) {
            let d = f16x16(p);
            let m = match K {
                Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
                Q5_0 => _mm512_mul_ps(d, _mm512_set1_ps(-16.0)),
                Q4_1 | Q5_1 => f16x16(p.add(2)),
                _ => _mm512_setzero_ps(),
            };
            (d, m)
        }

        /// The 32 values of the block at `p` as two vectors (elements 0..16, 16..32).
        #[inline(always)]
        unsafe fn decode<const K: u8>(p: *const u8) -> (__m512, __m512) {
            let (d, m) = scale16::<K>(p);
            let (lo, hi) = if K == Q8_0 {
                let a = _mm_loadu_si128(p.add(2) as *const __m128i);
                let b = _mm_loadu_si128(p.add(18) as *const __m128i);
                (_mm512_cvtepi8_epi32(a), _mm512_cvtepi8_epi32(b))
            } else {
                let off = match K {
                    Q4_0 => 2,
                    Q4_1 => 4,
                    Q5_0 => 6,
                    _ => 8,
                };
                let q = _mm_loadu_si128(p.add(off) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, mask));
                let hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
                if K == Q5_0 || K == Q5_1 {
                    let hoff = if K == Q5_0 { 2 } else { 4 };
                    let qh = std::ptr::read_unaligned(p.add(hoff) as *const u32);
                    let sixteen = _mm512_set1_epi32(16);
                    (
                        _mm512_mask_or_epi32(lo, (qh & 0xFFFF) as __mmask16, lo, sixteen),
                        _mm512_mask_or_epi32(hi, (qh >> 16) as __mmask16, hi, sixteen),
                    )
                } else {
                    (lo, hi)
                }
            };
            (
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m),
            )
        }

        #[inline(always)]
        unsafe fn group<const K: u8, const M: usize>(
            rows: &[u8],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let bb = block_bytes(K);
            let nb = cols / 32;
            for (r, row) in rows.chunks_exact(nb * bb).enumerate() {
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                let p = row.as_ptr();
                for b in 0..nb {
                    if M == 1 {
                        prefetch_ahead::<1>(p.add(b * bb));
                    }
                    let (w0, w1) = decode::<K>(p.add(b * bb));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xp = x.add(i * cols + b * 32);
                        acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0]);
                        acc[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[1]);
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    *yt.add(r * m + i) = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
                }
            }
        }

        #[inline(always)]
        unsafe fn dense_group<const M: usize>(
            w: &[f32],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let full = cols / 32 * 32;
            for (r, row) in w.chunks_exact(cols).enumerate() {
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                let p = row.as_ptr();
                let mut k = 0;
                while k < full {
                    if M == 1 {
                        prefetch_ahead::<2>(p.add(k) as *const u8);
                    }
                    let (w0, w1) = (_mm512_loadu_ps(p.add(k)), _mm512_loadu_ps(p.add(k + 16)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xp = x.add(i * cols + k);
                        acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0]);
                        acc[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[1]);
                    }
                    k += 32;
                }
                for (i, acc) in acc.iter().enumerate() {
                    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
                    for (k, w) in (full..cols).zip(&row[full..cols]) {
                        sum += w * *x.add(i * cols + k);
                    }
                    *yt.add(r * m + i) = sum;
                }
            }
        }

        /// [`group`] for the K formats: each 16-value chunk decoded into one register.
        #[inline(always)]
        unsafe fn group_k<const K: u8, const M: usize>(
            rows: &[u8],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let bb = k_block_bytes(K);
            let nb = cols / 256;
            for (r, row) in rows.chunks_exact(nb * bb).enumerate() {
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                for b in 0..nb {
                    let p = row.as_ptr().add(b * bb);
                    if M == 1 {
                        for line in 0..bb.div_ceil(64) {
                            prefetch_ahead::<1>(p.add(64 * line));
                        }
                    }
                    let (s, o) = k_scales::<K>(p);
                    for c in 0..16 {
                        let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(k_chunk::<K>(p, c)));
                        let w = _mm512_fmadd_ps(q, _mm512_set1_ps(s[c]), _mm512_set1_ps(o[c]));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let xp = x.add(i * cols + b * 256 + 16 * c);
                            acc[c & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp), acc[c & 1]);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    *yt.add(r * m + i) = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_dot_k(
            ty: super::super::GgmlType,
            rows: &[u8],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_groups!(
                group_k,
                GROUP,
                kind_k(ty),
                [Q4K, Q5K; Q6K],
                rows,
                cols,
                x,
                m,
                yt
            )
        }

        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(in super::super) unsafe fn dense_rows_dot(
            w: &[f32],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_dense_groups!(dense_group, GROUP, w, cols, x, m, yt)
        }

        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_dot(
            ty: super::super::GgmlType,
            rows: &[u8],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_groups!(
                group,
                GROUP,
                kind(ty),
                [Q4_0, Q4_1, Q5_0, Q5_1; Q8_0],
                rows,
                cols,
                x,
                m,
                yt
            )
        }
    }

    pub(super) mod v3 {
        use super::*;

        /// Input rows per pass: two accumulators each, 8 of the 16 registers.
        const GROUP: usize = 4;

        /// The high bit (16) of eight values from eight bits of `qh` (bit `j` for value `j`).
        #[inline(always)]
        unsafe fn high_bits(qh: u32) -> __m256i {
            let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            let bits = _mm256_and_si256(_mm256_set1_epi32(qh as i32), sel);
            _mm256_and_si256(_mm256_cmpeq_epi32(bits, sel), _mm256_set1_epi32(16))
        }

        /// The 32 values of the block at `p` as four vectors of eight.
        #[inline(always)]
        unsafe fn decode<const K: u8>(p: *const u8) -> [__m256; 4] {
            let (d, m) = scale8::<K>(p);
            let q: [__m256i; 4] = if K == Q8_0 {
                [0, 8, 16, 24]
                    .map(|o| _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + o) as *const __m128i)))
            } else {
                let off = match K {
                    Q4_0 => 2,
                    Q4_1 => 4,
                    Q5_0 => 6,
                    _ => 8,
                };
                let q = _mm_loadu_si128(p.add(off) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let mut v = [
                    _mm256_cvtepu8_epi32(lo),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                    _mm256_cvtepu8_epi32(hi),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
                ];
                if K == Q5_0 || K == Q5_1 {
                    let hoff = if K == Q5_0 { 2 } else { 4 };
                    let qh = std::ptr::read_unaligned(p.add(hoff) as *const u32);
                    for (k, v) in v.iter_mut().enumerate() {
                        *v = _mm256_or_si256(*v, high_bits(qh >> (8 * k)));
                    }
                }
                v
            };
            q.map(|q| _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m))
        }

        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        #[inline(always)]
        unsafe fn group<const K: u8, const M: usize>(
            rows: &[u8],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let bb = block_bytes(K);
            let nb = cols / 32;
            for (r, row) in rows.chunks_exact(nb * bb).enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                let p = row.as_ptr();
                for b in 0..nb {
                    if M == 1 {
                        super::prefetch_ahead::<1>(p.add(b * bb));
                    }
                    let w = decode::<K>(p.add(b * bb));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xp = x.add(i * cols + b * 32);
                        for (k, w) in w.iter().enumerate() {
                            acc[k & 1] =
                                _mm256_fmadd_ps(*w, _mm256_loadu_ps(xp.add(8 * k)), acc[k & 1]);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    *yt.add(r * m + i) = hsum(_mm256_add_ps(acc[0], acc[1]));
                }
            }
        }

        #[inline(always)]
        unsafe fn dense_group<const M: usize>(
            w: &[f32],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let full = cols / 16 * 16;
            for (r, row) in w.chunks_exact(cols).enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                let p = row.as_ptr();
                let mut k = 0;
                while k < full {
                    if M == 1 {
                        prefetch_ahead::<1>(p.add(k) as *const u8);
                    }
                    let (w0, w1) = (_mm256_loadu_ps(p.add(k)), _mm256_loadu_ps(p.add(k + 8)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xp = x.add(i * cols + k);
                        acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[0]);
                        acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[1]);
                    }
                    k += 16;
                }
                for (i, acc) in acc.iter().enumerate() {
                    let mut sum = hsum(_mm256_add_ps(acc[0], acc[1]));
                    for (k, w) in (full..cols).zip(&row[full..cols]) {
                        sum += w * *x.add(i * cols + k);
                    }
                    *yt.add(r * m + i) = sum;
                }
            }
        }

        /// [`group`] for the K formats: each 16-value chunk decoded into two registers.
        #[inline(always)]
        unsafe fn group_k<const K: u8, const M: usize>(
            rows: &[u8],
            cols: usize,
            x: *const f32,
            m: usize,
            yt: *mut f32,
        ) {
            let bb = k_block_bytes(K);
            let nb = cols / 256;
            for (r, row) in rows.chunks_exact(nb * bb).enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                for b in 0..nb {
                    let p = row.as_ptr().add(b * bb);
                    if M == 1 {
                        for line in 0..bb.div_ceil(64) {
                            super::prefetch_ahead::<1>(p.add(64 * line));
                        }
                    }
                    let (s, o) = k_scales::<K>(p);
                    for c in 0..16 {
                        let q = k_chunk::<K>(p, c);
                        let (sc, off) = (_mm256_set1_ps(s[c]), _mm256_set1_ps(o[c]));
                        let w = [q, _mm_srli_si128(q, 8)].map(|q| {
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), sc, off)
                        });
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let xp = x.add(i * cols + b * 256 + 16 * c);
                            acc[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xp), acc[0]);
                            acc[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), acc[1]);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    *yt.add(r * m + i) = hsum(_mm256_add_ps(acc[0], acc[1]));
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_dot_k(
            ty: super::super::GgmlType,
            rows: &[u8],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_groups!(
                group_k,
                GROUP,
                kind_k(ty),
                [Q4K, Q5K; Q6K],
                rows,
                cols,
                x,
                m,
                yt
            )
        }

        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn dense_rows_dot(
            w: &[f32],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_dense_groups!(dense_group, GROUP, w, cols, x, m, yt)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_dot(
            ty: super::super::GgmlType,
            rows: &[u8],
            cols: usize,
            x: &[f32],
            m: usize,
            yt: &mut [f32],
        ) {
            for_groups!(
                group,
                GROUP,
                kind(ty),
                [Q4_0, Q4_1, Q5_0, Q5_1; Q8_0],
                rows,
                cols,
                x,
                m,
                yt
            )
        }
    }
}

/// [`rows_dot`] for the 16-bit floats (F16, BF16) when `cols` is a multiple of 32: each row is
/// read 32 values at a time, converted exactly to f32 in registers and multiplied into every
/// input row. `false` (nothing written) for other types, widths and CPUs.
pub(crate) fn half_rows_dot(
    ty: GgmlType,
    rows: &[u8],
    cols: usize,
    x: &[f32],
    m: usize,
    yt: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = match ty {
            GgmlType::F16 => false,
            GgmlType::BF16 => true,
            _ => return false,
        };
        if !cols.is_multiple_of(32) {
            return false;
        }
        assert!(
            rows.len().is_multiple_of(2 * cols) && x.len() >= m * cols,
            "half_rows_dot: shapes"
        );
        assert!(
            yt.len() >= rows.len() / (2 * cols) * m,
            "half_rows_dot: output"
        );
        // One input row (decoding one sequence) takes the 256-bit kernel even where AVX-512
        // is present: on Zen 4 it decoded SmolLM2 F16 at 100.4 vs 96.9 tokens/s (medians of six
        // alternated pairs), while with four rows the 512-bit kernel is ahead (208 vs 187).
        #[cfg(feature = "avx512")]
        if m > 1
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features; the slices hold the shapes checked above.
            unsafe { half::v4(bf16, rows, cols, x, m, yt) };
            return true;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: as above.
            unsafe { half::v3(bf16, rows, cols, x, m, yt) };
            return true;
        }
        false
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ty, rows, cols, x, m, yt);
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod half {
    use std::arch::x86_64::*;

    /// Input rows per pass at most.
    const GROUP: usize = 4;

    /// Sixteen F16 or BF16 values at `p` as f32 (exact).
    #[cfg(feature = "avx512")]
    #[inline(always)]
    pub(in crate::gguf) unsafe fn load16_v4<const BF16: bool>(p: *const u8) -> __m512 {
        let q = _mm256_loadu_si256(p as *const __m256i);
        if BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(q), 16))
        } else {
            _mm512_cvtph_ps(q)
        }
    }

    #[cfg(feature = "avx512")]
    #[inline(always)]
    unsafe fn group_v4<const BF16: bool, const M: usize>(
        rows: &[u8],
        cols: usize,
        x: *const f32,
        m: usize,
        yt: *mut f32,
    ) {
        for (r, row) in rows.chunks_exact(2 * cols).enumerate() {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            let p = row.as_ptr();
            for k in (0..cols).step_by(32) {
                if M == 1 {
                    super::x86::prefetch_ahead::<1>(p.add(2 * k));
                }
                let w0 = load16_v4::<BF16>(p.add(2 * k));
                let w1 = load16_v4::<BF16>(p.add(2 * k + 32));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xp = x.add(i * cols + k);
                    acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0]);
                    acc[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[1]);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                *yt.add(r * m + i) = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
            }
        }
    }

    #[cfg(feature = "avx512")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn run_v4<const BF16: bool>(
        rows: &[u8],
        cols: usize,
        x: &[f32],
        m: usize,
        yt: &mut [f32],
    ) {
        let mut i0 = 0;
        while i0 < m {
            let g = GROUP.min(m - i0);
            let (xp, yp) = (x.as_ptr().add(i0 * cols), yt.as_mut_ptr().add(i0));
            match g {
                1 => group_v4::<BF16, 1>(rows, cols, xp, m, yp),
                2 => group_v4::<BF16, 2>(rows, cols, xp, m, yp),
                3 => group_v4::<BF16, 3>(rows, cols, xp, m, yp),
                _ => group_v4::<BF16, 4>(rows, cols, xp, m, yp),
            }
            i0 += g;
        }
    }

    #[cfg(feature = "avx512")]
    pub(super) unsafe fn v4(
        bf16: bool,
        rows: &[u8],
        cols: usize,
        x: &[f32],
        m: usize,
        yt: &mut [f32],
    ) {
        if bf16 {
            run_v4::<true>(rows, cols, x, m, yt)
        } else {
            run_v4::<false>(rows, cols, x, m, yt)
        }
    }

    /// Eight F16 or BF16 values at `p` as f32 (exact).
    #[inline(always)]
    pub(in crate::gguf) unsafe fn load8_v3<const BF16: bool>(p: *const u8) -> __m256 {
        let q = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(q), 16))
        } else {
            _mm256_cvtph_ps(q)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn group_v3<const BF16: bool, const M: usize>(
        rows: &[u8],
        cols: usize,
        x: *const f32,
        m: usize,
        yt: *mut f32,
    ) {
        for (r, row) in rows.chunks_exact(2 * cols).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            let p = row.as_ptr();
            for k in (0..cols).step_by(16) {
                if M == 1 && k % 32 == 0 {
                    super::x86::prefetch_ahead::<1>(p.add(2 * k));
                }
                let w0 = load8_v3::<BF16>(p.add(2 * k));
                let w1 = load8_v3::<BF16>(p.add(2 * k + 16));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xp = x.add(i * cols + k);
                    acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[0]);
                    acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc[1]);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                *yt.add(r * m + i) = hsum(_mm256_add_ps(acc[0], acc[1]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_v3<const BF16: bool>(
        rows: &[u8],
        cols: usize,
        x: &[f32],
        m: usize,
        yt: &mut [f32],
    ) {
        let mut i0 = 0;
        while i0 < m {
            let g = GROUP.min(m - i0);
            let (xp, yp) = (x.as_ptr().add(i0 * cols), yt.as_mut_ptr().add(i0));
            match g {
                1 => group_v3::<BF16, 1>(rows, cols, xp, m, yp),
                2 => group_v3::<BF16, 2>(rows, cols, xp, m, yp),
                3 => group_v3::<BF16, 3>(rows, cols, xp, m, yp),
                _ => group_v3::<BF16, 4>(rows, cols, xp, m, yp),
            }
            i0 += g;
        }
    }

    pub(super) unsafe fn v3(
        bf16: bool,
        rows: &[u8],
        cols: usize,
        x: &[f32],
        m: usize,
        yt: &mut [f32],
    ) {
        if bf16 {
            run_v3::<true>(rows, cols, x, m, yt)
        } else {
            run_v3::<false>(rows, cols, x, m, yt)
        }
    }
}
