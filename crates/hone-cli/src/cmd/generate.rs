//! `hone generate`: streams a completion to stdout, a summary to stderr.

use std::io::Write;

use anyhow::{Context, Result};
use burn::prelude::*;
use hone_model::{
    generate, load_model_dir, run_on, BackendTask, GenerateConfig, LoadOptions, SamplingConfig,
};

use crate::args::GenerateArgs;

struct Task(GenerateArgs);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let mut loaded = load_model_dir::<B>(
            &args.model.model,
            &device,
            LoadOptions {
                dtype: args.model.dtype.dtype(),
            },
        )
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
        if let Some(adapter) = &args.adapter {
            loaded
                .model
                .load_adapter(adapter)
                .with_context(|| format!("loading adapter {}", adapter.display()))?;
        }
        let prompt = loaded.tokenizer.encode_prompt(&args.prompt)?;
        let config = GenerateConfig {
            max_new_tokens: args.max_tokens,
            sampling: SamplingConfig {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                repetition_penalty: args.repetition_penalty,
                seed: args.seed,
            },
            stop_ids: if args.ignore_eos {
                vec![]
            } else {
                loaded.tokenizer.eos_ids.clone()
            },
            stop_strings: args.stop.clone(),
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        out.write_all(args.prompt.as_bytes())?;
        out.flush()?;
        let mut write_error = None;
        let result = generate(
            &loaded.model,
            &loaded.tokenizer,
            &prompt,
            &config,
            |piece| {
                if write_error.is_none() {
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                        write_error = Some(e);
                    }
                }
            },
        )?;
        if let Some(e) = write_error {
            return Err(e).context("writing to stdout");
        }
        writeln!(out)?;
        let generated = result.ids.len();
        let decode_tokens = generated.saturating_sub(1);
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {:?}] prefill {:.1} tokens/s, decode {:.1} tokens/s",
            result.prompt_tokens,
            generated,
            result.finish_reason,
            result.prompt_tokens as f64 / result.prefill_seconds.max(1e-9),
            decode_tokens as f64 / result.decode_seconds.max(1e-9),
        );
        Ok(())
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    run_on(args.model.device, Task(args))?
}
