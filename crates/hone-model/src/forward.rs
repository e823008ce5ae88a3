//! The one way into the model: [`CausalLm::forward`] with an [`Input`] that describes the pass.
//!
//! Every caller builds an `Input` from token ids `[batch, seq]` and says what differs from the
//! plain case (all defaults = a causal pass over fresh sequences, the model's own adapter,
//! logits of every position):
//!
//! - **positions** ([`Positions`]): continuing each row's cache (default), or one position per
//!   token (packed rows restart at each example; left-padded rows start at their first token);
//! - **visibility** ([`Visibility`]): causal (sliding window where a layer has one), packed
//!   segments, left padding, or an explicit mask;
//! - **cache** ([`Cache`]): none, one [`KvCache`] for the batch, or one per row (serving: rows
//!   of different lengths in one step);
//! - **adapters** ([`Adapters`]): one slot for every row (slot [`OWN_SLOT`], the model's own,
//!   by default), or a slot per row (serving several adapters in one batch);
//! - **output** ([`Output`]): hidden states (after the final norm) or logits, of every position
//!   or of the last one.
//!
//! Training, packed training, recomputation, evaluation, generation and batched serving all run
//! the same layer body ([`crate::model::DecoderLayer`]). RoPE tables come from the model's
//! [`RopeCache`](crate::rope::RopeCache) (built once, sliced per call); the KV cache is written
//! in place ([`crate::cache`]).

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::cache::KvCache;
use crate::kernels::{KernelBackend, RopeHost, RopeTables};
use crate::model::{CausalLm, LayerCacheMut, LayerContext, OWN_SLOT};

/// Where each token sits, for RoPE.
#[derive(Debug, Clone, Default)]
pub enum Positions {
    /// Row `r`'s tokens continue its cache: `len(r), len(r) + 1, ...` (`0, 1, ...` without one).
    #[default]
    Continue,
    /// One position per token, `[batch * seq]` row-major.
    PerToken(Vec<u32>),
}

/// Which keys each query sees, besides the future being hidden.
#[derive(Debug, Clone)]
pub enum Visibility<B: Backend> {
    /// Every earlier key (within a layer's sliding window).
    Causal,
    /// Packed rows: one segment id per token (`[batch * seq]`, row-major); a token sees earlier
    /// tokens of its own segment only. Not with a cache.
    Segments(Vec<u32>),
    /// Left-padded rows: row `r`'s first `pads[r]` key slots (cached ones included) are hidden;
    /// a padding query sees itself only, so no softmax row is empty.
    LeftPadding(Vec<usize>),
    /// An explicit mask `[batch, 1, seq, keys]` (true = hidden; keys = cached + new) that
    /// replaces the causal and sliding-window masks.
    Mask(Tensor<B, 4, Bool>),
}

/// Which adapter each row runs with.
#[derive(Debug, Clone)]
pub enum Adapters {
    /// The adapter in this slot for every row (none when the slot is empty).
    Slot(usize),
    /// One choice per row: a slot, or `None` for the base model.
    PerRow(Vec<Option<usize>>),
}

impl Default for Adapters {
    fn default() -> Self {
        Adapters::Slot(OWN_SLOT)
    }
}

/// What the pass returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Output {
    /// Hidden states after the final norm, `[batch, seq, hidden]`.
    Hidden,
    /// Vocabulary logits, `[batch, seq, vocab]`.
    #[default]
    Logits,
    /// Hidden states of the last position, `[batch, 1, hidden]`.
    LastHidden,
    /// Logits of the last position, `[batch, 1, vocab]`.
    LastLogits,
}

/// The KV cache a pass reads and extends.
#[derive(Debug)]
pub enum Cache<'a, B: Backend> {
    None,
    /// One cache for the batch (its rows advance together).
    Batch(&'a mut KvCache<B>),
    /// One cache per row, each of its own length.
    PerRow(&'a mut [&'a mut KvCache<B>]),
    /// Rows of different numbers of new tokens (`lens`), one after the other in `ids` `[1,
    /// tokens]`, each continuing its own cache (serving: a step that decodes some rows and
    /// prefills a chunk of others). Adapters per row and the last position's output are those
    /// of the rows (outputs `[rows, 1, ..]`); every-position outputs are `[1, tokens, ..]`.
    Ragged(&'a mut [&'a mut KvCache<B>], Vec<usize>),
}

/// The description of one forward pass (see the module docs).
#[derive(Debug)]
pub struct Input<'a, B: Backend> {
    pub ids: Tensor<B, 2, Int>,
    pub positions: Positions,
    pub visibility: Visibility<B>,
    pub cache: Cache<'a, B>,
    pub adapters: Adapters,
    pub output: Output,
}

impl<'a, B: Backend> Input<'a, B> {
    /// A causal pass over `ids` `[batch, seq]` returning every position's logits.
    pub fn new(ids: Tensor<B, 2, Int>) -> Self {
        Self {
            ids,
            positions: Positions::Continue,
            visibility: Visibility::Causal,
            cache: Cache::None,
            adapters: Adapters::default(),
            output: Output::Logits,
        }
    }

    /// Packed rows: positions restart at each example and attention never crosses examples
    /// (both `[batch * seq]`, row-major).
    pub fn packed(mut self, positions: &[u32], segments: &[u32]) -> Self {
        self.positions = Positions::PerToken(positions.to_vec());
        self.visibility = Visibility::Segments(segments.to_vec());
        self
    }

    /// One position per token (`[batch * seq]`, row-major).
    pub fn positions(mut self, positions: Vec<u32>) -> Self {
        self.positions = Positions::PerToken(positions);
        self
    }

    /// Left-padded rows (see [`Visibility::LeftPadding`]).
    pub fn left_padding(mut self, pads: Vec<usize>) -> Self {
        self.visibility = Visibility::LeftPadding(pads);
        self
    }

    /// An explicit attention mask (see [`Visibility::Mask`]).
    pub fn mask(mut self, mask: Tensor<B, 4, Bool>) -> Self {
        self.visibility = Visibility::Mask(mask);
        self
    }

    /// Continue (and extend) one cache for the whole batch.
    pub fn cache(mut self, cache: &'a mut KvCache<B>) -> Self {
        self.cache = Cache::Batch(cache);
        self
    }

    /// Continue (and extend) one cache per row.
    pub fn row_caches(mut self, caches: &'a mut [&'a mut KvCache<B>]) -> Self {
        self.cache = Cache::PerRow(caches);
        self
    }

    /// Rows of different lengths one after the other (`ids` `[1, lens.iter().sum()]`), row `b`
    /// continuing `caches[b]` (see [`Cache::Ragged`]).
    pub fn ragged_caches(mut self, caches: &'a mut [&'a mut KvCache<B>], lens: Vec<usize>) -> Self {
        self.cache = Cache::Ragged(caches, lens);
        self
    }

    /// Run every row with the adapter in `slot`.
    pub fn adapter_slot(mut self, slot: usize) -> Self {
        self.adapters = Adapters::Slot(slot);
        self
    }

    /// Run each row with its own adapter slot (`None`: the base model).
    pub fn adapters_per_row(mut self, slots: Vec<Option<usize>>) -> Self {
        self.adapters = Adapters::PerRow(slots);
        self
    }

    /// Return `[batch, seq, hidden]` hidden states after the final norm.
    pub fn hidden(mut self) -> Self {
        self.output = Output::Hidden;
        self
    }

    /// Return the last position's logits, `[batch, 1, vocab]`.
    pub fn last_logits(mut self) -> Self {
        self.output = Output::LastLogits;
        self
    }

    /// Return the last position's hidden state, `[batch, 1, hidden]`.
    pub fn last_hidden(mut self) -> Self {
        self.output = Output::LastHidden;
        self
    }
}

/// Which adapter slot the projections add, for the rows of a pass.
#[derive(Debug, Clone)]
pub(crate) enum Selection<B: Backend> {
    /// The same slot for every row.
    Slot(usize),
    /// Flattened row indices (`[batch * seq]` positions) grouped by slot.
    Rows(Vec<(usize, Tensor<B, 1, Int>)>),
}

impl<B: Backend> Selection<B> {
    /// The selection of rows of `rows[b]` tokens each, one after the other (rows of equal
    /// length: [`Selection::new`]): the flattened token indices of each slot's rows.
    fn ragged(adapters: &Adapters, rows: &[usize], device: &B::Device) -> Self {
        match adapters {
            Adapters::Slot(slot) => Selection::Slot(*slot),
            Adapters::PerRow(per_row) => {
                assert_eq!(per_row.len(), rows.len(), "one adapter choice per row");
                let mut starts = Vec::with_capacity(rows.len());
                let mut start = 0;
                for &n in rows {
                    starts.push(start);
                    start += n;
                }
                let mut slots: Vec<usize> = per_row.iter().flatten().copied().collect();
                slots.sort_unstable();
                slots.dedup();
                let groups = slots
                    .into_iter()
                    .map(|slot| {
                        let idx: Vec<i64> = per_row
                            .iter()
                            .zip(starts.iter().zip(rows))
                            .filter(|(s, _)| **s == Some(slot))
                            .flat_map(|(_, (&s, &n))| (s..s + n).map(|t| t as i64))
                            .collect();
                        let n = idx.len();
                        (slot, Tensor::from_data(TensorData::new(idx, [n]), device))
                    })
                    .collect();
                Selection::Rows(groups)
            }
        }
    }

    fn new(adapters: &Adapters, batch: usize, seq: usize, device: &B::Device) -> Self {
        Self::ragged(adapters, &vec![seq; batch], device)
    }
}

/// What a pass computes before its first layer.
pub(crate) struct Prepared<B: Backend> {
    /// Token embeddings `[batch, seq, hidden]`.
    pub(crate) x: Tensor<B, 3>,
    pub(crate) rope: RopeTables<B>,
    /// The mask of each layer (`None`: causal, with the layer's window).
    pub(crate) masks: Vec<Option<Tensor<B, 4, Bool>>>,
    pub(crate) select: Selection<B>,
}

impl<B: KernelBackend> CausalLm<B> {
    /// Runs the model on `input` (see [`crate::forward`]): the single entry point of every
    /// forward pass. With a cache, the cache is extended by the pass's tokens.
    ///
    /// Panics when the description is inconsistent (position, segment, padding or adapter
    /// lists of the wrong length; segments or left padding with per-row caches; segments
    /// with a cache): those are programming errors of the caller, not input data.
    pub fn forward(&self, input: Input<'_, B>) -> Tensor<B, 3> {
        let Input {
            ids,
            positions,
            visibility,
            cache,
            adapters,
            output,
        } = input;
        let [batch, seq] = ids.dims();
        let lens: Vec<usize> = match &cache {
            Cache::None => vec![0; batch],
            Cache::Batch(c) => vec![c.len(); batch],
            Cache::PerRow(caches) => {
                assert_eq!(caches.len(), batch, "one cache per row");
                assert!(
                    matches!(visibility, Visibility::Causal | Visibility::Mask(_)),
                    "per-row caches take causal attention or an explicit mask"
                );
                caches.iter().map(|c| c.len()).collect()
            }
            Cache::Ragged(caches, rows) => {
                assert_eq!(caches.len(), rows.len(), "one cache per row");
                assert!(
                    batch == 1 && rows.iter().sum::<usize>() == seq && !rows.contains(&0),
                    "ragged rows: ids must be [1, tokens] with rows of 1 or more tokens"
                );
                assert!(
                    matches!(visibility, Visibility::Causal),
                    "ragged rows take causal attention"
                );
                vec![0]
            }
        };
        let past = match &cache {
            Cache::Batch(c) => c.len(),
            _ => 0,
        };
        // Ragged rows: each row's positions continue its cache, adapters are chosen per row's
        // tokens, and "the last position" is each row's last token.
        let (positions, adapters, ragged) = match (&cache, positions) {
            (Cache::Ragged(caches, rows), positions) => {
                let positions = match positions {
                    Positions::Continue => Positions::PerToken(
                        caches
                            .iter()
                            .zip(rows)
                            .flat_map(|(c, &n)| (c.len()..c.len() + n).map(|p| p as u32))
                            .collect(),
                    ),
                    given => given,
                };
                let select = Selection::ragged(&adapters, rows, &ids.device());
                let mut end = 0;
                let last: Vec<i64> = rows
                    .iter()
                    .map(|&n| {
                        end += n;
                        (end - 1) as i64
                    })
                    .collect();
                (positions, Adapters::Slot(OWN_SLOT), Some((select, last)))
            }
            (_, positions) => (positions, adapters, None),
        };
        let prepared = self.prepare(ids, positions, &visibility, &adapters, &lens, past);
        let Prepared {
            mut x,
            rope,
            masks,
            mut select,
        } = prepared;
        let last_rows = ragged.map(|(ragged_select, last)| {
            select = ragged_select;
            last
        });
        let ctx = LayerContext {
            rope: &rope,
            select: &select,
            kernels: self.kernels,
        };
        #[allow(clippy::unused_enumerate_index)] // the cached arms use the index
        let layers = self.model.layers.iter().zip(&masks).enumerate();
        match cache {
            Cache::None => {
                for (_, (layer, mask)) in layers {
                    x = layer.forward(x, &ctx, mask.as_ref(), LayerCacheMut::None);
                }
            }
            Cache::Batch(cache) => {
                for (i, (layer, mask)) in layers {
                    let slot = LayerCacheMut::Batch(cache.layer_mut(i), past);
                    x = layer.forward(x, &ctx, mask.as_ref(), slot);
                }
                cache.advance(seq);
            }
            Cache::PerRow(caches) => {
                for (i, (layer, mask)) in layers {
                    let rows = caches
                        .iter_mut()
                        .map(|c| {
                            let len = c.len();
                            (c.layer_mut(i), len)
                        })
                        .collect();
                    x = layer.forward(x, &ctx, mask.as_ref(), LayerCacheMut::Rows(rows));
                }
                for c in caches.iter_mut() {
                    c.advance(seq);
                }
            }
            Cache::Ragged(caches, rows) => {
                for (i, (layer, mask)) in layers {
                    let per_row = caches
                        .iter_mut()
                        .map(|c| {
                            let len = c.len();
                            (c.layer_mut(i), len)
                        })
                        .collect();
                    let slot = LayerCacheMut::Ragged(per_row, &rows);
                    x = layer.forward(x, &ctx, mask.as_ref(), slot);
                }
                for (c, &n) in caches.iter_mut().zip(&rows) {
                    c.advance(n);
                }
            }
        }
        let last = |x: Tensor<B, 3>| match &last_rows {
            None => x.narrow(1, seq - 1, 1),
            Some(rows) => {
                let hidden = x.dims()[2];
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(rows.clone(), [rows.len()]),
                    &x.device(),
                );
                x.reshape([seq, hidden])
                    .select(0, idx)
                    .reshape([rows.len(), 1, hidden])
            }
        };
        match output {
            Output::Hidden => self.norm(x),
            Output::Logits => self.logits(self.norm(x)),
            Output::LastHidden => self.norm(last(x)),
            Output::LastLogits => self.logits(self.norm(last(x))),
        }
    }

    /// Embeddings, RoPE tables, per-layer masks and the adapter selection of a pass whose rows
    /// hold `lens` cached positions (`past` when they share one cache).
    pub(crate) fn prepare(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: Positions,
        visibility: &Visibility<B>,
        adapters: &Adapters,
        lens: &[usize],
        past: usize,
    ) -> Prepared<B> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = match positions {
            Positions::Continue => lens
                .iter()
                .flat_map(|&len| (len..len + seq).map(|p| p as u32))
                .collect(),
            Positions::PerToken(p) => {
                assert_eq!(
                    p.len(),
                    batch * seq,
                    "positions must have batch * seq entries"
                );
                p
            }
        };
        let rope = self.rope_tables(&positions, batch, seq, &device);
        let masks = self.layer_masks(visibility, batch, seq, past, &device);
        Prepared {
            x: self.embed(ids),
            rope,
            masks,
            select: Selection::new(adapters, batch, seq, &device),
        }
    }

    /// The mask of every layer (built once per distinct sliding window).
    fn layer_masks(
        &self,
        visibility: &Visibility<B>,
        batch: usize,
        seq: usize,
        past: usize,
        device: &B::Device,
    ) -> Vec<Option<Tensor<B, 4, Bool>>> {
        let build = |window: usize| -> Option<Tensor<B, 4, Bool>> {
            match visibility {
                Visibility::Causal => None,
                Visibility::Mask(m) => Some(m.clone()),
                Visibility::Segments(segments) => {
                    assert_eq!(past, 0, "packed rows (segments) do not continue a cache");
                    assert_eq!(
                        segments.len(),
                        batch * seq,
                        "segment_ids must have batch * seq entries"
                    );
                    Some(segment_mask::<B>(segments, batch, seq, window, device))
                }
                Visibility::LeftPadding(pads) => {
                    assert_eq!(pads.len(), batch, "one padding length per row");
                    // Without padding the causal (and sliding-window) masking is exact, and
                    // the unmasked paths are faster.
                    pads.iter()
                        .any(|&p| p > 0)
                        .then(|| padding_mask::<B>(pads, seq, past + seq, window, device))
                }
            }
        };
        let mut built: Vec<(usize, Option<Tensor<B, 4, Bool>>)> = Vec::new();
        self.model
            .layers
            .iter()
            .map(|layer| {
                let window = layer.window();
                if let Some((_, m)) = built.iter().find(|(w, _)| *w == window) {
                    return m.clone();
                }
                let m = build(window);
                built.push((window, m.clone()));
                m
            })
            .collect()
    }

    /// Token embeddings: `[batch, seq]` ids -> `[batch, seq, hidden]`.
    pub(crate) fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        self.model
            .embed_tokens
            .val()
            .select(0, input_ids.reshape([batch * seq]))
            .reshape([batch, seq, self.config.hidden_size])
    }

    /// Projects hidden states to vocabulary logits: `[batch, seq, hidden]` -> `[batch, seq, vocab]`.
    /// (The output projection alone, for callers that pick positions of hidden states first.)
    /// The final norm of hidden states `[batch, seq, hidden]`.
    pub(crate) fn norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.model.norm.forward(x, self.kernels)
    }

    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match (&self.lm_head, &self.tied_head) {
            (Some(head), _) => head.forward(hidden, &Selection::Slot(OWN_SLOT), self.kernels),
            (None, Some(q)) => {
                let [b, s, h] = hidden.dims();
                B::quant_linear(hidden.reshape([b * s, h]), q).reshape([
                    b,
                    s,
                    self.config.vocab_size,
                ])
            }
            (None, None) => {
                let [b, s, h] = hidden.dims();
                let x = hidden.reshape([b * s, h]);
                B::dense_linear(x, self.model.embed_tokens.val()).reshape([
                    b,
                    s,
                    self.config.vocab_size,
                ])
            }
        }
    }

    /// Cos/sin tables `[batch, seq, 1, rotary_dim]` for per-token positions, sliced from the
    /// model's tables.
    pub(crate) fn rope_tables(
        &self,
        positions: &[u32],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let max = positions.iter().copied().max().unwrap_or(0) as usize;
        let tables = self.rope.rows(max + 1);
        let dim = self.rope.dim();
        let dtype = self.dtype();
        let rows = |table: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(positions.len() * dim);
            for &p in positions {
                let p = p as usize;
                out.extend_from_slice(&table[p * dim..(p + 1) * dim]);
            }
            out
        };
        let device_table = |values: Vec<f32>| {
            let t = Tensor::<B, 2>::from_data(TensorData::new(values, [batch * seq, dim]), device);
            let t = if dtype != DType::F32 {
                t.cast(dtype)
            } else {
                t
            };
            t.reshape([batch, seq, 1, dim])
        };
        let (cos, sin) = (rows(&tables.cos), rows(&tables.sin));
        let host = self.kernels.fused::<B>(dtype).then(|| {
            Arc::new(RopeHost {
                cos: cos.clone(),
                sin: sin.clone(),
                rot: dim,
            })
        });
        RopeTables {
            cos: device_table(cos),
            sin: device_table(sin),
            host,
        }
    }
}

/// Block-diagonal causal mask `[batch, 1, seq, seq]` (true = masked): query `q` sees key `k`
/// only when `k <= q`, both have the same segment id and (with a window) `q - k < window`.
fn segment_mask<B: Backend>(
    segments: &[u32],
    batch: usize,
    seq: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mut data = vec![true; batch * seq * seq];
    for b in 0..batch {
        let row = &segments[b * seq..(b + 1) * seq];
        for q in 0..seq {
            for k in 0..=q {
                let visible = row[k] == row[q] && (window == 0 || q - k < window);
                data[(b * seq + q) * seq + k] = !visible;
            }
        }
    }
    Tensor::<B, 3, Bool>::from_data(TensorData::new(data, [batch, seq, seq]), device)
        .unsqueeze_dim(1)
}

/// Mask `[batch, 1, seq, total]` (true = hidden) for queries at slots `total - seq..total`:
/// a query sees the non-padding keys at or before it (within `window` when non-zero), and
/// always itself.
fn padding_mask<B: Backend>(
    pads: &[usize],
    seq: usize,
    total: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let batch = pads.len();
    let offset = total - seq;
    let mut data = vec![true; batch * seq * total];
    for (b, &pad) in pads.iter().enumerate() {
        for i in 0..seq {
            let q = offset + i;
            for k in 0..=q {
                let visible = k == q || (k >= pad && (window == 0 || q - k < window));
                data[(b * seq + i) * total + k] = !visible;
            }
        }
    }
    Tensor::<B, 3, Bool>::from_data(TensorData::new(data, [batch, seq, total]), device)
        .unsqueeze_dim(1)
}
