//! `hone logits`: f32 logits [batch, seq, vocab] of integer `input_ids` [batch, seq], written as
//! safetensors (the hook for numerical comparisons with other implementations).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::{load_model_dir, run_on, BackendTask, DeviceSpec, LoadOptions, WeightStore};
use safetensors::tensor::{Dtype, TensorView};

use crate::args::LogitsArgs;

struct Task {
    args: LogitsArgs,
    ids: Vec<i64>,
    batch: usize,
    seq: usize,
}

impl BackendTask for Task {
    type Output = Result<Vec<f32>>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Result<Vec<f32>> {
        let m = &self.args.model;
        let mut loaded = load_model_dir::<B>(
            &m.model,
            &device,
            LoadOptions {
                dtype: m.dtype.burn(),
                dequantize: m.dequantize,
                activations: m.activations(),
            },
        )
        .with_context(|| format!("loading model {}", m.model.display()))?;
        if let Some(adapter) = &self.args.adapter {
            loaded
                .model
                .load_adapter(adapter)
                .with_context(|| format!("loading adapter {}", adapter.display()))?;
        }
        let vocab = loaded.model.config().vocab_size as i64;
        if let Some(bad) = self.ids.iter().find(|&&i| i < 0 || i >= vocab) {
            bail!(
                "{}: `input_ids` holds {bad}, outside the vocabulary [0, {vocab})",
                self.args.input_ids.display()
            );
        }
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(self.ids, [self.batch, self.seq]),
            &device,
        );
        let logits = loaded
            .model
            .forward(hone_model::Input::new(ids))
            .cast(burn::tensor::DType::F32);
        logits
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))
    }
}

/// Writes `tensors` to `path` through a temporary file in the same directory, then renames.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(&str, Dtype, Vec<usize>, &[u8])],
) -> Result<()> {
    let mut views = HashMap::new();
    for (name, dtype, shape, data) in tensors {
        views.insert(
            name.to_string(),
            TensorView::new(*dtype, shape.clone(), data).context("building output tensor")?,
        );
    }
    let result = hone_io::StagedFile::new(path)
        .map_err(anyhow::Error::from)
        .and_then(|staged| {
            safetensors::serialize_to_file(views, None, staged.path())
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(staged.commit()?)
        });
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let store = WeightStore::open_files(std::slice::from_ref(&args.input_ids))
        .with_context(|| format!("reading {}", args.input_ids.display()))?;
    let (ids, shape) = store
        .load_i64("input_ids")
        .with_context(|| format!("reading `input_ids` from {}", args.input_ids.display()))?;
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        bail!(
            "{}: `input_ids` must have shape [batch, seq] with both > 0, found {shape:?}",
            args.input_ids.display()
        );
    }
    let (batch, seq) = (shape[0], shape[1]);
    let out = args.out.clone();
    let (compare_with, tolerance) = (args.compare_with.clone(), args.tolerance);
    let device = args.model.device;
    let logits = run_on(
        device,
        Task {
            args,
            ids,
            batch,
            seq,
        },
    )??;
    let vocab = logits.len() / (batch * seq);
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors_atomic(
        &out,
        &[("logits", Dtype::F32, vec![batch, seq, vocab], &bytes)],
    )?;
    if let Some(reference) = &compare_with {
        compare(&logits, &[batch, seq, vocab], reference, tolerance, device)?;
    }
    Ok(())
}

/// Prints the difference between `logits` and the `logits` tensor of `reference` as one JSON
/// line; an error when the max absolute difference exceeds `tolerance`.
fn compare(
    logits: &[f32],
    shape: &[usize],
    reference: &Path,
    tolerance: f64,
    device: DeviceSpec,
) -> Result<()> {
    let store = WeightStore::open_files(&[reference.to_path_buf()])
        .with_context(|| format!("reading {}", reference.display()))?;
    let expected = store
        .load_f32("logits", shape)
        .with_context(|| format!("reading `logits` from {}", reference.display()))?;
    let (mut max, mut sum) = (0f64, 0f64);
    for (a, b) in logits.iter().zip(&expected) {
        let d = (*a as f64 - *b as f64).abs();
        if d.is_nan() || d > max {
            max = d;
        }
        sum += d;
    }
    let mean = sum / logits.len() as f64;
    let ok = max <= tolerance; // false for NaN
    println!(
        "{}",
        serde_json::json!({
            "compare": "logits",
            "reference": reference.display().to_string(),
            "device": device.to_string(),
            "max_abs_diff": max,
            "mean_abs_diff": mean,
            "tolerance": tolerance,
            "ok": ok,
        })
    );
    if !ok {
        bail!(
            "logits differ from {} by {max:e} (tolerance {tolerance:e})",
            reference.display()
        );
    }
    Ok(())
}
