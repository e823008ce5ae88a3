//! `hone adapter combine`: combines PEFT LoRA adapters (PEFT's `add_weighted_adapter` methods)
//! into a new PEFT adapter directory that hone, PEFT and vLLM load.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use hone_merge::CombineOptions;

use crate::cmd::merge::AdapterSelection;

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Combine adapters into a new PEFT adapter (adapter_config.json + adapter_model.safetensors).
    Combine(AdapterCombineArgs),
}

#[derive(Args, Debug)]
pub struct AdapterCombineArgs {
    #[command(flatten)]
    pub selection: AdapterSelection,
    /// Output adapter directory (written completely or not at all).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(command: AdapterCommand) -> Result<()> {
    match command {
        AdapterCommand::Combine(args) => combine(args),
    }
}

fn combine(args: AdapterCombineArgs) -> Result<()> {
    let report = hone_merge::combine_adapters(&CombineOptions {
        adapters: args.selection.adapters.clone(),
        combination: args.selection.combination(),
        out: args.out.clone(),
        force: args.force,
    })?;
    println!(
        "combined {} adapter(s) ({}) into a rank-{} adapter on {} modules: {}",
        args.selection.adapters.len(),
        report.method,
        report.rank,
        report.modules,
        args.out.display()
    );
    Ok(())
}
