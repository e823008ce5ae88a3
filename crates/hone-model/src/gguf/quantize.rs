//! f32 values into ggml's storage types, for writing GGUF files: the float types (F32, F16,
//! BF16) and the 32-wide block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), computed as gguf-py's
//! `gguf.quants.quantize` and llama.cpp's `quantize_row_*_ref` compute them, so a tensor
//! quantized here has the bytes those give (checked against gguf-py in
//! `tests/gguf_quantize.rs`).
//!
//! The arithmetic is in f32, in the reference's order: a block's scale `d` is computed in f32,
//! the values are scaled by `1/d` (0 for an all-zero block) and rounded, and only then is `d`
//! stored as f16. Rounding: Q8_0 rounds half away from zero (`roundf`); the 4- and 5-bit formats
//! add an offset and truncate (`(int)(x + 8.5f)` in llama.cpp), clamped to the format's range.
//! Blocks that take the absolute maximum use the first element reaching it, as both references
//! do. BF16 rounds to nearest even and quiets NaNs as gguf-py does.

use half::f16;
use rayon::prelude::*;

use super::quant::GgmlType;

/// Blocks quantized per parallel task.
const BLOCKS_PER_TASK: usize = 1024;

/// `values` (a whole number of rows of `ty`'s blocks) as `ty`'s bytes; an error names what is
/// wrong (a length that is not whole blocks, a type hone cannot write).
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    let bs = ty.block_size();
    if !values.len().is_multiple_of(bs) {
        return Err(format!(
            "{} values are not whole {} blocks of {bs}",
            values.len(),
            ty.name()
        ));
    }
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => |x, y| y.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, y| y.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, y| y.copy_from_slice(&bf16_bits(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q4K => super::kquant::q4_k,
        GgmlType::Q5K => super::kquant::q5_k,
        GgmlType::Q6K => super::kquant::q6_k,
    };
    let bb = ty.block_bytes();
    let mut out = vec![0u8; ty.byte_len(values.len())];
    out.par_chunks_mut(bb * BLOCKS_PER_TASK)
        .zip(values.par_chunks(bs * BLOCKS_PER_TASK))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(bb).zip(x.chunks_exact(bs)) {
                block(xb, yb);
            }
        });
    Ok(out)
}

/// f32 to bf16 bits as gguf-py's `__compute_fp32_to_bf16`: a NaN made quiet (its high bits
/// kept, bit 22 set), everything else rounded to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n as u64 + (0x7fff + ((n as u64 >> 16) & 1))) >> 16) as u16
}

/// The element of largest magnitude (the first one reaching it), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `1/d`, or 0 for a zero scale.
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Packs 32 values of 4 bits (or the low 4 of 5): value `j` in the low nibble of byte `j`, value
/// `16 + j` in its high nibble.
fn pack_nibbles(q: &[u8; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (q[j] & 0x0f) | (q[16 + j] << 4);
    }
}

/// The fifth bits of 32 values as a little-endian u32 (bit `j` is value `j`'s).
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut h = 0u32;
    for (j, &v) in q.iter().enumerate() {
        h |= ((v as u32 >> 4) & 1) << j;
    }
    h.to_le_bytes()
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    for (o, &v) in y[2..34].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Q4_0 and Q5_0: symmetric, `d = max / -half` for the element of largest magnitude, values
/// `trunc(x/d + half + 0.5)` clamped to `[0, 2·half - 1]`.
fn symmetric(x: &[f32], half: f32) -> (f32, [u8; 32]) {
    let d = signed_absmax(x) / -half;
    let id = inverse(d);
    let top = 2.0 * half - 1.0;
    let mut q = [0u8; 32];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id + (half + 0.5)).trunc().clamp(0.0, top) as u8;
    }
    (d, q)
}

/// Q4_1 and Q5_1: `d = (max - min) / levels`, values `trunc((x - min)/d + 0.5)` clamped.
fn asymmetric(x: &[f32], levels: f32) -> (f32, f32, [u8; 32]) {
    let (min, max) = min_max(x);
    let d = (max - min) / levels;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((v - min) * id + 0.5).trunc().clamp(0.0, levels) as u8;
    }
    (d, min, q)
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (d, q) = symmetric(x, 8.0);
    put_f16(y, 0, d);
    pack_nibbles(&q, &mut y[2..18]);
}

fn q4_1(x: &[f32], y: &mut [u8]) {
    let (d, min, q) = asymmetric(x, 15.0);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    pack_nibbles(&q, &mut y[4..20]);
}

fn q5_0(x: &[f32], y: &mut [u8]) {
    let (d, q) = symmetric(x, 16.0);
    put_f16(y, 0, d);
    y[2..6].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut y[6..22]);
}

fn q5_1(x: &[f32], y: &mut [u8]) {
    let (d, min, q) = asymmetric(x, 31.0);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    y[4..8].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut y[8..24]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nans() {
        // 1 + 2^-8 lies halfway between two bf16 values: to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 lies halfway too: to the even one above.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        let signalling = f32::from_bits(0x7f80_0001);
        assert_eq!(bf16_bits(signalling), 0x7fc0);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn quantized_blocks_decode_close_to_the_values() {
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for ty in GgmlType::ALL {
            let bytes = quantize(ty, &values).unwrap();
            assert_eq!(bytes.len(), ty.byte_len(values.len()), "{ty}");
            let mut back = vec![0f32; values.len()];
            super::super::quant::dequantize(ty, &bytes, &mut back);
            // A step of the format (values span about 6): half a step, or a whole one at the
            // clipped end of the symmetric formats.
            let bound = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 2e-3,
                GgmlType::BF16 => 2e-2,
                GgmlType::Q8_0 => 0.03,
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K | GgmlType::Q6K => 0.2,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => 0.4,
            };
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= bound, "{ty}: worst error {worst}");
        }
        assert!(quantize(GgmlType::Q8_0, &values[..40]).is_err());
    }
}
