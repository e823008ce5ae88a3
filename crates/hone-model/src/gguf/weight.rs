//! A frozen projection weight kept in a ggml block format ([`QuantWeight`]): what a
//! [`crate::model::Linear`] holds instead of a dense parameter when a GGUF model is loaded
//! without dequantizing (Flex, f32). It is never a `Param`: it has no gradient, no optimizer
//! state, and clones of the model share its bytes.

use std::fmt;
use std::sync::Arc;

use burn::empty;
use rayon::prelude::*;

use super::matmul::{matmul_quant_many, matmul_quant_with, Activations, QuantMatrix};
use super::quant::{dequantize, dequantize_block, GgmlType};
use crate::kernels::cpu::matmul;

/// Rows of `W` decoded per step of [`QuantWeight::matmul_nn`].
const GRAD_TILE_ROWS: usize = 256;

/// A weight `[rows, cols]` (`[out, in]`, Hugging Face layout) in a ggml block format, rows
/// contiguous, each row a whole number of blocks.
#[derive(Clone)]
pub struct QuantWeight {
    ty: GgmlType,
    bytes: Arc<[u8]>,
    rows: usize,
    cols: usize,
    /// How few-row products multiply by it ([`Activations`]; exact f32 by default).
    activations: Activations,
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantWeight")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.bytes.len())
            .field("activations", &self.activations)
            .finish()
    }
}

impl fmt::Display for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}, {}]", self.ty, self.rows, self.cols)
    }
}

// A module without parameters or record (as burn's constants), so that a model's projection can
// hold it: it stays on the host, unchanged by `to_device`, `valid` and record loading.
empty!(QuantWeight);

impl QuantWeight {
    /// The matrix `[rows, cols]` of type `ty` stored in `bytes`; an error says what does not fit.
    pub fn new(ty: GgmlType, bytes: Vec<u8>, rows: usize, cols: usize) -> Result<Self, String> {
        if !ty.is_kept_as_stored() {
            return Err(format!("{ty} is not a block format or a 16-bit float"));
        }
        QuantMatrix {
            ty,
            bytes: &bytes,
            rows,
            cols,
        }
        .validate()?;
        Ok(Self {
            ty,
            bytes: bytes.into(),
            rows,
            cols,
            activations: Activations::F32,
        })
    }

    /// The weight with its few-row products taking `activations`.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// The block format.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held (shared between clones).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The matrix as [`matmul_quant`] takes it.
    pub fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            ty: self.ty,
            bytes: &self.bytes,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// The weight decoded to f32, row-major `[out, in]` (a dense copy: what the backends without
    /// a quantized product multiply by, and what merging an adapter into the weight needs).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        dequantize(self.ty, &self.bytes, &mut out);
        out
    }

    /// `y [m, out] = x [m, in] · Wᵀ` (host, f32; with 8-bit activations where the weight was
    /// given [`Activations::Q8`] and `m` is small).
    pub fn matmul_nt(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_quant_with(self.matrix(), x, m, self.activations)
    }

    /// [`QuantWeight::matmul_nt`] of one `x` by each of `ws` (the same input width): few rows
    /// run as one parallel loop, with `x` quantized once where 8-bit activations apply.
    pub fn matmul_nt_many(ws: &[&QuantWeight], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let products: Vec<_> = ws.iter().map(|w| (w.matrix(), w.activations)).collect();
        matmul_quant_many(&products, x, m)
    }

    /// `dx [m, in] = g [m, out] · W`: the input gradient of [`QuantWeight::matmul_nt`]. Tiles
    /// of rows of `W` are decoded (in parallel) into one f32 buffer and accumulated by gemm, so
    /// at most [`GRAD_TILE_ROWS`] rows of `W` are held in f32 at a time.
    pub fn matmul_nn(&self, g: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(g.len(), m * n, "QuantWeight::matmul_nn: g is not [m, out]");
        let mut dx = vec![0f32; m * k];
        if m == 0 || n == 0 || k == 0 {
            return dx;
        }
        let rb = self.ty.byte_len(k);
        let (bs, bb) = (self.ty.block_size(), self.ty.block_bytes());
        let tile = GRAD_TILE_ROWS.min(n);
        let mut scratch = vec![0f32; tile * k];
        // Rows of dx per task: enough work per task to amortise scheduling.
        let per_task = (m / rayon::current_num_threads().max(1)).clamp(1, 64);
        for r0 in (0..n).step_by(tile) {
            let rows = tile.min(n - r0);
            let bytes = &self.bytes[r0 * rb..(r0 + rows) * rb];
            scratch[..rows * k]
                .par_chunks_mut(k)
                .zip(bytes.par_chunks(rb))
                .for_each(|(out, row)| {
                    for (y, x) in out.chunks_exact_mut(bs).zip(row.chunks_exact(bb)) {
                        dequantize_block(self.ty, x, y);
                    }
                });
            let w = &scratch[..rows * k];
            // dx[i0.., :] += g[i0.., r0..r0+rows] · w[rows, k].
            dx.par_chunks_mut(per_task * k)
                .enumerate()
                .for_each(|(t, dx)| {
                    let i0 = t * per_task;
                    let mi = dx.len() / k;
                    // SAFETY: g is [m, n] (row stride n) and rows i0..i0+mi, columns
                    // r0..r0+rows exist; w is [rows, k]; dx is this task's [mi, k] rows.
                    unsafe {
                        matmul(
                            mi,
                            k,
                            rows,
                            dx.as_mut_ptr(),
                            k,
                            1,
                            r0 > 0,
                            g.as_ptr().add(i0 * n + r0),
                            n,
                            1,
                            w.as_ptr(),
                            k,
                            1,
                            1.0,
                        );
                    }
                });
        }
        dx
    }
}
