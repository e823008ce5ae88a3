//! `hone merge`: folds one or more PEFT LoRA adapters into a base model and writes a Hugging Face
//! model directory (sharded safetensors + index, config, tokenizer files) that transformers and
//! hone load as a plain model.

use anyhow::Result;
use hone_merge::MergeOptions;

use crate::args::{ExportGgufArgs, MergeArgs};

pub fn run(args: MergeArgs) -> Result<()> {
    let options = MergeOptions {
        base: args.model.clone(),
        adapters: args.selection.adapters.clone(),
        combination: args.selection.combination(),
        dtype: args.dtype,
        max_shard_size: args.max_shard_size,
        out: args.out.clone(),
        force: args.force,
    };
    // Library errors name the file, tensor or adapter at fault.
    let report = hone_merge::merge(&options)?;
    let files = match report.shards.len() {
        1 => "model.safetensors".to_string(),
        n => format!("{n} shards + model.safetensors.index.json"),
    };
    println!(
        "merged {} adapter(s) ({}) into {} modules; wrote {} tensors ({} bytes, {}) as {files} to {}",
        args.selection.adapters.len(),
        report.method,
        report.merged_modules,
        report.tensors,
        report.total_size,
        report.dtype.config_name(),
        args.out.display()
    );
    if !report.dropped.is_empty() {
        println!(
            "not written (tied to the embeddings): {}",
            report.dropped.join(", ")
        );
    }
    Ok(())
}

/// `hone export gguf`: the merged model as one GGUF file, with a JSON summary line.
pub fn export_gguf(args: ExportGgufArgs) -> Result<()> {
    let (base, adapters, template) = match (&args.run, &args.model) {
        (Some(run), _) => {
            if !args.selection.adapters.is_empty() {
                anyhow::bail!(
                    "--run takes the adapter from the run directory ({}); drop --adapter",
                    run.join(hone_train::run::FINAL_ADAPTER).display()
                );
            }
            from_run(run)?
        }
        (None, Some(model)) => (model.clone(), args.selection.adapters.clone(), None),
        (None, None) => anyhow::bail!("give --model (a base model) or --run (a training run)"),
    };
    let options = hone_merge::GgufExportOptions {
        base,
        adapters: adapters.clone(),
        combination: args.selection.combination(),
        ty: args.ty,
        out: args.out.clone(),
        force: args.force,
        name: args.name.clone(),
        tokenizer_pre: args.tokenizer_pre.clone(),
        template,
        lora_only: args.lora_only,
    };
    let report = hone_merge::export_gguf(&options)?;
    let summary = serde_json::json!({
        "file": report.file,
        "modelfile": report.modelfile,
        "type": report.ty.name(),
        "bytes": report.bytes,
        "tensors": report.tensors,
        "tensor_types": report.tensor_types,
        "adapters": adapters,
        "merged_modules": report.merged_modules,
        "eos_ids": report.eos_ids,
        "stop_strings": report.stop_strings,
        "template_source": report.template_source,
        "seconds": (report.seconds * 1000.0).round() / 1000.0,
    });
    println!("{summary}");
    Ok(())
}

/// The base, final adapter and chat template of the training run in `run`.
fn from_run(
    run: &std::path::Path,
) -> Result<(
    std::path::PathBuf,
    Vec<std::path::PathBuf>,
    Option<hone_merge::TemplateOverride>,
)> {
    use anyhow::Context;
    use hone_tokenize::chat::{ChatTemplate, TemplateSource};
    let config_path = run.join(hone_train::run::CONFIG_FILE);
    let config = hone_train::RunConfig::load_saved(&config_path)
        .with_context(|| format!("{} is not a training run directory", run.display()))?;
    let adapter = run.join(hone_train::run::FINAL_ADAPTER);
    if !adapter.join("adapter_config.json").is_file() {
        anyhow::bail!(
            "{}: the run has no final adapter (adapter/adapter_config.json); it has not finished",
            run.display()
        );
    }
    let base = config.model.path.clone();
    let template = match &config.tokenize.template {
        TemplateSource::Model => None,
        TemplateSource::ModelNamed(name) => {
            let t = ChatTemplate::from_model_dir(&base, Some(name))?;
            Some(hone_merge::TemplateOverride {
                text: t.source().to_string(),
                source: format!("the base's template {name} (run {})", run.display()),
                end_of_turn: None,
            })
        }
        TemplateSource::Builtin(which) => Some(hone_merge::TemplateOverride {
            text: which.source().to_string(),
            source: format!("builtin:{which} (run {})", run.display()),
            end_of_turn: which.default_special_tokens().eos_token,
        }),
    };
    Ok((base, vec![adapter], template))
}
