//! Key/value cache for incremental decoding: per layer, keys and values of every past position,
//! `[batch, kv_heads, capacity, head_dim]`, preallocated and written in place. A step writes its
//! new keys and values after the cached ones (`slice_assign` on a buffer nobody else holds, which
//! burn's CPU backend does without copying) and attends over a view of the first `len`
//! positions; when the buffer is full it is replaced by one of twice the capacity.

use burn::prelude::*;

/// Smallest number of positions a layer's buffer holds.
const MIN_CAPACITY: usize = 32;

/// One layer's keys and values: buffers of `capacity` positions, the first `len` of which hold
/// data (the length lives in [`KvCache`]).
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    fn capacity(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Writes `k`, `v` (`[batch, kv_heads, seq, head_dim]`) at positions `len..len + seq` and
    /// returns the keys and values of positions `0..len + seq`.
    pub(crate) fn append(
        &mut self,
        len: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, kv_heads, seq, dim] = k.dims();
        let total = len + seq;
        if total > self.capacity() {
            let capacity = total.max(2 * self.capacity()).max(MIN_CAPACITY);
            let grow = |old: Option<Tensor<B, 4>>, like: &Tensor<B, 4>| {
                let fresh = Tensor::<B, 4>::zeros(
                    [batch, kv_heads, capacity, dim],
                    (&like.device(), like.dtype()),
                );
                match old {
                    Some(old) if len > 0 => fresh.slice_assign(
                        [0..batch, 0..kv_heads, 0..len, 0..dim],
                        old.narrow(2, 0, len),
                    ),
                    _ => fresh,
                }
            };
            self.keys = Some(grow(self.keys.take(), &k));
            self.values = Some(grow(self.values.take(), &v));
        }
        let range = [0..batch, 0..kv_heads, len..total, 0..dim];
        let keys = self
            .keys
            .take()
            .expect("allocated above")
            .slice_assign(range.clone(), k);
        let values = self
            .values
            .take()
            .expect("allocated above")
            .slice_assign(range, v);
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        (keys.narrow(2, 0, total), values.narrow(2, 0, total))
    }

    fn retain_rows(&mut self, rows: &Tensor<B, 1, Int>) {
        self.keys = self.keys.take().map(|t| t.select(0, rows.clone()));
        self.values = self.values.take().map(|t| t.select(0, rows.clone()));
    }
}

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
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
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

    /// Keeps rows `rows` of the batch (in that order), e.g. to drop finished sequences.
    pub fn retain_rows(&mut self, rows: &[usize], device: &B::Device) {
        let rows = Tensor::<B, 1, Int>::from_data(
            burn::tensor::TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            device,
        );
        for layer in &mut self.layers {
            layer.retain_rows(&rows);
        }
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}
