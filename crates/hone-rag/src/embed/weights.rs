//! Loading `model.safetensors` of a sentence-transformers directory into [`BertModel`]: strict
//! (a missing or mis-shaped tensor is an error naming it and the file), with unused tensors
//! reported (`pooler.*` and `embeddings.position_ids` are expected to be unused). F32, F16 and
//! BF16 tensors are read as f32; Hugging Face's `[out, in]` linear weights are transposed to
//! burn's `[in, out]`. Checkpoints saved from a task model (`bert.` prefix) and old LayerNorm
//! names (`gamma`/`beta`) are accepted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::bert::{BertConfig, BertModel};
use crate::error::{RagError, Result};

/// The weights file of a sentence-transformers directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

struct Weights<'a> {
    path: PathBuf,
    tensors: SafeTensors<'a>,
    prefix: &'static str,
    used: BTreeSet<String>,
}

impl Weights<'_> {
    fn error(&self, tensor: &str, message: impl Into<String>) -> RagError {
        RagError::EmbedderTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors
            .tensor(&format!("{}{name}", self.prefix))
            .is_ok()
    }

    /// The f32 values of tensor `name`, checked against `shape`.
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .tensors
            .tensor(&full)
            .map_err(|_| self.error(&full, "missing"))?;
        if view.shape() != shape {
            return Err(self.error(
                &full,
                format!("expected shape {shape:?}, found {:?}", view.shape()),
            ));
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(self.error(
                    &full,
                    format!("expected dtype F32, F16 or BF16, found {other:?}"),
                ))
            }
        };
        self.used.insert(full);
        Ok(values)
    }

    fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>> {
        let values = self.read(name, &shape)?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            device,
        )))
    }

    /// `{name}.weight` `[out, in]` (transposed to `[in, out]`) and `{name}.bias` `[out]`.
    fn linear<B: Backend>(
        &mut self,
        linear: &mut Linear<B>,
        name: &str,
        device: &B::Device,
    ) -> Result<()> {
        let [d_in, d_out] = linear.weight.dims();
        let w = self.read(&format!("{name}.weight"), &[d_out, d_in])?;
        let mut t = vec![0.0f32; w.len()];
        for (o, row) in w.chunks_exact(d_in).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                t[i * d_out + o] = x;
            }
        }
        linear.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(t, [d_in, d_out]), device));
        linear.bias = Some(self.tensor(&format!("{name}.bias"), [d_out], device)?);
        Ok(())
    }

    /// `{name}.weight`/`.bias`, or the old `{name}.gamma`/`.beta`.
    fn norm<B: Backend>(
        &mut self,
        norm: &mut LayerNorm<B>,
        name: &str,
        device: &B::Device,
    ) -> Result<()> {
        let [d] = norm.gamma.dims();
        let (w, b) = if !self.has(&format!("{name}.weight")) && self.has(&format!("{name}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        norm.gamma = self.tensor(&format!("{name}.{w}"), [d], device)?;
        norm.beta = Some(self.tensor(&format!("{name}.{b}"), [d], device)?);
        Ok(())
    }
}

/// Reads `dir/model.safetensors` into an encoder of architecture `config`.
pub(crate) fn load_bert<B: Backend>(
    dir: &Path,
    config: &BertConfig,
    device: &B::Device,
) -> Result<BertModel<B>> {
    let path = dir.join(WEIGHTS_FILE);
    let file = std::fs::File::open(&path).map_err(|e| RagError::EmbedderFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    // SAFETY: the map is read-only and dropped before this function returns; hone never writes
    // to a model directory it reads.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| RagError::EmbedderFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let tensors = SafeTensors::deserialize(&mmap).map_err(|e| RagError::EmbedderFile {
        path: path.clone(),
        message: format!("not a safetensors file: {e}"),
    })?;
    let word = "embeddings.word_embeddings.weight";
    let prefix = if tensors.tensor(word).is_err() && tensors.tensor(&format!("bert.{word}")).is_ok()
    {
        "bert."
    } else {
        ""
    };
    let mut w = Weights {
        path: path.clone(),
        tensors,
        prefix,
        used: BTreeSet::new(),
    };
    let mut model = config.init::<B>(device);
    let h = config.hidden_size;
    let e = &mut model.embeddings;
    e.word_embeddings.weight = w.tensor(word, [config.vocab_size, h], device)?;
    e.position_embeddings.weight = w.tensor(
        "embeddings.position_embeddings.weight",
        [config.max_position_embeddings, h],
        device,
    )?;
    e.token_type_embeddings.weight = w.tensor(
        "embeddings.token_type_embeddings.weight",
        [config.type_vocab_size, h],
        device,
    )?;
    w.norm(&mut e.layer_norm, "embeddings.LayerNorm", device)?;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("encoder.layer.{i}");
        // burn field <- checkpoint name (below `encoder.layer.{i}.`)
        w.linear(
            &mut layer.query,
            &format!("{p}.attention.self.query"),
            device,
        )?;
        w.linear(&mut layer.key, &format!("{p}.attention.self.key"), device)?;
        w.linear(
            &mut layer.value,
            &format!("{p}.attention.self.value"),
            device,
        )?;
        w.linear(
            &mut layer.attention_output,
            &format!("{p}.attention.output.dense"),
            device,
        )?;
        w.norm(
            &mut layer.attention_norm,
            &format!("{p}.attention.output.LayerNorm"),
            device,
        )?;
        w.linear(
            &mut layer.intermediate,
            &format!("{p}.intermediate.dense"),
            device,
        )?;
        w.linear(&mut layer.output, &format!("{p}.output.dense"), device)?;
        w.norm(
            &mut layer.output_norm,
            &format!("{p}.output.LayerNorm"),
            device,
        )?;
    }
    let unused: Vec<String> = w
        .tensors
        .names()
        .into_iter()
        .filter(|n| !w.used.contains(*n))
        .map(|n| n.to_string())
        .collect();
    let expected = |n: &str| {
        let n = n.strip_prefix(prefix).unwrap_or(n);
        n.starts_with("pooler.") || n == "embeddings.position_ids"
    };
    let (known, other): (Vec<&String>, Vec<&String>) = unused.iter().partition(|n| expected(n));
    if !other.is_empty() {
        tracing::warn!(file = %path.display(), unused = ?other, "tensors the embedder does not use");
    }
    tracing::debug!(file = %path.display(), unused = ?known, "unused pooler/position id tensors");
    Ok(model)
}
