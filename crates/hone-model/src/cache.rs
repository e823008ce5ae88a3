//! Key/value cache for incremental decoding: per layer, keys and values of every past position,
//! `[batch, kv_heads, positions, head_dim]`.

use burn::prelude::*;

/// Per-layer (keys, values) of past positions.
pub type LayerCache<B> = (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>);

/// The cache of one batch of sequences that advance together.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| (None, None)).collect(),
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}
