//! `hone serve`: the OpenAI-compatible server (its load benchmark, `hone bench serve`, is in
//! [`crate::cmd::bench`]).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hone_serve::{Limits, ModelSource, RagSettings, ServeConfig, Timeouts};

use crate::args::ServeArgs;

/// `NAME=DIR` pairs.
fn parse_adapters(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                Ok((name.to_string(), PathBuf::from(dir)))
            }
            _ => bail!("--adapter `{s}`: expected NAME=DIR"),
        })
        .collect()
}

fn serve_config(args: ServeArgs) -> Result<ServeConfig> {
    let mut config = ServeConfig::new(ModelSource::Dir(args.model));
    config.served_model_name = args.served_model_name;
    config.adapters = parse_adapters(&args.adapters)?;
    config.adapters_dir = args.adapters_dir;
    config.allow_runtime_lora = args.allow_runtime_lora;
    config.host = args.host;
    config.port = args.port;
    config.api_key = args
        .api_key
        .or_else(|| std::env::var("HONE_API_KEY").ok().filter(|k| !k.is_empty()));
    config.device = args.device;
    config.dtype = args.dtype.burn();
    config.activations = hone_model::gguf::matmul::Activations::from_flags(
        args.q8_activations,
        args.bf16_activations,
    );
    config.chat_template = args.chat_template;
    config.rag = args.rag.map(|dir| RagSettings {
        dir,
        k: args.rag_k,
        by_default: args.rag_default,
    });
    config.limits = Limits {
        max_batch: args.max_batch,
        prefill_chunk: args.prefill_chunk,
        max_queue: args.max_queue,
        max_prompt_tokens: args.max_prompt_tokens,
        max_body_bytes: args.max_body_bytes,
        max_adapters: args.max_adapters,
        ..Limits::default()
    };
    config.timeouts = Timeouts {
        header_read: Duration::from_secs(args.header_timeout),
        body_read: Duration::from_secs(args.body_timeout),
        shutdown: Duration::from_secs(args.shutdown_timeout),
    };
    config.validate()?;
    if !config.host.is_loopback() && config.api_key.is_none() {
        tracing::warn!(
            "listening on {} without --api-key: anyone who can reach it can use it{}",
            config.host,
            if config.allow_runtime_lora {
                " and load adapters from --adapters-dir"
            } else {
                ""
            }
        );
    }
    Ok(config)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = serve_config(args)?;
    let name = config.base_name();
    let adapters: Vec<String> = config.adapters.iter().map(|(n, _)| n.clone()).collect();
    hone_serve::serve_blocking(config, |addr| {
        println!(
            "hone serve: `{name}`{} on http://{addr} (Ctrl-C to stop)",
            if adapters.is_empty() {
                String::new()
            } else {
                format!(" with adapters {}", adapters.join(", "))
            }
        );
        let _ = std::io::stdout().flush();
    })
    .context("serving")
}
