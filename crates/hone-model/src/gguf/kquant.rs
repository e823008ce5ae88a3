//! The K-quant block formats (Q4_K, Q5_K, Q6_K: super-blocks of 256 values) quantized as
//! llama.cpp's reference quantizers do it without an importance matrix (what `llama-quantize`
//! runs when it is given none): per sub-block a scale (and for Q4_K/Q5_K a minimum) fitted by a
//! small search that minimises a weighted squared error, then the sub-block scales quantized to
//! 6 or 8 bits against one f16 scale per super-block, and the values re-quantized against the
//! stored scales.
//!
//! Q4_K/Q5_K: 8 sub-blocks of 32, values `d·sc·q - dmin·m` with `q` in 4 or 5 bits, weights
//! `rms(sub-block) + |x|` in the fit. Q6_K: 16 sub-blocks of 16, values `d·sc·(q - 32)` with
//! signed 8-bit `sc`, weights `x²`. Rounding is to nearest, ties to even (llama.cpp's
//! `nearest_int`). A C compiler may fuse some of the reference's multiply-adds, so a few values
//! can land on the other side of a rounding boundary than here; the formats are checked by the
//! error they leave and, end to end, by llama.cpp's perplexity on the exported file.

use half::f16;

const QK_K: usize = 256;
/// Below this a group counts as all zero (llama.cpp's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, as llama.cpp's `nearest_int` (values well inside i32).
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

fn f16_round_trip(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Fits `scale·L + min` (`min ≤ 0`, `L` in `[0, nmax]`) to `x` under `weights`: a first guess
/// from the range, then `nstep + 1` trial scales around it, each solved for the least-squares
/// scale and minimum; the best by weighted squared error is kept. Returns `(scale, -min)`.
fn fit_scale_min(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let (w, qf) = (weights[i], q as f32);
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Fits a symmetric scale to `x` (`L` in `[-nmax, nmax - 1]`, stored `+ nmax`) under weights
/// `x²`: the scale from the largest magnitude, then 18 trial scales around it, keeping the one
/// whose least-squares fit explains most of `x`.
fn fit_symmetric(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let stats = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l: &mut [i8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -nmax_f / max;
    fill(iscale, l);
    let (sumlx, suml2) = stats(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = stats(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scale and minimum of sub-block `j` from Q4_K/Q5_K's 12 packed bytes.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K and Q5_K: 8 sub-blocks of 32 with a scale and a minimum each, values of `bits` bits.
/// Writes `d`, `dmin` and the 12 scale bytes into `head` (16 bytes) and returns the values.
fn scale_min_block(x: &[f32], bits: u32, rmin: f32, nstep: i32, head: &mut [u8]) -> [u8; QK_K] {
    let nmax = (1i32 << bits) - 1;
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let sub = &x[32 * j..32 * (j + 1)];
        let sum_x2: f32 = sub.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(sub) {
            *w = av_x + v.abs();
        }
        let (s, m) = fit_scale_min(
            sub,
            &weights,
            nmax,
            &mut l[32 * j..32 * (j + 1)],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut head[4..16];
    packed.iter_mut().for_each(|b| *b = 0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(head, 0, max_scale / 63.0);
    put_f16(head, 2, max_min / 63.0);
    let d = f16_round_trip(max_scale / 63.0);
    let dmin = f16_round_trip(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min(j, &head[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * (j + 1) {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    l
}

/// One Q4_K super-block: `d`, `dmin`, 12 scale bytes, 128 bytes of 4-bit values.
pub(crate) fn q4_k(x: &[f32], y: &mut [u8]) {
    let l = scale_min_block(x, 4, -1.0, 20, &mut y[..16]);
    let q = &mut y[16..144];
    for (chunk, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * chunk + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One Q5_K super-block: `d`, `dmin`, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of the
/// low 4 bits.
pub(crate) fn q5_k(x: &[f32], y: &mut [u8]) {
    let l = scale_min_block(x, 5, -0.5, 15, &mut y[..16]);
    let (qh, ql) = y[16..176].split_at_mut(32);
    qh.iter_mut().for_each(|b| *b = 0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * chunk + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// One Q6_K super-block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 signed 8-bit scales and
/// `d` last.
pub(crate) fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for ib in 0..16 {
        let s = fit_symmetric(
            &x[16 * ib..16 * (ib + 1)],
            32,
            &mut l[16 * ib..16 * (ib + 1)],
        );
        scales[ib] = s;
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    y.iter_mut().for_each(|b| *b = 0);
    if max_abs < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    let d = f16_round_trip(1.0 / iscale);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let dj = d * (y[192 + j] as i8) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k] as u8;
            ql[i] = (q(0) & 0x0f) | ((q(2) & 0x0f) << 4);
            ql[i + 32] = (q(1) & 0x0f) | ((q(3) & 0x0f) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}
