//! A frozen projection weight kept in a ggml block format ([`QuantWeight`]): what a
//! [`crate::model::Linear`] holds instead of a dense parameter when a GGUF model is loaded
//! without dequantizing (Flex, f32). It is never a `Param`: it has no gradient, no optimizer
//! state, and clones of the model share its bytes.

use std::fmt;
use std::sync::Arc;

use burn::empty;
use rayon::prelude::*;

use super::matmul::{product, products_many, Activations, Product, QuantMatrix};
use super::quant::{dequantize, dequantize_block, GgmlType};
use crate::kernels::cpu::matmul;

/// Rows of `W` decoded per step of [`QuantWeight::matmul_nn`] (a multiple of eight: whole
/// regrouped groups).
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
    /// How `bytes` holds the rows; the only copy, so memory stays the file's size.
    layout: Layout,
}

/// How a [`QuantWeight`] holds its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// As the file stores them.
    Rows,
    /// Regrouped by eight ([`super::repack`]), which the 8-bit products of Q4_0, Q4_1, Q4_K
    /// and Q5_K read fastest.
    Regrouped,
    /// F16 and BF16 in panels of sixteen rows ([`super::panel`]), which every product of
    /// the 16-bit floats reads.
    Panels,
}

impl Layout {
    /// The layout that products of a `[rows, cols]` weight of `ty` with `activations` read
    /// fastest on this CPU.
    fn best(ty: GgmlType, rows: usize, cols: usize, activations: Activations) -> Self {
        if activations == Activations::Q8 && super::repack::applies(ty, rows, cols) {
            Layout::Regrouped
        } else if super::panel::applies(ty, rows, cols) {
            Layout::Panels
        } else {
            Layout::Rows
        }
    }

    /// Rows of `ty` (`cols` wide) from a multiple of this layout's row step on.
    fn rows_of(self, ty: GgmlType, bytes: &[u8], cols: usize, r0: usize, out: &mut [u8]) {
        match self {
            Layout::Rows => {
                let rb = ty.byte_len(cols);
                out.copy_from_slice(&bytes[r0 * rb..r0 * rb + out.len()]);
            }
            Layout::Regrouped => super::repack::row_bytes(ty, bytes, cols, r0, out),
            Layout::Panels => super::panel::row_bytes(bytes, cols, r0, out),
        }
    }

    /// The rows `bytes` (as the file stores them) in this layout.
    fn arrange(self, ty: GgmlType, bytes: &[u8], cols: usize) -> Arc<[u8]> {
        match self {
            Layout::Rows => bytes.into(),
            Layout::Regrouped => super::repack::interleave(ty, bytes, cols).into(),
            Layout::Panels => super::panel::interleave(bytes, cols),
        }
    }

    /// Rows per step of [`Layout::rows_of`].
    fn step(self) -> usize {
        match self {
            Layout::Rows => 1,
            Layout::Regrouped => super::repack::ROWS,
            Layout::Panels => super::panel::ROWS,
        }
    }
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantWeight")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.bytes.len())
            .field("activations", &self.activations)
            .field("layout", &self.layout)
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
        let layout = Layout::best(ty, rows, cols, Activations::F32);
        Ok(Self {
            ty,
            bytes: layout.arrange(ty, &bytes, cols),
            rows,
            cols,
            activations: Activations::F32,
            layout,
        })
    }

    /// The weight with its products taking `activations`. With [`Activations::Q8`], Q4_0, Q4_1,
    /// Q4_K and Q5_K rows are regrouped by eight where the CPU has the 8-bit kernels (in place of
    /// the rows, not beside them); with [`Activations::F32`] they are rows again. (F16 and
    /// BF16 stay in panels: their products are exact either way.)
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        let layout = Layout::best(self.ty, self.rows, self.cols, activations);
        if layout != self.layout {
            let rows = self.row_bytes(0, self.rows);
            self.bytes = layout.arrange(self.ty, &rows, self.cols);
            self.layout = layout;
        }
        self
    }

    /// Rows `r0..r0 + rows` as the file stores them (a copy where the weight is regrouped or in
    /// panels).
    fn row_bytes(&self, r0: usize, rows: usize) -> std::borrow::Cow<'_, [u8]> {
        let rb = self.ty.byte_len(self.cols);
        if self.layout == Layout::Rows {
            return std::borrow::Cow::Borrowed(&self.bytes[r0 * rb..(r0 + rows) * rb]);
        }
        let mut out = vec![0u8; rows * rb];
        self.layout
            .rows_of(self.ty, &self.bytes, self.cols, r0, &mut out);
        std::borrow::Cow::Owned(out)
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

    /// The product by this weight (its bytes in their layout).
    fn product(&self) -> Product<'_> {
        Product {
            w: QuantMatrix {
                ty: self.ty,
                bytes: &self.bytes,
                rows: self.rows,
                cols: self.cols,
            },
            activations: self.activations,
            regrouped: self.layout == Layout::Regrouped,
            panels: self.layout == Layout::Panels,
        }
    }

    /// The weight decoded to f32, row-major `[out, in]` (a dense copy: what the backends without
    /// a quantized product multiply by, and what merging an adapter into the weight needs).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.layout == Layout::Rows {
            dequantize(self.ty, &self.bytes, &mut out);
            return out;
        }
        let step = self.layout.step();
        for (g, out) in out.chunks_mut(step * self.cols).enumerate() {
            dequantize(self.ty, &self.row_bytes(g * step, step), out);
        }
        out
    }

    /// `y [m, out] = x [m, in] · Wᵀ` (host, f32; with 8-bit activations where the weight was
    /// given [`Activations::Q8`]).
    pub fn matmul_nt(&self, x: &[f32], m: usize) -> Vec<f32> {
        product(self.product(), x, m)
    }

    /// [`QuantWeight::matmul_nt`] of one `x` by each of `ws` (the same input width): few rows
    /// run as one parallel loop, with `x` quantized once where 8-bit activations apply.
    pub fn matmul_nt_many(ws: &[&QuantWeight], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let products: Vec<_> = ws.iter().map(|w| w.product()).collect();
        products_many(&products, x, m)
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
            let bytes = self.row_bytes(r0, rows);
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
