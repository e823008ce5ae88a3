//! Key/value cache for incremental decoding: per layer, keys and values of every past position,
//! `[batch, kv_heads, capacity, head_dim]`, preallocated and written in place. A step writes its
//! new keys and values after the cached ones (`slice_assign` on a buffer nobody else holds, which
//! burn's CPU backend does without copying) and attends over a view of the first `len`
//! positions; when the buffer is full it is replaced by one of twice the capacity. A cache made
//! with [`KvCache::with_capacity`] allocates the positions it is told of at the first write (the
//! prompt and the tokens to generate), so decoding does not grow it: growing copies every cached
//! position, and rows that started together would all grow in the same step.
//!
//! Backends that attend over the cache in host memory ([`crate::KernelBackend::caches_on_host`]:
//! Flex, f32) keep a layer's keys and values in a [`HostKv`] instead and read them in place.

use burn::prelude::*;
use burn::tensor::TensorData;

/// Smallest number of positions a layer's buffer holds.
const MIN_CAPACITY: usize = 32;

/// Generated tokens [`KvCache::for_generation`] makes room for beyond the prompt. Growing a
/// cache copies every cached position, and rows that started together grow in the same step
/// (measured in `hone serve`: one decoding step of 30 such rows took 430 ms instead of 80);
/// past this many tokens a cache doubles as needed, so a `max_tokens` far above what a request
/// generates does not hold memory it never uses.
pub const RESERVED_NEW_TOKENS: usize = 256;

/// One layer's keys and values: buffers of `capacity` positions, the first `len` of which hold
/// data (the length lives in [`KvCache`]).
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    /// The keys and values in host memory, when the fused kernels attend over them.
    host: Option<HostKv>,
    /// Positions the buffers hold at least, once allocated.
    reserve: usize,
}

/// One layer's keys and values in host memory, `[batch, kv_heads, capacity, head_dim]` each:
/// the keys of one head are contiguous rows, so attention reads them in place.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub(crate) keys: Vec<f32>,
    pub(crate) values: Vec<f32>,
    pub(crate) batch: usize,
    pub(crate) kv_heads: usize,
    pub(crate) dim: usize,
    pub(crate) capacity: usize,
    /// Positions the buffers hold at least, once allocated.
    pub(crate) reserve: usize,
}

impl HostKv {
    /// Writes `k`, `v` (`[batch, seq, kv_heads, dim]`, the projections' layout) at positions
    /// `len..len + seq`, growing the buffers (to twice the capacity) when they are full.
    pub(crate) fn append(
        &mut self,
        len: usize,
        k: &[f32],
        v: &[f32],
        batch: usize,
        kv_heads: usize,
        dim: usize,
    ) {
        let seq = k.len() / (batch * kv_heads * dim).max(1);
        assert!(
            k.len() == batch * seq * kv_heads * dim && v.len() == k.len(),
            "HostKv::append: keys and values are not [batch, seq, kv_heads, dim]"
        );
        if self.capacity == 0 {
            (self.batch, self.kv_heads, self.dim) = (batch, kv_heads, dim);
        }
        assert!(
            (self.batch, self.kv_heads, self.dim) == (batch, kv_heads, dim),
            "HostKv::append: the batch or head shape changed"
        );
        let total = len + seq;
        if total > self.capacity {
            let capacity = total
                .max(2 * self.capacity)
                .max(MIN_CAPACITY)
                .max(self.reserve);
            let grow = |old: &[f32]| {
                let mut fresh = vec![0f32; batch * kv_heads * capacity * dim];
                for bh in 0..batch * kv_heads {
                    let (src, dst) = (bh * self.capacity * dim, bh * capacity * dim);
                    fresh[dst..dst + len * dim].copy_from_slice(&old[src..src + len * dim]);
                }
                fresh
            };
            self.keys = grow(&self.keys);
            self.values = grow(&self.values);
            self.capacity = capacity;
        }
        let cap = self.capacity;
        for b in 0..batch {
            for t in 0..seq {
                for h in 0..kv_heads {
                    let src = ((b * seq + t) * kv_heads + h) * dim;
                    let dst = ((b * kv_heads + h) * cap + len + t) * dim;
                    self.keys[dst..dst + dim].copy_from_slice(&k[src..src + dim]);
                    self.values[dst..dst + dim].copy_from_slice(&v[src..src + dim]);
                }
            }
        }
    }

    /// Appends the new keys and values `k`, `v` (`[batch, seq, kv_heads, dim]`) after `past`
    /// positions and returns the attention of `q` (`[batch, seq, heads, dim]`) over the cache
    /// ([`crate::kernels::cpu::attention_cached`]).
    pub(crate) fn attend(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        past: usize,
        shape: crate::kernels::AttnShape,
        window: usize,
    ) -> Vec<f32> {
        self.append(past, k, v, shape.batch, shape.kv_heads, shape.dim);
        crate::kernels::cpu::attention_cached(q, self.view(past), shape, window)
    }

    /// The cache as attention reads it, holding `past` positions before the new ones.
    fn view(&self, past: usize) -> crate::kernels::cpu::CachedKv<'_> {
        crate::kernels::cpu::CachedKv {
            keys: &self.keys,
            values: &self.values,
            capacity: self.capacity,
            past,
        }
    }

    /// [`HostKv::attend`] for a batch whose rows have caches of their own (`rows[b]` = row
    /// `b`'s cache and its length; `q`, `k`, `v` as there, `shape.batch` rows of `shape.seq`
    /// tokens): each row's keys and values are appended to its cache, then every (row, head)
    /// attends in one parallel pass ([`HostKv::attend_ragged`] with rows of equal length).
    pub(crate) fn attend_rows(
        rows: &mut [(&mut HostKv, usize)],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: crate::kernels::AttnShape,
        window: usize,
    ) -> Vec<f32> {
        assert_eq!(rows.len(), shape.batch, "one cache per row");
        Self::attend_ragged(rows, &vec![shape.seq; shape.batch], q, k, v, shape, window)
    }

    /// [`HostKv::attend_rows`] for rows of different numbers of new tokens, one after the
    /// other (`q`, `k`, `v` `[tokens, heads, dim]`; row `b` = `lens[b]` tokens continuing
    /// `rows[b]`): [`crate::kernels::cpu::attention_cached_ragged`].
    pub(crate) fn attend_ragged(
        rows: &mut [(&mut HostKv, usize)],
        lens: &[usize],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: crate::kernels::AttnShape,
        window: usize,
    ) -> Vec<f32> {
        assert_eq!(rows.len(), lens.len(), "one cache per row");
        let kvd = shape.kv_heads * shape.dim;
        let mut start = 0;
        for ((cache, past), &len) in rows.iter_mut().zip(lens) {
            let span = start * kvd..(start + len) * kvd;
            cache.append(
                *past,
                &k[span.clone()],
                &v[span],
                1,
                shape.kv_heads,
                shape.dim,
            );
            start += len;
        }
        let views: Vec<_> = rows.iter().map(|(c, past)| c.view(*past)).collect();
        crate::kernels::cpu::attention_cached_ragged(q, &views, lens, shape, window)
    }

    /// Keeps rows `rows` of the batch, in that order.
    fn retain_rows(&mut self, rows: &[usize]) {
        let per_row = self.kv_heads * self.capacity * self.dim;
        let pick = |old: &[f32]| {
            rows.iter()
                .flat_map(|&r| old[r * per_row..(r + 1) * per_row].iter().copied())
                .collect()
        };
        self.keys = pick(&self.keys);
        self.values = pick(&self.values);
        self.batch = rows.len();
    }
}

impl<B: Backend> LayerCache<B> {
    fn capacity(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether the host cache may be used: the tensor cache is unused.
    pub(crate) fn on_host(&self) -> bool {
        self.keys.is_none()
    }

    /// The host cache of this layer, when the tensor cache is unused (a cache is filled by one
    /// path or the other; [`LayerCache::append`] moves host data over if it must take over).
    pub(crate) fn host_mut(&mut self) -> Option<&mut HostKv> {
        if self.keys.is_some() {
            return None;
        }
        let reserve = self.reserve;
        Some(self.host.get_or_insert_with(|| HostKv {
            reserve,
            ..HostKv::default()
        }))
    }

    /// Moves keys and values held in host memory into tensors on `device`.
    fn host_to_tensors(&mut self, device: &B::Device) {
        let Some(h) = self.host.take() else {
            return;
        };
        if h.capacity == 0 {
            return;
        }
        let shape = [h.batch, h.kv_heads, h.capacity, h.dim];
        let t = |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, shape), device);
        self.keys = Some(t(h.keys));
        self.values = Some(t(h.values));
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
        self.host_to_tensors(&k.device());
        let total = len + seq;
        if total > self.capacity() {
            let capacity = total
                .max(2 * self.capacity())
                .max(MIN_CAPACITY)
                .max(self.reserve);
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

    fn retain_rows(&mut self, rows: &Tensor<B, 1, Int>, host_rows: &[usize]) {
        if let Some(h) = &mut self.host {
            h.retain_rows(host_rows);
        }
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
        Self::with_capacity(num_layers, 0)
    }

    /// An empty cache whose buffers, when first written, hold at least `positions` positions
    /// (e.g. the prompt and the most tokens to generate), so appending up to there copies
    /// nothing. Beyond, the buffers grow as [`KvCache::new`]'s do.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        let layer = LayerCache {
            reserve: positions,
            ..LayerCache::default()
        };
        Self {
            layers: vec![layer; num_layers],
            len: 0,
        }
    }

    /// A cache for generating up to `max_new` tokens after a `prompt`-token prompt: it holds the
    /// prompt and up to [`RESERVED_NEW_TOKENS`] of the new tokens from the first write on
    /// ([`KvCache::with_capacity`]), and grows beyond.
    pub fn for_generation(num_layers: usize, prompt: usize, max_new: usize) -> Self {
        Self::with_capacity(num_layers, prompt + max_new.min(RESERVED_NEW_TOKENS))
    }

    /// Positions the buffers hold before they grow (0 before the first write).
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |layer| match &layer.host {
            Some(h) if layer.on_host() => h.capacity,
            _ => layer.capacity(),
        })
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
        let host_rows = rows;
        let rows = Tensor::<B, 1, Int>::from_data(
            burn::tensor::TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            device,
        );
        for layer in &mut self.layers {
            layer.retain_rows(&rows, host_rows);
        }
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}
