//! `hone generate`: streams a completion to stdout, a summary to stderr.

use std::io::Write;

use anyhow::{bail, Context, Result};
use hone_model::{
    generate, load_model_dir, run_on, BackendTask, GenerateConfig, LoadOptions, SamplingConfig,
};

use crate::args::GenerateArgs;

struct Task(GenerateArgs);

impl BackendTask for Task {
    type Output = Result<()>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        // Parse, validate, then run: bad sampling options fail before any work or output.
        let sampling = SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        };
        sampling.validate()?;
        let mut loaded = load_model_dir::<B>(
            &args.model.model,
            &device,
            LoadOptions {
                dtype: args.model.dtype.burn(),
                dequantize: args.model.dequantize,
                activations: args.model.activations(),
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
        let context = loaded.model.config().max_position_embeddings;
        let max_new_tokens = context_budget(prompt.len(), args.max_tokens, context)?;
        let config = GenerateConfig {
            max_new_tokens,
            sampling,
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

/// New tokens that fit the model's context (`max_position_embeddings`) after a prompt of
/// `prompt` tokens: `requested`, or fewer with a warning. A prompt that fills the context is
/// an error.
fn context_budget(prompt: usize, requested: usize, context: usize) -> Result<usize> {
    if prompt >= context {
        bail!(
            "the prompt is {prompt} tokens, but the model's context (max_position_embeddings) \
             is {context}: shorten the prompt"
        );
    }
    let room = context - prompt;
    if requested > room {
        tracing::warn!(
            "--max-tokens {requested} with a {prompt}-token prompt goes past the model's context \
             of {context} tokens (max_position_embeddings): generating at most {room}"
        );
        return Ok(room);
    }
    Ok(requested)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    run_on(args.model.device, Task(args))?
}

#[cfg(test)]
mod tests {
    use super::context_budget;

    #[test]
    fn generation_is_capped_at_the_models_context() {
        assert_eq!(context_budget(10, 100, 512).unwrap(), 100);
        assert_eq!(context_budget(500, 100, 512).unwrap(), 12);
        let msg = context_budget(512, 1, 512).unwrap_err().to_string();
        assert!(
            msg.contains("512") && msg.contains("max_position_embeddings"),
            "{msg}"
        );
    }
}
