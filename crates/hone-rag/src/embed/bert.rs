//! A BERT encoder (Devlin et al. 2019) in burn, as Hugging Face's `modeling_bert.py` computes it
//! for `BertModel` with absolute positions and post-layer-norm blocks, followed by
//! sentence-transformers' mean pooling and optional L2 normalisation.
//!
//! Field names are the checkpoint's keys (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.query`, `...attention.output.LayerNorm`,
//! `...intermediate.dense`, `...output.dense`); the loader ([`super::weights`]) maps the dotted
//! names onto these fields in one table. Activations are kept as `[tokens, hidden]` matrices
//! (batch and sequence flattened) so every linear layer is one matrix product.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor};

/// The resolved architecture of a BERT encoder (from Hugging Face's `config.json`).
#[derive(Config, Debug)]
pub struct BertConfig {
    /// Rows of the word embedding table.
    pub vocab_size: usize,
    /// Width of every hidden state (the embedding dimension).
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Attention heads per block; `hidden_size / num_heads` is the head dimension.
    pub num_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position embedding table: the longest sequence.
    pub max_position_embeddings: usize,
    /// Rows of the token type (segment) embedding table.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

fn embedding<B: Backend>(rows: usize, dim: usize, device: &B::Device) -> Embedding<B> {
    EmbeddingConfig::new(rows, dim)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

impl BertConfig {
    /// A zero-initialised encoder, to be filled by the loader.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BertModel<B> {
        let norm = || {
            LayerNormConfig::new(self.hidden_size)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let h = self.hidden_size;
        BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: embedding(self.vocab_size, h, device),
                position_embeddings: embedding(self.max_position_embeddings, h, device),
                token_type_embeddings: embedding(self.type_vocab_size, h, device),
                layer_norm: norm(),
            },
            layers: (0..self.num_layers)
                .map(|_| BertLayer {
                    query: linear(h, h, device),
                    key: linear(h, h, device),
                    value: linear(h, h, device),
                    attention_output: linear(h, h, device),
                    attention_norm: norm(),
                    intermediate: linear(h, self.intermediate_size, device),
                    output: linear(self.intermediate_size, h, device),
                    output_norm: norm(),
                    num_heads: self.num_heads,
                })
                .collect(),
        }
    }
}

/// Word + position + token type embeddings, then LayerNorm.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// `[vocab_size, hidden]`
    pub(crate) word_embeddings: Embedding<B>,
    /// `[max_position_embeddings, hidden]`
    pub(crate) position_embeddings: Embedding<B>,
    /// `[type_vocab_size, hidden]`
    pub(crate) token_type_embeddings: Embedding<B>,
    /// `embeddings.LayerNorm`
    pub(crate) layer_norm: LayerNorm<B>,
}

/// One post-LN transformer block. Linear weights are `[in, out]` (burn's layout; the loader
/// transposes Hugging Face's `[out, in]`).
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// `attention.self.query`
    pub(crate) query: Linear<B>,
    /// `attention.self.key`
    pub(crate) key: Linear<B>,
    /// `attention.self.value`
    pub(crate) value: Linear<B>,
    /// `attention.output.dense`
    pub(crate) attention_output: Linear<B>,
    /// `attention.output.LayerNorm`
    pub(crate) attention_norm: LayerNorm<B>,
    /// `intermediate.dense`
    pub(crate) intermediate: Linear<B>,
    /// `output.dense`
    pub(crate) output: Linear<B>,
    /// `output.LayerNorm`
    pub(crate) output_norm: LayerNorm<B>,
    pub(crate) num_heads: usize,
}

/// The encoder: embeddings and `num_layers` blocks (no pooler: sentence-transformers does not
/// use it).
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    pub(crate) embeddings: BertEmbeddings<B>,
    pub(crate) layers: Vec<BertLayer<B>>,
}

/// One padded batch of token ids.
pub struct BertInput<B: Backend> {
    /// `[batch, seq]`
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`
    pub token_type_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`: 1.0 on tokens, 0.0 on padding.
    pub attention_mask: Tensor<B, 2>,
}

impl<B: Backend> BertLayer<B> {
    /// `x`: `[batch * seq, hidden]`; `pad`: `[batch, heads, seq, seq]`, true on padded keys.
    /// Returns `[batch * seq, hidden]`.
    fn forward(&self, x: Tensor<B, 2>, pad: Tensor<B, 4, Bool>, batch: usize) -> Tensor<B, 2> {
        let [tokens, hidden] = x.dims();
        let seq = tokens / batch;
        let heads = self.num_heads;
        let split = |t: Tensor<B, 2>| {
            t.reshape([batch, seq, heads, hidden / heads])
                .swap_dims(1, 2)
        };
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let context = attention(q, k, v, Some(pad), None, AttentionModuleOptions::default())
            .swap_dims(1, 2)
            .reshape([tokens, hidden]);
        let x = self
            .attention_norm
            .forward(self.attention_output.forward(context) + x);
        let inner = gelu(self.intermediate.forward(x.clone()));
        self.output_norm.forward(self.output.forward(inner) + x)
    }
}

impl<B: Backend> BertModel<B> {
    /// The last hidden states of a batch: `[batch * seq, hidden]`.
    pub fn forward(&self, input: &BertInput<B>) -> Tensor<B, 2> {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let e = &self.embeddings;
        let hidden = e.word_embeddings.weight.dims()[1];
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device);
        let position = e
            .position_embeddings
            .weight
            .val()
            .select(0, positions)
            .unsqueeze_dim::<3>(0);
        let x = e.word_embeddings.forward(input.input_ids.clone())
            + e.token_type_embeddings
                .forward(input.token_type_ids.clone())
            + position;
        let mut x = e.layer_norm.forward(x).reshape([batch * seq, hidden]);
        let heads = self.layers.first().map_or(1, |l| l.num_heads);
        let pad = input
            .attention_mask
            .clone()
            .lower_elem(0.5)
            .reshape([batch, 1, 1, seq])
            .expand([batch, heads, seq, seq]);
        for layer in &self.layers {
            x = layer.forward(x, pad.clone(), batch);
        }
        x
    }

    /// Sentence embeddings `[batch, hidden]`: the mean of the last hidden states over the
    /// tokens (padding excluded), L2-normalised when `normalize`.
    pub fn embed(&self, input: &BertInput<B>, normalize: bool) -> Tensor<B, 2> {
        let [batch, seq] = input.input_ids.dims();
        let states = self.forward(input);
        let hidden = states.dims()[1];
        let mask = input.attention_mask.clone().reshape([batch, seq, 1]);
        let sum = (states.reshape([batch, seq, hidden]) * mask.clone()).sum_dim(1);
        let count = mask.sum_dim(1).clamp_min(1e-9);
        let mean = (sum / count).reshape([batch, hidden]);
        if !normalize {
            return mean;
        }
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        mean / norm
    }
}
