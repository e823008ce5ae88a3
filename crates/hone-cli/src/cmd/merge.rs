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
    let options = hone_merge::GgufExportOptions {
        base: args.model.clone(),
        adapters: args.selection.adapters.clone(),
        combination: args.selection.combination(),
        ty: args.ty,
        out: args.out.clone(),
        force: args.force,
        name: args.name.clone(),
        tokenizer_pre: args.tokenizer_pre.clone(),
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
        "adapters": args.selection.adapters,
        "merged_modules": report.merged_modules,
        "eos_ids": report.eos_ids,
        "template_source": report.template_source,
        "seconds": (report.seconds * 1000.0).round() / 1000.0,
    });
    println!("{summary}");
    Ok(())
}
