//! ggml's tensor types and their block formats, decoded to f32 exactly as ggml's reference
//! `dequantize_row_*` (and gguf-py's `gguf.quants`) do: the same products in the same order, so
//! the results agree bit for bit (tested against gguf-py on fixtures it wrote).
//!
//! | type | block | bytes | layout |
//! |---|---:|---:|---|
//! | Q4_0 | 32 | 18 | f16 d, 16 × two 4-bit q; x = d·(q − 8) |
//! | Q4_1 | 32 | 20 | f16 d, f16 m, 16 × two 4-bit q; x = d·q + m |
//! | Q5_0 | 32 | 22 | f16 d, u32 high bits, 16 × two low nibbles; x = d·(q − 16) |
//! | Q5_1 | 32 | 24 | f16 d, f16 m, u32 high bits, 16 bytes low nibbles; x = d·q + m |
//! | Q8_0 | 32 | 34 | f16 d, 32 × i8 q; x = d·q |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles |
//! | Q5_K | 256 | 176 | as Q4_K plus 32 bytes of fifth bits |
//! | Q6_K | 256 | 210 | 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × i8 scales, f16 d |
//!
//! In the 32-wide formats the low nibbles of the 16 bytes hold elements 0–15, the high nibbles
//! 16–31. In the K formats a 256 block is 8 sub-blocks of 32 (Q6_K: 16 scales of 16).

use std::fmt;

use half::f16;
use rayon::prelude::*;

/// A ggml tensor type that hone reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// ggml's names for the type ids, including those hone does not read (for messages).
const TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// Every type hone reads.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type for a ggml type id; an unsupported or unknown id is an error naming it and
    /// listing the supported types.
    pub fn from_id(id: u32) -> Result<Self, String> {
        let ty = match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            _ => {
                let supported: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                return Err(match TYPE_NAMES.iter().find(|(i, _)| *i == id) {
                    Some((_, name)) => format!(
                        "type {name} is not supported (supported: {})",
                        supported.join(", ")
                    ),
                    None => format!("unknown ggml type id {id}"),
                });
            }
        };
        Ok(ty)
    }

    /// ggml's type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 30,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
        }
    }

    /// ggml's name (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        let id = self.id();
        TYPE_NAMES
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| *n)
            .expect("every supported type is in TYPE_NAMES")
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of `elements` values (a whole number of blocks).
    pub fn byte_len(self, elements: usize) -> usize {
        elements / self.block_size() * self.block_bytes()
    }

    /// A block format (not a plain float type).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// A type a model keeps weights in as stored, multiplying by them directly
    /// ([`super::QuantWeight`]): the block formats and the 16-bit floats (F16, BF16: half the
    /// bytes of f32, converted exactly as they are read).
    pub fn is_kept_as_stored(self) -> bool {
        self != GgmlType::F32
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes `bytes` of type `ty` into `out` (`out.len()` elements, a whole number of blocks;
/// `bytes.len()` must be `ty.byte_len(out.len())`). Blocks are decoded in parallel.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    assert_eq!(
        bytes.len(),
        ty.byte_len(out.len()),
        "dequantize: byte length does not match the element count"
    );
    // Chunks of whole blocks, a few thousand elements each.
    let blocks_per_chunk = (4096 / bs).max(1);
    out.par_chunks_mut(blocks_per_chunk * bs)
        .zip(bytes.par_chunks(blocks_per_chunk * bb))
        .for_each(|(out, bytes)| {
            for (y, x) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(bb)) {
                dequantize_block(ty, x, y);
            }
        });
}

/// Decodes one block `x` into `y` (`ty.block_size()` values).
pub fn dequantize_block(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    decode_block(ty, x, y)
}

/// [`dequantize_block`], inlined into the vectorised kernels that call it.
#[inline(always)]
pub(crate) fn decode_block(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => y[0] = f16_at(x, 0),
        GgmlType::BF16 => y[0] = f32::from_bits(u32::from(u16::from_le_bytes([x[0], x[1]])) << 16),
        GgmlType::Q4_0 => {
            let x: &[u8; 18] = x[..18].try_into().expect("one Q4_0 block");
            let y: &mut [f32; 32] = (&mut y[..32]).try_into().expect("32 values");
            let d = f16_at(x, 0);
            let qs = &x[2..18];
            for j in 0..16 {
                y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let x: &[u8; 20] = x[..20].try_into().expect("one Q4_1 block");
            let y: &mut [f32; 32] = (&mut y[..32]).try_into().expect("32 values");
            let (d, m) = (f16_at(x, 0), f16_at(x, 2));
            let qs = &x[4..20];
            for j in 0..16 {
                y[j] = d * (qs[j] & 0x0F) as f32 + m;
                y[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            let x: &[u8; 22] = x[..22].try_into().expect("one Q5_0 block");
            let y: &mut [f32; 32] = (&mut y[..32]).try_into().expect("32 values");
            let d = f16_at(x, 0);
            let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
            let qs = &x[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as u8;
                let h1 = ((qh >> (j + 16)) & 1) as u8;
                y[j] = d * (((qs[j] & 0x0F) | (h0 << 4)) as i32 - 16) as f32;
                y[j + 16] = d * (((qs[j] >> 4) | (h1 << 4)) as i32 - 16) as f32;
            }
        }
        GgmlType::Q5_1 => {
            let x: &[u8; 24] = x[..24].try_into().expect("one Q5_1 block");
            let y: &mut [f32; 32] = (&mut y[..32]).try_into().expect("32 values");
            let (d, m) = (f16_at(x, 0), f16_at(x, 2));
            let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
            let qs = &x[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as u8;
                let h1 = ((qh >> (j + 16)) & 1) as u8;
                y[j] = d * ((qs[j] & 0x0F) | (h0 << 4)) as f32 + m;
                y[j + 16] = d * ((qs[j] >> 4) | (h1 << 4)) as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            let x: &[u8; 34] = x[..34].try_into().expect("one Q8_0 block");
            let y: &mut [f32; 32] = (&mut y[..32]).try_into().expect("32 values");
            let d = f16_at(x, 0);
            for j in 0..32 {
                y[j] = (x[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let y: &mut [f32; 256] = (&mut y[..256]).try_into().expect("256 values");
            let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
            let (sc, mn) = k_scales_mins(&x[4..16]);
            let (qh, qs) = if ty == GgmlType::Q5K {
                (Some(&x[16..48]), &x[48..176])
            } else {
                (None, &x[16..144])
            };
            for sub in 0..8 {
                let dl = d * sc[sub] as f32;
                let ml = dmin * mn[sub] as f32;
                let bytes = &qs[(sub / 2) * 32..(sub / 2) * 32 + 32];
                let shift = 4 * (sub % 2);
                for k in 0..32 {
                    let mut q = (bytes[k] >> shift) & 0x0F;
                    if let Some(qh) = qh {
                        q |= ((qh[k] >> sub) & 1) << 4;
                    }
                    y[sub * 32 + k] = dl * q as f32 - ml;
                }
            }
        }
        GgmlType::Q6K => {
            let x: &[u8; 210] = x[..210].try_into().expect("one Q6_K block");
            let y: &mut [f32; 256] = (&mut y[..256]).try_into().expect("256 values");
            let (ql, qh) = (&x[0..128], &x[128..192]);
            let scales = &x[192..208];
            let d = f16_at(x, 208);
            // Value `h·128 + 32·quarter + l` takes its low 4 bits from `ql[h·64 + 32·(quarter
            // % 2) + l] >> 4·(quarter / 2)`, its high 2 bits from `qh[h·32 + l] >> 2·quarter`
            // and its scale from `scales[e / 16]`: loops whose shifts and scales are fixed, which
            // the compiler vectorises (one loop over `r`, its shifts varying, ran 7× slower).
            for h in 0..2 {
                for quarter in 0..4 {
                    let lo_at = h * 64 + 32 * (quarter % 2);
                    let (lo_shift, hi_shift) = (4 * (quarter / 2), 2 * quarter);
                    for half in 0..2 {
                        let e0 = h * 128 + 32 * quarter + 16 * half;
                        let s = d * (scales[e0 / 16] as i8) as f32;
                        for l in 16 * half..16 * half + 16 {
                            let lo = (ql[lo_at + l] >> lo_shift) & 0x0F;
                            let hi = (qh[h * 32 + l] >> hi_shift) & 0x03;
                            let q = ((lo | (hi << 4)) as i8 - 32) as f32;
                            y[e0 + l - 16 * half] = s * q;
                        }
                    }
                }
            }
        }
    }
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K block from their 12 packed bytes.
pub(crate) fn k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Decodes 32 consecutive values of a plain float type (`F32`, `F16`, `BF16`) from `x`.
#[inline(always)]
pub(crate) fn decode_plain32(ty: GgmlType, x: &[u8], y: &mut [f32; 32]) {
    match ty {
        GgmlType::F32 => {
            let x: &[u8; 128] = x[..128].try_into().expect("32 f32 values");
            for j in 0..32 {
                y[j] = f32::from_le_bytes([x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]]);
            }
        }
        GgmlType::F16 => {
            let x: &[u8; 64] = x[..64].try_into().expect("32 f16 values");
            for j in 0..32 {
                y[j] = f16::from_le_bytes([x[2 * j], x[2 * j + 1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            let x: &[u8; 64] = x[..64].try_into().expect("32 bf16 values");
            for j in 0..32 {
                y[j] =
                    f32::from_bits(u32::from(u16::from_le_bytes([x[2 * j], x[2 * j + 1]])) << 16);
            }
        }
        _ => unreachable!("decode_plain32 is called for plain float types only"),
    }
}
