//! AdamW (Loshchilov & Hutter, 2019) exactly as `torch.optim.AdamW` computes it (single-tensor
//! path), and global-norm clipping as `torch.nn.utils.clip_grad_norm_`. Both work on plain
//! tensors of any backend (the adapter parameters and their gradients, detached from autodiff),
//! so no optimizer state is kept for the frozen base weights.
//!
//! One AdamW update with learning rate `lr` at step `t` (1-based):
//!
//! ```text
//! p  *= 1 - lr * weight_decay                 (decoupled weight decay)
//! m   = m + (1 - b1) * (g - m)                (torch: exp_avg.lerp_(g, 1 - b1))
//! v   = b2 * v + (1 - b2) * g * g
//! denom = sqrt(v) / sqrt(1 - b2^t) + eps
//! p  -= lr / (1 - b1^t) * m / denom
//! ```

use burn::prelude::*;

use crate::error::{Result, TrainError};

/// AdamW's hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults except weight decay 0 (transformers' `Trainer` default).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The first and second moment of one parameter.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    /// `exp_avg`.
    pub m: Tensor<B, 2>,
    /// `exp_avg_sq`.
    pub v: Tensor<B, 2>,
}

/// AdamW over a fixed, ordered list of 2-D parameters.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates applied so far (torch's per-parameter `step`, equal for all parameters here).
    pub step: u64,
    /// Moments per parameter, created at the first update (zeros, as torch).
    pub moments: Option<Vec<Moments<B>>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: None,
        }
    }

    /// Restores a saved state (`step` updates done, one pair of moments per parameter).
    pub fn from_state(config: AdamWConfig, step: u64, moments: Vec<Moments<B>>) -> Self {
        Self {
            config,
            step,
            moments: (step > 0).then_some(moments),
        }
    }

    /// One update: returns the new parameter values. `params` and `grads` are in the same
    /// order at every call.
    pub fn update(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 2>>,
        grads: Vec<Tensor<B, 2>>,
    ) -> Vec<Tensor<B, 2>> {
        assert_eq!(params.len(), grads.len(), "one gradient per parameter");
        let c = self.config;
        let moments = self.moments.get_or_insert_with(|| {
            params
                .iter()
                .map(|p| Moments {
                    m: p.zeros_like(),
                    v: p.zeros_like(),
                })
                .collect()
        });
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        let mut out = Vec::with_capacity(params.len());
        for ((p, g), state) in params.into_iter().zip(grads).zip(moments.iter_mut()) {
            let p = if c.weight_decay != 0.0 {
                p * (1.0 - lr * c.weight_decay)
            } else {
                p
            };
            let m = state.m.clone() + (g.clone() - state.m.clone()) * (1.0 - c.beta1);
            let v = state.v.clone() * c.beta2 + g.clone() * g * (1.0 - c.beta2);
            let denom = v.clone().sqrt() / bias2_sqrt + c.eps;
            out.push(p - (m.clone() / denom) * step_size);
            state.m = m;
            state.v = v;
        }
        out
    }
}

/// The L2 norm of all `grads` together (f64 on the host) and each tensor's sum of squares
/// read in one transfer.
pub fn global_norm<B: Backend>(grads: &[Tensor<B, 2>]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum())
        .collect();
    let sums = Tensor::cat(sums, 0)
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| TrainError::Tensor {
            what: "gradient norms".into(),
            message: format!("{e:?}"),
        })?;
    Ok(sums.iter().sum::<f64>().sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm`, as torch's
/// `clip_grad_norm_`: the factor is `min(1, max_norm / (norm + 1e-6))`. `norm` is the
/// global norm before clipping ([`global_norm`]).
pub fn clip_by_global_norm<B: Backend>(
    grads: Vec<Tensor<B, 2>>,
    norm: f64,
    max_norm: f64,
) -> Vec<Tensor<B, 2>> {
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef >= 1.0 {
        // torch multiplies by the clamped factor 1.0, which changes nothing.
        return grads;
    }
    grads.into_iter().map(|g| g * coef).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use hone_model::Cpu;

    fn tensor(values: &[f32], rows: usize) -> Tensor<Cpu, 2> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [rows, values.len() / rows]),
            &Default::default(),
        )
    }

    fn values(t: &Tensor<Cpu, 2>) -> Vec<f32> {
        t.clone().into_data().to_vec::<f32>().unwrap()
    }

    /// torch's AdamW written out per element in f64 (the reference for the tensor version).
    fn scalar_adamw(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        lr: f64,
        t: i32,
        c: AdamWConfig,
    ) {
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * c.weight_decay;
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let mhat = m[i] / (1.0 - c.beta1.powi(t));
            let vhat = v[i] / (1.0 - c.beta2.powi(t));
            p[i] -= lr * mhat / (vhat.sqrt() + c.eps);
        }
    }

    #[test]
    fn adamw_matches_the_textbook_update_over_several_steps() {
        let c = AdamWConfig {
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let p0 = [0.5f32, -1.0, 2.0, 0.25, 0.0, -0.125];
        let grads = [
            [0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0],
            [0.05, 0.4, -0.3, 0.2, -1.0, 0.5],
            [1.0, 1.0, 1.0, -1.0, 0.0, 0.0],
        ];
        let lrs = [0.1, 0.05, 0.01];
        let mut opt = AdamW::<Cpu>::new(c);
        let mut p = vec![tensor(&p0, 2)];
        let (mut ep, mut em, mut ev) = (p0.map(f64::from).to_vec(), vec![0.0; 6], vec![0.0; 6]);
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            p = opt.update(lr, p, vec![tensor(g, 2)]);
            scalar_adamw(
                &mut ep,
                &mut em,
                &mut ev,
                &g.map(f64::from),
                lr,
                t as i32 + 1,
                c,
            );
        }
        assert_eq!(opt.step, 3);
        for (a, e) in values(&p[0]).iter().zip(&ep) {
            assert!((*a as f64 - e).abs() < 1e-6, "{a} vs {e}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm_like_torch() {
        let grads = vec![tensor(&[3.0, 0.0], 1), tensor(&[0.0, 4.0, 0.0, 0.0], 2)];
        let norm = global_norm(&grads).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let clipped = clip_by_global_norm(grads.clone(), norm, 1.0);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((values(&clipped[0])[0] as f64 - 3.0 * coef).abs() < 1e-7);
        assert!((values(&clipped[1])[1] as f64 - 4.0 * coef).abs() < 1e-7);
        // Below the threshold nothing changes.
        let kept = clip_by_global_norm(grads, norm, 10.0);
        assert_eq!(values(&kept[0]), [3.0, 0.0]);
    }
}
