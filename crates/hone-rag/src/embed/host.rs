//! The BERT encoder of [`super::bert`] run on host memory with the `gemm` crate, for speed: the
//! same arithmetic (post-LN blocks, exact GELU, mean pooling) without a tensor framework's
//! per-operation cost, and without padding. A batch's sequences are packed one after another as
//! `[tokens, hidden]` rows, every linear layer is one matrix product over all of them (query,
//! key and value as one), and attention runs per sequence and head over that sequence's own
//! tokens only, so a short text next to a long one costs nothing extra.
//!
//! The weights are copied out of the burn module the loader filled ([`HostBert::from_model`]),
//! so that the checkpoint is read and checked in one place ([`super::weights`]).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::bert::{BertConfig, BertModel};

/// `[in, out]` weight and `[out]` bias of one linear layer.
struct HostLinear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

struct HostNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct HostLayer {
    /// Query, key and value side by side: `[hidden, 3 * hidden]`.
    qkv: HostLinear,
    attention_output: HostLinear,
    attention_norm: HostNorm,
    intermediate: HostLinear,
    output: HostLinear,
    output_norm: HostNorm,
}

/// A BERT encoder in host memory.
pub(crate) struct HostBert {
    hidden: usize,
    heads: usize,
    eps: f32,
    /// `[vocab, hidden]`
    word: Vec<f32>,
    /// `[positions, hidden]`
    position: Vec<f32>,
    /// Row 0 of the token type table (every token is of type 0).
    token_type: Vec<f32>,
    norm: HostNorm,
    layers: Vec<HostLayer>,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .expect("embedder weights are f32")
}

fn linear<B: Backend>(l: &burn::nn::Linear<B>) -> HostLinear {
    let [d_in, d_out] = l.weight.val().dims();
    HostLinear {
        weight: values(l.weight.val()),
        bias: l
            .bias
            .as_ref()
            .map_or_else(|| vec![0.0; d_out], |b| values(b.val())),
        d_in,
        d_out,
    }
}

fn norm<B: Backend>(n: &burn::nn::LayerNorm<B>) -> HostNorm {
    let gamma = values(n.gamma.val());
    let beta = n
        .beta
        .as_ref()
        .map_or_else(|| vec![0.0; gamma.len()], |b| values(b.val()));
    HostNorm { gamma, beta }
}

/// Query, key and value as one `[hidden, 3 * hidden]` layer.
fn concat_columns(parts: [HostLinear; 3]) -> HostLinear {
    let d_in = parts[0].d_in;
    let d_out: usize = parts.iter().map(|p| p.d_out).sum();
    let mut weight = Vec::with_capacity(d_in * d_out);
    for r in 0..d_in {
        for p in &parts {
            weight.extend_from_slice(&p.weight[r * p.d_out..(r + 1) * p.d_out]);
        }
    }
    let bias = parts.iter().flat_map(|p| p.bias.iter().copied()).collect();
    HostLinear {
        weight,
        bias,
        d_in,
        d_out,
    }
}

impl HostBert {
    /// Copies the weights of a loaded burn encoder.
    pub(crate) fn from_model<B: Backend>(model: &BertModel<B>, config: &BertConfig) -> HostBert {
        let e = &model.embeddings;
        let hidden = config.hidden_size;
        let token_type = values(e.token_type_embeddings.weight.val())[..hidden].to_vec();
        HostBert {
            hidden,
            heads: config.num_heads,
            eps: config.layer_norm_eps as f32,
            word: values(e.word_embeddings.weight.val()),
            position: values(e.position_embeddings.weight.val()),
            token_type,
            norm: norm(&e.layer_norm),
            layers: model
                .layers
                .iter()
                .map(|l| HostLayer {
                    qkv: concat_columns([linear(&l.query), linear(&l.key), linear(&l.value)]),
                    attention_output: linear(&l.attention_output),
                    attention_norm: norm(&l.attention_norm),
                    intermediate: linear(&l.intermediate),
                    output: linear(&l.output),
                    output_norm: norm(&l.output_norm),
                })
                .collect(),
        }
    }

    /// The mean of the last hidden states of each sequence: `[seqs.len(), hidden]`. Token ids
    /// must be below the vocabulary size and sequences no longer than the position table (the
    /// caller checks both).
    pub(crate) fn mean_pooled(&self, seqs: &[&[u32]]) -> Vec<f32> {
        let h = self.hidden;
        let offsets: Vec<usize> = std::iter::once(0)
            .chain(seqs.iter().scan(0, |acc, s| {
                *acc += s.len();
                Some(*acc)
            }))
            .collect();
        let tokens = offsets[seqs.len()];
        let ids: Vec<(usize, usize)> = seqs
            .iter()
            .flat_map(|s| s.iter().enumerate().map(|(pos, &id)| (pos, id as usize)))
            .collect();
        let mut x = vec![0f32; tokens * h];
        let embed = |(row, &(pos, id)): (&mut [f32], &(usize, usize))| {
            let w = &self.word[id * h..(id + 1) * h];
            let p = &self.position[pos * h..(pos + 1) * h];
            for i in 0..h {
                // (word + token type) + position, in the reference's order.
                row[i] = w[i] + self.token_type[i] + p[i];
            }
            layer_norm(row, &self.norm, self.eps);
        };
        if tokens >= PARALLEL_TOKENS {
            x.par_chunks_mut(h).zip(ids.par_iter()).for_each(embed);
        } else {
            x.chunks_mut(h).zip(ids.iter()).for_each(embed);
        }
        for layer in &self.layers {
            x = self.block(layer, x, &offsets);
        }
        let mut pooled = vec![0f32; seqs.len() * h];
        for (s, out) in pooled.chunks_exact_mut(h).enumerate() {
            let (start, end) = (offsets[s], offsets[s + 1]);
            for row in x[start * h..end * h].chunks_exact(h) {
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            let n = (end - start).max(1) as f32;
            out.iter_mut().for_each(|o| *o /= n);
        }
        pooled
    }

    fn block(&self, l: &HostLayer, x: Vec<f32>, offsets: &[usize]) -> Vec<f32> {
        let h = self.hidden;
        let tokens = x.len() / h;
        let qkv = apply(&l.qkv, &x, tokens);
        let context = self.attention(&qkv, offsets);
        let mut y = apply(&l.attention_output, &context, tokens);
        residual_norm(&mut y, &x, h, &l.attention_norm, self.eps);
        let mut inner = apply(&l.intermediate, &y, tokens);
        let width = l.intermediate.d_out;
        if tokens >= PARALLEL_TOKENS {
            inner.par_chunks_mut(width).for_each(gelu_in_place);
        } else {
            gelu_in_place(&mut inner);
        }
        let mut out = apply(&l.output, &inner, tokens);
        residual_norm(&mut out, &y, h, &l.output_norm, self.eps);
        out
    }

    /// Softmax attention of every sequence and head over its own tokens: `[tokens, hidden]`.
    fn attention(&self, qkv: &[f32], offsets: &[usize]) -> Vec<f32> {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..offsets.len() - 1)
            .flat_map(|s| (0..heads).map(move |head| (s, head)))
            .collect();
        let head_attention = |&(s, head): &(usize, usize)| {
            let (start, len) = (offsets[s], offsets[s + 1] - offsets[s]);
            let stride = 3 * h;
            let base = start * stride + head * d;
            let (q, k, v) = (base, base + h, base + 2 * h);
            assert!(len == 0 || v + (len - 1) * stride + d <= qkv.len());
            let mut p = vec![0f32; len * len];
            let mut out = vec![0f32; len * d];
            if len == 0 {
                return out;
            }
            // SAFETY: the assertion bounds every strided row read of q, k and v (`len`
            // rows of `d` values, `stride` apart); `p` is `len x len` and `out` `len x d`,
            // both contiguous and owned here.
            unsafe {
                gemm(
                    len,
                    len,
                    d,
                    p.as_mut_ptr(),
                    1,
                    len as isize,
                    false,
                    qkv.as_ptr().add(q),
                    1,
                    stride as isize,
                    qkv.as_ptr().add(k),
                    stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for row in p.chunks_exact_mut(len) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            }
            // SAFETY: as above; `p` is `len x len`, `out` `len x d`.
            unsafe {
                gemm(
                    len,
                    d,
                    len,
                    out.as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    p.as_ptr(),
                    1,
                    len as isize,
                    qkv.as_ptr().add(v),
                    1,
                    stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            out
        };
        let tokens = offsets[offsets.len() - 1];
        let parts: Vec<Vec<f32>> = if tokens >= PARALLEL_TOKENS {
            tasks.par_iter().map(head_attention).collect()
        } else {
            tasks.iter().map(head_attention).collect()
        };
        let mut context = vec![0f32; tokens * h];
        for (&(s, head), out) in tasks.iter().zip(parts) {
            for (i, row) in out.chunks_exact(d).enumerate() {
                let at = (offsets[s] + i) * h + head * d;
                context[at..at + d].copy_from_slice(row);
            }
        }
        context
    }
}

/// Below this many tokens a pass runs on one thread: waking the pool for every operation
/// costs more than it saves on a short query (and much more on a busy machine).
const PARALLEL_TOKENS: usize = 96;

/// `x [tokens, d_in] · W [d_in, d_out] + b`, on every core when there are enough tokens.
fn apply(l: &HostLinear, x: &[f32], tokens: usize) -> Vec<f32> {
    assert_eq!(x.len(), tokens * l.d_in);
    let mut y = Vec::with_capacity(tokens * l.d_out);
    for _ in 0..tokens {
        y.extend_from_slice(&l.bias);
    }
    if tokens == 0 {
        return y;
    }
    // SAFETY: `x` is `tokens x d_in`, `weight` `d_in x d_out`, `y` `tokens x d_out`, all
    // row-major and contiguous (the assertion and the construction above).
    unsafe {
        gemm(
            tokens,
            l.d_out,
            l.d_in,
            y.as_mut_ptr(),
            1,
            l.d_out as isize,
            true,
            x.as_ptr(),
            1,
            l.d_in as isize,
            l.weight.as_ptr(),
            1,
            l.d_out as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if tokens >= PARALLEL_TOKENS {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            },
        );
    }
    y
}

/// `y = LayerNorm(y + x)` row by row.
fn residual_norm(y: &mut [f32], x: &[f32], h: usize, n: &HostNorm, eps: f32) {
    let f = |(y, x): (&mut [f32], &[f32])| {
        y.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        layer_norm(y, n, eps);
    };
    if y.len() / h >= PARALLEL_TOKENS {
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(f);
    } else {
        y.chunks_mut(h).zip(x.chunks(h)).for_each(f);
    }
}

/// `(x - mean) / sqrt(var + eps) · gamma + beta`, in place, over one row.
fn layer_norm(x: &mut [f32], n: &HostNorm, eps: f32) {
    let len = x.len() as f32;
    let mean = x.iter().sum::<f32>() / len;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / len;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in x.iter_mut().zip(&n.gamma).zip(&n.beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

/// Exact GELU, `x/2 · (1 + erf(x/√2))`, over a slice: a loop the compiler vectorises, compiled
/// for AVX2 too and taken when the CPU has it.
fn gelu_in_place(xs: &mut [f32]) {
    #[inline(always)]
    fn body(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(xs: &mut [f32]) {
            body(xs)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function was compiled for.
            return unsafe { avx2(xs) };
        }
    }
    body(xs)
}

/// `erf(x)` in f32 by a rational approximation on [-4, 4] (odd numerator of degree 13, even
/// denominator of degree 8; beyond ±4 erf is ±1 in f32): branch-free, so it vectorises, unlike
/// libm's `erff` (a fifth of the embedder's time when it was used). Agrees with `libm::erff` to
/// a few 1e-7 (tested below).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    let p = x * p;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_2e-3;
    q = x2 * q - 1.426_473_9e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The approximation against libm's `erff` (another implementation) on a fine grid.
    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f32;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "max |erf - libm::erff| = {worst:e}");
    }
}
