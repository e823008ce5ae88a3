//! `hone merge`: folds one or more PEFT LoRA adapters into a base model and writes a Hugging Face
//! model directory (sharded safetensors + index, config, tokenizer files) that transformers and
//! hone load as a plain model.

use anyhow::Result;
use hone_merge::MergeOptions;

use crate::args::MergeArgs;

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
