//! Serving several sequences at once: every row has its own KV cache (of any length) and may use
//! a different LoRA adapter. The projections run as one batched matrix product over all rows;
//! each adapter's low-rank delta is added to the rows that selected it; attention runs per row
//! against that row's cache. A row computes exactly what it would compute alone.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, TensorData};

use crate::adapter::AdapterInfo;
use crate::cache::KvCache;
use crate::error::Result;
use crate::model::{apply_rope, CausalLm, Linear, RopeTables};

/// Which rows use which adapter slot, grouped by slot.
#[derive(Debug, Clone)]
pub struct RowAdapters<B: Backend> {
    /// `(slot, row indices)`: the indices on the device for `select`, and the same indices on
    /// the host so that expanding them per position never reads a tensor back.
    groups: Vec<(usize, Tensor<B, 1, Int>)>,
    host: Vec<Vec<i64>>,
}

impl<B: Backend> RowAdapters<B> {
    /// From one entry per row: `Some(slot)` or `None` for the base model.
    pub fn new(per_row: &[Option<usize>], device: &B::Device) -> Self {
        let mut by_slot: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for (row, slot) in per_row.iter().enumerate() {
            if let Some(slot) = slot {
                by_slot.entry(*slot).or_default().push(row as i64);
            }
        }
        Self::from_host(by_slot.into_iter().collect(), device)
    }

    fn from_host(host: Vec<(usize, Vec<i64>)>, device: &B::Device) -> Self {
        let groups = host
            .iter()
            .map(|(slot, rows)| {
                let n = rows.len();
                (
                    *slot,
                    Tensor::from_data(TensorData::new(rows.clone(), [n]), device),
                )
            })
            .collect();
        Self {
            groups,
            host: host.into_iter().map(|(_, rows)| rows).collect(),
        }
    }
}

impl<B: Backend> Linear<B> {
    /// `x`: `[rows, in]`: the base projection for every row, plus each selected adapter's delta
    /// on its rows.
    pub fn forward_rows(&self, x: Tensor<B, 2>, rows: &RowAdapters<B>) -> Tensor<B, 2> {
        let mut y = self.forward(x.clone());
        for (slot, idx) in &rows.groups {
            if let Some(Some(lora)) = self.bank.get(*slot) {
                let delta = lora.delta(x.clone().select(0, idx.clone()));
                y = y.select_assign(0, idx.clone(), delta, IndexingUpdateOp::Add);
            }
        }
        y
    }
}

impl<B: Backend> CausalLm<B> {
    /// Loads the PEFT adapter in `dir` into bank slot `slot` (replacing what was there), leaving
    /// the model's own adapter and the other slots untouched.
    pub fn load_adapter_slot(&mut self, dir: &Path, slot: usize) -> Result<AdapterInfo> {
        // Load into the `lora` fields, then move them into the bank.
        let saved: Vec<_> = self
            .projections_mut()
            .into_iter()
            .map(|(_, l)| l.lora.take())
            .collect();
        let result = self.load_adapter(dir);
        for ((_, linear), own) in self.projections_mut().into_iter().zip(saved) {
            let loaded = std::mem::replace(&mut linear.lora, own);
            if result.is_ok() {
                if linear.bank.len() <= slot {
                    linear.bank.resize_with(slot + 1, || None);
                }
                linear.bank[slot] = loaded;
            }
        }
        result
    }

    /// Empties bank slot `slot`.
    pub fn unload_adapter_slot(&mut self, slot: usize) {
        for (_, linear) in self.projections_mut() {
            if let Some(entry) = linear.bank.get_mut(slot) {
                *entry = None;
            }
        }
    }

    /// One step for several sequences: `tokens` `[rows, seq]` (the same number of new tokens per
    /// row: a prompt for one row, or one token for each of many rows), each row continuing its
    /// own cache `caches[row]` with the adapter `adapters[row]`. Returns the logits of each
    /// row's last new position, `[rows, vocab]`.
    pub fn forward_step(
        &self,
        tokens: Tensor<B, 2, Int>,
        caches: &mut [&mut KvCache<B>],
        adapters: &[Option<usize>],
    ) -> Tensor<B, 2> {
        let [n, seq] = tokens.dims();
        assert_eq!(caches.len(), n, "one cache per row");
        assert_eq!(adapters.len(), n, "one adapter choice per row");
        let device = tokens.device();
        let rows = RowAdapters::new(adapters, &device);
        let c = &self.config;
        let (h, kvh, d, hidden) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size);
        // Per-row RoPE tables: positions continue each row's cache.
        let ropes: Vec<RopeTables<B>> = caches
            .iter()
            .map(|cache| self.rope_tables(cache.len(), seq, &device))
            .collect();
        let mut x = self.embed(tokens).reshape([n * seq, hidden]);
        for (li, layer) in self.model.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let normed = layer
                .input_layernorm
                .forward(x.clone().reshape([n, seq, hidden]));
            let normed = normed.reshape([n * seq, hidden]);
            let row_rows = expand_rows(&rows, seq, &device);
            let q = a
                .q_proj
                .forward_rows(normed.clone(), &row_rows)
                .reshape([n, seq, h, d]);
            let k = a
                .k_proj
                .forward_rows(normed.clone(), &row_rows)
                .reshape([n, seq, kvh, d]);
            let v = a
                .v_proj
                .forward_rows(normed, &row_rows)
                .reshape([n, seq, kvh, d]);
            let mut outs = Vec::with_capacity(n);
            for (r, cache) in caches.iter_mut().enumerate() {
                let q = apply_rope(q.clone().narrow(0, r, 1), &ropes[r]).swap_dims(1, 2);
                let k = apply_rope(k.clone().narrow(0, r, 1), &ropes[r]).swap_dims(1, 2);
                let v = v.clone().narrow(0, r, 1).swap_dims(1, 2);
                outs.push(a.attend(q, k, v, Some(cache.layer_mut(li)), None));
            }
            let attn = Tensor::cat(outs, 0).reshape([n * seq, h * d]);
            let x1 = x + a.o_proj.forward_rows(attn, &row_rows);
            let normed = layer
                .post_attention_layernorm
                .forward(x1.clone().reshape([n, seq, hidden]))
                .reshape([n * seq, hidden]);
            let m = &layer.mlp;
            let gate =
                burn::tensor::activation::silu(m.gate_proj.forward_rows(normed.clone(), &row_rows));
            let up = m.up_proj.forward_rows(normed, &row_rows);
            x = x1 + m.down_proj.forward_rows(gate * up, &row_rows);
        }
        for cache in caches.iter_mut() {
            cache.advance(seq);
        }
        let last = self
            .model
            .norm
            .forward(x.reshape([n, seq, hidden]))
            .narrow(1, seq - 1, 1);
        self.logits(last).reshape([n, c.vocab_size])
    }
}

/// Row groups over `[rows * seq]` flattened positions (each row's `seq` positions share its
/// adapter).
fn expand_rows<B: Backend>(
    rows: &RowAdapters<B>,
    seq: usize,
    device: &B::Device,
) -> RowAdapters<B> {
    if seq == 1 {
        return rows.clone();
    }
    let host = rows
        .groups
        .iter()
        .zip(&rows.host)
        .map(|((slot, _), idx)| {
            let flat: Vec<i64> = idx
                .iter()
                .flat_map(|&r| (0..seq as i64).map(move |s| r * seq as i64 + s))
                .collect();
            (*slot, flat)
        })
        .collect();
    RowAdapters::from_host(host, device)
}
