//! The frozen weights' forward products `x Wᵀ` on AVX2 + FMA CPUs (no AVX-512), with a 6 × 16
//! register tile of hone's own.
//!
//! On the AVX2 path the gemm crate's f32 products ran at 172–192 GFLOP/s on the training step's
//! `x Wᵀ` shapes of a 2-core Xeon (its `linear_nt` also transposes `W` through memory first),
//! where PyTorch's BLAS held to AVX2 reached 203–224 on the same products in the same minutes
//! (`examples/kernel_times.rs`, `scripts/bench_matmul_pytorch.py`), and products are ~89% of
//! hone's AVX2 training step. The tile is the one BLIS and OpenBLAS use on Haswell and later:
//! six token rows broadcast one value at a time against two 8-float vectors of sixteen output
//! features, twelve accumulators; one step of the summed index = 2 vector loads, 6 broadcasts
//! and 12 FMAs (alone in L1 it runs at 96% of the register-only FMA rate).
//!
//! Loops, outermost first (in [`run`]): the tokens, split between the threads; blocks of at
//! most [`kc`] summed values; blocks of at most [`MC`] tokens, copied into strips of six
//! interleaved rows (`[kc][6]`, in L2); the weight's sixteen-feature panels, each transposed
//! by the thread into its own buffer (`[kc][16]`, 32 KiB, in L1) just before the block's strips
//! run over it; six-token strips. The packed weight never goes through memory: packing the
//! whole weight first, as gemm does, wrote and re-read it every call (~5% of a product).
//!
//! The input gradient `g W` ([`linear_nn`]) runs on the same tile, its panels copied from `W`'s
//! rows with the next panel's lines fetched ahead (without that fetch it ran at gemm's rate).

use rayon::prelude::*;

use super::cpu::Shared;

/// Token rows per tile.
const MR: usize = 6;
/// Output features per tile (two 8-float vectors).
const NR: usize = 16;
/// Summed values per block, at most, for a 48 KiB L1 data cache: a panel of 512 × 16 floats
/// (32 KiB) stays in L1 beside the strip streaming through (640 was no faster, 768 and 256
/// slower). See [`kc`] for other L1 sizes.
const KC: usize = 512;

/// The depth block for this CPU: panels of about two thirds of its L1 data cache ([`KC`] on a
/// 48 KiB one; 320 on the 32 KiB L1 of AMD Zen 2-4 and Intel before Ice Lake, where a 512-value
/// panel would fill all of it), read from Linux's sysfs; 48 KiB where that is not readable.
fn kc() -> usize {
    static KC_FOR_CPU: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KC_FOR_CPU.get_or_init(|| {
        let l1 = l1d_bytes().unwrap_or(48 << 10);
        (l1 * 2 / 3 / (NR * std::mem::size_of::<f32>()) / 64 * 64).clamp(128, KC)
    })
}

/// The L1 data cache of CPU 0 in bytes, from `/sys/devices/system/cpu/cpu0/cache`.
fn l1d_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.flatten().find_map(|entry| {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        if read("level")?.trim() != "1" || read("type")?.trim() != "Data" {
            return None;
        }
        let size = read("size")?;
        let size = size.trim();
        let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = digits.parse().ok()?;
        match unit {
            "K" => Some(n << 10),
            "M" => Some(n << 20),
            _ => None,
        }
    })
}

/// Tokens per block of a thread, at most (96 strips): `MC × KC` floats (1.1 MiB) in L2, so a
/// 1,024-token step is one block per thread and each panel is packed once per thread.
const MC: usize = 96 * MR;

/// Products of at most this many panels (384 features) read their token rows in place instead
/// of interleaving them into strips (see [`run`]).
const IN_PLACE_PANELS: usize = 24;

/// Whether this machine takes these kernels: AVX2 and FMA, and not the AVX-512 path (where
/// gemm's 64 × 6 kernel runs at the rate of PyTorch's BLAS).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu::isa() == "avx2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU can run these kernels at all (AVX2 and FMA), whichever path it takes.
pub fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y [m, n] = x [m, k] · wᵀ` for a row-major `w` `[n, k]`. Panics on a CPU without AVX2 and
/// FMA ([`cpu_has_avx2_fma`]; hone's kernels call it where [`available`] holds).
pub fn linear_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(m * n);
    linear_nt_into(x, w, m, n, k, &mut y.spare_capacity_mut()[..m * n]);
    // SAFETY: linear_nt_into wrote all m × n values.
    unsafe { y.set_len(m * n) };
    y
}

/// [`linear_nt`] into `y` (`m × n` values, each written, none read). Panics on a CPU without
/// AVX2 and FMA.
pub fn linear_nt_into(
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(
        cpu_has_avx2_fma(),
        "fma::linear_nt needs a CPU with AVX2 and FMA"
    );
    assert!(
        x.len() >= m * k && w.len() >= n * k && y.len() >= m * n,
        "fma::linear_nt: buffers smaller than [{m}, {k}] · [{n}, {k}]ᵀ = [{m}, {n}]"
    );
    if k == 0 {
        y[..m * n].fill(std::mem::MaybeUninit::new(0.0));
        return;
    }
    // Panel of features f0.., summed values k0..k0 + kc: w's rows f0.. transposed.
    let fill = |panel: &mut [f32], (f0, features): (usize, usize), k0: usize, kc: usize| {
        #[cfg(target_arch = "x86_64")]
        if features == NR {
            // SAFETY: AVX2 is present (asserted above); rows f0..f0 + 16 of w hold
            // values k0..k0 + kc; the panel holds kc × 16.
            unsafe { transpose16(&w[f0 * k..(f0 + NR) * k], k, k0, kc, panel) };
            return;
        }
        for (d, line) in panel[..kc * NR].chunks_exact_mut(NR).enumerate() {
            for (f, v) in line.iter_mut().enumerate() {
                *v = if f < features {
                    w[(f0 + f) * k + k0 + d]
                } else {
                    0.0
                };
            }
        }
    };
    run(x, m, n, k, fill, Shared(y.as_mut_ptr().cast()));
}

/// `dx [m, k] = g [m, n] · w` for a row-major `w` `[n, k]` (the input gradient of
/// [`linear_nt`]). Panics on a CPU without AVX2 and FMA.
///
/// The same tile and loops as [`linear_nt`], summing over `w`'s rows: a panel's line `d` is
/// sixteen consecutive values of row `k0 + d`, copied as they are. Those lines lie a whole row
/// apart (2.3-6 KiB on the smol shapes), a stride the hardware prefetchers do not follow, so
/// filling a panel fetches the line of the next panel from the same row too: in a smol training
/// step (AVX2 build, this Xeon) that took the input gradients from 186-189 GFLOP/s on gemm (and
/// on this tile without the fetch) to 195-197.
pub fn linear_nn(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(
        cpu_has_avx2_fma(),
        "fma::linear_nn needs a CPU with AVX2 and FMA"
    );
    assert!(
        g.len() >= m * n && w.len() >= n * k,
        "fma::linear_nn: buffers smaller than [{m}, {n}] · [{n}, {k}]"
    );
    let mut dx = Vec::with_capacity(m * k);
    if n == 0 {
        dx.resize(m * k, 0.0);
        return dx;
    }
    let fill = |panel: &mut [f32], (f0, features): (usize, usize), k0: usize, kc: usize| {
        let next = f0 + features;
        for (d, line) in panel[..kc * NR].chunks_exact_mut(NR).enumerate() {
            let row = &w[(k0 + d) * k..(k0 + d + 1) * k];
            #[cfg(target_arch = "x86_64")]
            if next < k {
                // SAFETY: `next` is inside the row; a prefetch reads nothing.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().add(next).cast());
                }
            }
            if features == NR {
                // A fixed-size copy (two vector moves), not a call to memmove per line: the
                // calls were ~1.7% of a smol training step on the AVX2 path (Zen 4).
                let line: &mut [f32; NR] = line.try_into().expect("panel lines are NR long");
                *line = row[f0..next].try_into().expect("NR features");
            } else {
                line[..features].copy_from_slice(&row[f0..next]);
                line[features..].fill(0.0);
            }
        }
    };
    run(
        g,
        m,
        k,
        n,
        fill,
        Shared(dx.spare_capacity_mut().as_mut_ptr().cast()),
    );
    // SAFETY: run wrote all m × k values.
    unsafe { dx.set_len(m * k) };
    dx
}

/// A matrix read where it lies: element `(i, d)` at `ptr + i·rs + d·ds`.
#[derive(Clone, Copy)]
pub struct InPlace {
    pub ptr: *const f32,
    pub rs: usize,
    pub ds: usize,
}

/// `c[i·ldc + j] = scale · Σ_d a(i, d) · b[d·ldb + j]` (`+=` with `accumulate`) for `i < m`,
/// `j < n`, `d < depth`, on this thread, with nothing packed: the 6 × 16 register tile reads
/// `a` where it lies (six broadcasts per summed value, any strides) and sixteen consecutive
/// values of each of `b`'s rows (masked loads for the last, narrower column block). For the
/// small products whose operands sit in L1/L2 already: attention's blocks (depth the head width
/// or the block's keys), where gemm packs both sides every call. In a smol training step (AVX2
/// build, this Xeon) attention ran 2-5% faster on it; LoRA's rank-r products did not (they are
/// bound by memory, not by the products), so they stay on gemm.
///
/// # Safety
/// The CPU has AVX2 and FMA; every `a(i, d)`, `b[d·ldb + j]` and `c[i·ldc + j]` named above is
/// valid, and `c`'s are not read or written elsewhere during the call.
#[cfg(target_arch = "x86_64")]
pub unsafe fn product_in_place(
    (m, n, depth): (usize, usize, usize),
    a: InPlace,
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
    scale: f32,
    accumulate: bool,
) {
    debug_assert!(cpu_has_avx2_fma());
    for j0 in (0..n).step_by(NR) {
        let features = NR.min(n - j0);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            let at = InPlace {
                ptr: a.ptr.add(i0 * a.rs),
                ..a
            };
            let tile = (c.add(i0 * ldc + j0), ldc, rows, features);
            if features == NR {
                tile_in_place::<true>(depth, at, (b.add(j0), ldb), tile, scale, accumulate);
            } else {
                tile_in_place::<false>(depth, at, (b.add(j0), ldb), tile, scale, accumulate);
            }
        }
    }
}

/// One tile of [`product_in_place`]: `rows ≤ 6` rows (the missing ones read row 0 again, their
/// results not stored) by `features ≤ 16` columns (`FULL`: all sixteen, plain loads and stores;
/// else masked ones, nothing past `features` read or written).
///
/// # Safety
/// As [`product_in_place`] for this tile's rows and columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_in_place<const FULL: bool>(
    depth: usize,
    a: InPlace,
    (b, ldb): (*const f32, usize),
    (c, ldc, rows, features): (*mut f32, usize, usize, usize),
    scale: f32,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(features as i32), lane);
    let mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(features as i32 - 8), lane);
    let row: [*const f32; MR] = std::array::from_fn(|r| a.ptr.add(r.min(rows - 1) * a.rs));
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for d in 0..depth {
        let line = b.add(d * ldb);
        let (b0, b1) = if FULL {
            (_mm256_loadu_ps(line), _mm256_loadu_ps(line.add(8)))
        } else {
            (
                _mm256_maskload_ps(line, mask0),
                _mm256_maskload_ps(line.add(8), mask1),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*row[r].add(d * a.ds));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    let s = _mm256_set1_ps(scale);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let out = c.add(r * ldc);
        let (mut v0, mut v1) = (_mm256_mul_ps(acc[0], s), _mm256_mul_ps(acc[1], s));
        if FULL {
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out.add(8)));
            }
            _mm256_storeu_ps(out, v0);
            _mm256_storeu_ps(out.add(8), v1);
        } else {
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_maskload_ps(out, mask0));
                v1 = _mm256_add_ps(v1, _mm256_maskload_ps(out.add(8), mask1));
            }
            _mm256_maskstore_ps(out, mask0, v0);
            _mm256_maskstore_ps(out.add(8), mask1, v1);
        }
    }
}

/// `panel [kc][16] = rows[0..16][k0..k0 + kc]ᵀ` for 16 rows of stride `ld`: 8 × 8 blocks
/// transposed in registers (the F32 prefill's `store_transposed8`), the last `kc % 8` values
/// one at a time.
///
/// # Safety
/// The CPU has AVX2; `rows` holds 16 rows of `ld` values with `k0 + kc ≤ ld`; `panel` holds
/// `kc × 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose16(rows: &[f32], ld: usize, k0: usize, kc: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(rows.len() >= 15 * ld + k0 + kc && panel.len() >= kc * NR);
    let (src, dst) = (rows.as_ptr(), panel.as_mut_ptr());
    let full = kc / 8 * 8;
    for d0 in (0..full).step_by(8) {
        for half in 0..2 {
            let base = src.add(half * 8 * ld + k0 + d0);
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(base.add(i * ld)));
            // Column j of the block (value d0 + j of the eight rows) to features half·8.. of
            // the panel's line d0 + j.
            crate::gguf::matmul::store_transposed8(r, dst, NR, half * 8, d0);
        }
    }
    for d in full..kc {
        for f in 0..NR {
            *dst.add(d * NR + f) = *src.add(f * ld + k0 + d);
        }
    }
}

thread_local! {
    /// Each thread's token strips and weight panel, kept between products: allocating and
    /// zeroing 1.2 MiB per call was ~8% of the 1.2 ms k/v projection of the smol shape.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f(strips, panel)` on this thread's scratch: two 64-byte-aligned buffers of `strips` and
/// `panel` floats (contents left from earlier calls: the caller writes before it reads).
fn with_scratch<R>(strips: usize, panel: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| {
        // Panel first, rounded up to whole lines so the strips start on a line too.
        let panel_len = panel.div_ceil(16) * 16;
        let need = panel_len + strips + 16;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let skew = buf.as_ptr().align_offset(64).min(15);
        let (panel_buf, strips_buf) = buf[skew..skew + panel_len + strips].split_at_mut(panel_len);
        f(strips_buf, &mut panel_buf[..panel])
    })
}

/// `out [m, n] = a [m, depth] · B` for a `B [depth, n]` that `fill(panel, (f0, features), k0,
/// kc)` packs one panel at a time (`panel [kc][16]` = B's rows k0..k0 + kc, columns f0..f0 +
/// features, zero past them); `out` has room for `m × n` values (all written). `depth` is not
/// 0.
///
/// The panels start where `out`'s rows cross a 64-byte line (a first, narrower panel up to
/// there) when every row starts at the same place in its line (`n` a multiple of 16): a tile's
/// sixteen outputs per row are then one line, not two halves of two (the caller's buffer is
/// only 16-byte aligned; stores across lines made the products 5-10% slower). Each thread
/// writes its own tokens' rows of `out`.
fn run(
    a: &[f32],
    m: usize,
    n: usize,
    depth: usize,
    fill: impl Fn(&mut [f32], (usize, usize), usize, usize) + Sync,
    out: Shared,
) {
    if m == 0 || n == 0 {
        return;
    }
    let lead = if n.is_multiple_of(NR) {
        (NR - (out.0 as usize / std::mem::size_of::<f32>()) % NR) % NR
    } else {
        0
    };
    let panels: Vec<(usize, usize)> = (lead > 0)
        .then_some((0, lead))
        .into_iter()
        .chain((lead..n).step_by(NR).map(|f0| (f0, NR.min(n - f0))))
        .collect();
    let threads = rayon::current_num_threads().clamp(1, m.div_ceil(MR));
    let per = m.div_ceil(MR).div_ceil(threads) * MR;
    // Depth blocks of equal size (a 576-value depth is two of 288, not 512 and 64).
    let kc_max = depth.div_ceil(depth.div_ceil(kc()));
    // Few panels (a narrow product, such as the smol shape's 192-feature k and v projections):
    // each token block runs over so few of them that interleaving its strips first cost more
    // than the tile gains from them; the tile reads the rows where they are (k/v 1.03-1.08x
    // gemm in place, 1.00-1.05x interleaved). Many panels (q 36, gate 96, the output
    // projection 2,000): interleaved (output projections 1.21-1.26x against 1.13-1.15x).
    let in_place = panels.len() <= IN_PLACE_PANELS;
    (0..threads).into_par_iter().for_each(|t| {
        #[allow(clippy::redundant_locals)]
        let out = out; // the whole wrapper (Send), not its raw pointer field
        let (t0, t1) = ((t * per).min(m), ((t + 1) * per).min(m));
        if t0 == t1 {
            return;
        }
        let mc_max = MC.min((t1 - t0).div_ceil(MR) * MR);
        // Two floats past the last strip: `interleave`'s stores overrun a line by two.
        with_scratch(mc_max * kc_max + 2, kc_max * NR, |strips, panel| {
            for k0 in (0..depth).step_by(kc_max) {
                let kc = kc_max.min(depth - k0);
                for i0 in (t0..t1).step_by(mc_max) {
                    let i1 = (i0 + mc_max).min(t1);
                    // Strip s, step d, row r at strips[(s·kc + d)·6 + r] (rows past i1 repeat
                    // the strip's first row; their results are not stored).
                    for (s, i) in (i0..i1).step_by(MR).enumerate() {
                        let rows = MR.min(i1 - i);
                        if in_place {
                            if rows == MR {
                                continue;
                            }
                            // The last, partial strip: its rows copied as rows ([6][kc]).
                            let strip = &mut strips[..kc * MR];
                            for r in 0..MR {
                                let row = if r < rows { i + r } else { i };
                                strip[r * kc..(r + 1) * kc]
                                    .copy_from_slice(&a[row * depth + k0..][..kc]);
                            }
                            continue;
                        }
                        let src: [&[f32]; MR] = std::array::from_fn(|r| {
                            let row = if r < rows { i + r } else { i };
                            &a[row * depth + k0..][..kc]
                        });
                        interleave(src, &mut strips[s * kc * MR..]);
                    }
                    for &(f0, features) in &panels {
                        fill(panel, (f0, features), k0, kc);
                        for (s, i) in (i0..i1).step_by(MR).enumerate() {
                            let rows = MR.min(i1 - i);
                            // SAFETY: the strip holds kc × 6 values, the panel kc × 16; the tile
                            // writes rows i.. (this thread's) at columns f0..f0 + features of
                            // `out` [m, n], whose first depth block (accumulate false) writes
                            // every element before a later block reads it.
                            unsafe {
                                tile(
                                    kc,
                                    if !in_place {
                                        (strips[s * kc * MR..].as_ptr(), 0)
                                    } else if rows == MR {
                                        (a.as_ptr().add(i * depth + k0), depth)
                                    } else {
                                        (strips.as_ptr(), kc)
                                    },
                                    &panel[..kc * NR],
                                    (out.at(i * n + f0), n, rows, features),
                                    k0 > 0,
                                )
                            }
                        }
                    }
                }
            }
        });
    });
}

/// `strip[d·6 + r] = rows[r][d]`: six token rows interleaved into a strip (`[kc][6]`, `kc` the
/// rows' length). The strip holds two floats more than `kc × 6`, which the last line's store
/// overwrites (what lies there is written after this strip, or not read).
///
/// Eight values of the six rows at a time, transposed in registers (two copies of row 0 for
/// the 8 × 8 block) and stored as eight eight-float lines six floats apart, each line's last
/// two overwritten by the next. One value at a time, a strided scalar store each, this copy
/// was 5-6% of a smol training step on the AVX2 path (Zen 4).
fn interleave(rows: [&[f32]; MR], strip: &mut [f32]) {
    let kc = rows[0].len();
    debug_assert!(rows.iter().all(|r| r.len() == kc));
    assert!(strip.len() >= kc * MR + 2, "interleave: strip too short");
    let mut full = 0;
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx2_fma() {
        full = kc / 8 * 8;
        // SAFETY: AVX2 is present; the lengths are as asserted above.
        unsafe { interleave_avx2(&rows, full, strip) };
    }
    for d in full..kc {
        for (r, row) in rows.iter().enumerate() {
            strip[d * MR + r] = row[d];
        }
    }
}

/// [`interleave`]'s first `full` values of each row (a multiple of 8).
///
/// # Safety
/// The CPU has AVX2; each row holds `full` values or more; the strip `full × 6 + 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn interleave_avx2(rows: &[&[f32]; MR], full: usize, strip: &mut [f32]) {
    use std::arch::x86_64::_mm256_loadu_ps;
    debug_assert!(full.is_multiple_of(8) && strip.len() >= full * MR + 2);
    for d0 in (0..full).step_by(8) {
        // Rows 6 and 7 of the 8 × 8 block repeat row 0: their values land in each line's last
        // two floats, which the next line's store overwrites (the last line's: past the strip's
        // values, where the caller left room).
        let r: [_; 8] = std::array::from_fn(|i| {
            _mm256_loadu_ps(rows[if i < MR { i } else { 0 }].as_ptr().add(d0))
        });
        crate::gguf::matmul::store_transposed8(r, strip.as_mut_ptr(), MR, 0, d0);
    }
}

/// One 6 × 16 tile: `c[r][f] (+)= Σ_d a[r][d] · b[d][f]` for six token rows `a` (`lda` 0: a
/// strip of six interleaved rows, `[kc][6]`; else six rows `lda` apart), of which the first
/// `rows` are stored, and `features ≤ 16` output features; `accumulate` adds to `c`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` has six rows of `kc` values in its layout, `b` has `kc × 16`,
/// `c` has `rows` rows of `features` values at stride `ldc`.
#[inline]
unsafe fn tile(
    kc: usize,
    (a, lda): (*const f32, usize),
    b: &[f32],
    (c, ldc, rows, features): (*mut f32, usize, usize, usize),
    accumulate: bool,
) {
    debug_assert!(b.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    {
        if rows == MR && features == NR {
            if lda == 0 {
                tile_avx2::<false>(kc, (a, 0), b.as_ptr(), (c, ldc), accumulate);
            } else {
                tile_avx2::<true>(kc, (a, lda), b.as_ptr(), (c, ldc), accumulate);
            }
            return;
        }
        // Edge tile: through a full 6 × 16 buffer, only the real rows and features copied.
        let mut buf = [0f32; MR * NR];
        if accumulate {
            for r in 0..rows {
                let to = buf.as_mut_ptr().add(r * NR);
                std::ptr::copy_nonoverlapping(c.add(r * ldc), to, features);
            }
        }
        if lda == 0 {
            tile_avx2::<false>(kc, (a, 0), b.as_ptr(), (buf.as_mut_ptr(), NR), accumulate);
        } else {
            tile_avx2::<true>(kc, (a, lda), b.as_ptr(), (buf.as_mut_ptr(), NR), accumulate);
        }
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(r * NR), c.add(r * ldc), features);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kc, a, b, c, ldc, rows, features, accumulate);
        unreachable!("linear_nt_into asserts AVX2 and FMA before any tile");
    }
}

/// The register tile itself (see [`tile`]): 6 × 2 accumulators, one 64-byte line of the panel
/// and six broadcasts per summed value; `ROWS` reads `a` as rows `lda` apart.
///
/// # Safety
/// As [`tile`], with all six rows and sixteen features stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const ROWS: bool>(
    kc: usize,
    (a, lda): (*const f32, usize),
    b: *const f32,
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // The tile's output rows are far apart (and out of L2 for wide products): fetched while
    // the loop below runs, not when it ends.
    for r in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + NR - 1) as *const i8);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for d in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(d * NR));
        let b1 = _mm256_loadu_ps(b.add(d * NR + 8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = if ROWS {
                _mm256_broadcast_ss(&*a.add(r * lda + d))
            } else {
                _mm256_broadcast_ss(&*a.add(d * MR + r))
            };
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
        }
        _mm256_storeu_ps(row, v0);
        _mm256_storeu_ps(row.add(8), v1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `out [m, n] = a [m, k] · bᵀ` for `b [n, k]`, in f64 by the definition.
    fn reference_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| f64::from(a[i * k + l]) * f64::from(b[j * k + l]))
                    .sum();
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-4 * (1.0 + w.abs());
            assert!(
                (f64::from(*g) - w).abs() <= tol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn depth_block_follows_the_l1_data_cache() {
        let kc = kc();
        assert!((128..=KC).contains(&kc) && kc.is_multiple_of(64), "kc {kc}");
        if let Some(l1) = l1d_bytes() {
            // The panel (kc × 16 floats) takes at most two thirds of L1.
            assert!(
                kc * NR * 4 <= l1 * 2 / 3 || kc == 128,
                "kc {kc} for a {l1}-byte L1"
            );
        }
    }

    #[test]
    fn products_equal_the_definition_on_edge_tiles_and_blocks() {
        // The kernels need AVX2 and FMA, not the AVX2 path: they are tested on AVX-512
        // machines too (where the default build does not call them).
        if !cpu_has_avx2_fma() {
            return;
        }
        // Tokens not a multiple of 6, more than one token block per thread (1,400 tokens on
        // two threads: 700 > 576) and fewer tokens than threads; features not a multiple of
        // 16; depth over two and three blocks with remainders (513, 1,100), below 8, and not
        // a multiple of 8; token rows read in place (up to 24 panels) and interleaved (the
        // last five shapes, 25 panels and more).
        for &(m, n, k) in &[
            (13, 70, 300),
            (1, 5, 7),
            (7, 64, 576),
            (100, 192, 513),
            (97, 17, 16),
            (200, 33, 1),
            (1400, 48, 20),
            (30, 40, 1100),
            (13, 400, 300),
            (101, 512, 513),
            (7, 385, 9),
            (1400, 416, 20),
            (1, 600, 1100),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let y = linear_nt(&x, &w, m, n, k);
            assert_close(
                &y,
                &reference_nt(&x, &w, m, n, k),
                &format!("nt {m}x{n}x{k}"),
            );
            // The input gradient: g [m, n] · w with w [n, k], i.e. g · (wᵀ)ᵀ.
            let g = values(m * n, 3);
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            assert_close(
                &linear_nn(&g, &w, m, n, k),
                &reference_nt(&g, &wt, m, k, n),
                &format!("nn {m}x{n}x{k}"),
            );
        }
        assert_eq!(linear_nn(&[], &[], 2, 0, 3), vec![0.0; 6]);
    }

    #[test]
    fn interleaved_strips_hold_each_row_and_nothing_past_their_room() {
        // Lengths below, at and past the 8-value blocks, with remainders.
        for kc in [1, 7, 8, 9, 16, 288, 307] {
            let a = values(MR * kc, 5);
            let rows: [&[f32]; MR] = std::array::from_fn(|r| &a[r * kc..(r + 1) * kc]);
            let mut strip = vec![f32::NAN; kc * MR + 2 + 8];
            interleave(rows, &mut strip[..kc * MR + 2]);
            for d in 0..kc {
                for r in 0..MR {
                    assert_eq!(
                        strip[d * MR + r],
                        a[r * kc + d],
                        "kc {kc}: step {d}, row {r}"
                    );
                }
            }
            assert!(
                strip[kc * MR + 2..].iter().all(|v| v.is_nan()),
                "kc {kc}: written past the strip's room"
            );
        }
    }

    #[test]
    fn in_place_products_equal_the_definition_for_any_strides() {
        if !cpu_has_avx2_fma() {
            return;
        }
        // Rows not a multiple of 6, columns not of 16 (masked loads and stores), depth 0, 1
        // and long; `a` row-major and transposed; accumulating and scaled.
        for &(m, n, depth) in &[
            (13, 37, 64),
            (6, 16, 1),
            (1, 5, 200),
            (64, 64, 0),
            (7, 48, 33),
        ] {
            for transposed in [false, true] {
                for accumulate in [false, true] {
                    let a = values(m * depth, 7);
                    let ldb = n + 3;
                    let b = values(depth * ldb, 8);
                    let ldc = n + 5;
                    let c0 = values(m * ldc, 9);
                    let mut c = c0.clone();
                    // a(i, d) at i·depth + d, or, transposed, at d·m + i (a holds aᵀ then).
                    let (rs, ds) = if transposed { (1, m) } else { (depth, 1) };
                    let at = InPlace {
                        ptr: a.as_ptr(),
                        rs,
                        ds,
                    };
                    // SAFETY: a has m × depth values, b depth rows of ldb ≥ n, c m rows of ldc.
                    unsafe {
                        product_in_place(
                            (m, n, depth),
                            at,
                            (b.as_ptr(), ldb),
                            (c.as_mut_ptr(), ldc),
                            0.5,
                            accumulate,
                        )
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = f64::from(c[i * ldc + j]);
                            let before = f64::from(c0[i * ldc + j]);
                            let want = if j >= n {
                                before // past the n columns: untouched
                            } else {
                                let sum: f64 = (0..depth)
                                    .map(|d| {
                                        f64::from(a[i * rs + d * ds]) * f64::from(b[d * ldb + j])
                                    })
                                    .sum();
                                0.5 * sum + if accumulate { before } else { 0.0 }
                            };
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{m}x{n}x{depth} transposed {transposed} accumulate \
                                 {accumulate}: c[{i}][{j}] = {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn into_writes_only_its_rows_and_zero_depth_gives_zeros() {
        // The kernels need AVX2 and FMA, not the AVX2 path: they are tested on AVX-512
        // machines too (where the default build does not call them).
        if !cpu_has_avx2_fma() {
            return;
        }
        let (m, n, k) = (9, 20, 33);
        let (x, w) = (values(m * k, 4), values(n * k, 5));
        let mut y = vec![std::mem::MaybeUninit::new(f32::NAN); m * n + 3];
        linear_nt_into(&x, &w, m, n, k, &mut y);
        // SAFETY: every element was initialized (NaN, then the product).
        let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_close(&y[..m * n], &reference_nt(&x, &w, m, n, k), "into");
        assert!(y[m * n..].iter().all(|v| v.is_nan()), "wrote past m × n");
        assert_eq!(linear_nt(&[], &[], 4, 3, 0), vec![0.0; 12]);
    }

    #[test]
    fn outputs_starting_anywhere_in_a_line_get_every_feature() {
        // The kernels need AVX2 and FMA, not the AVX2 path: they are tested on AVX-512
        // machines too (where the default build does not call them).
        if !cpu_has_avx2_fma() {
            return;
        }
        // n a multiple of 16: the panels start where the rows cross a 64-byte line, after a
        // first panel of 1-15 features (or none), wherever the output starts.
        let (m, n, k) = (14, 48, 40);
        let (x, w) = (values(m * k, 6), values(n * k, 7));
        let want = reference_nt(&x, &w, m, n, k);
        let mut buf = vec![std::mem::MaybeUninit::new(f32::NAN); m * n + 16];
        for offset in 0..16 {
            let out = &mut buf[offset..offset + m * n];
            linear_nt_into(&x, &w, m, n, k, out);
            // SAFETY: initialized (NaN, then the product).
            let y: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_close(&y, &want, &format!("output at offset {offset}"));
        }
    }
}
