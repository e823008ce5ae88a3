//! `hone adapter combine`: combines PEFT LoRA adapters (PEFT's `add_weighted_adapter` methods)
//! into a new PEFT adapter directory that hone, PEFT and vLLM load.

use anyhow::Result;
use hone_merge::CombineOptions;

use crate::args::{AdapterCombineArgs, AdapterCommand};

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
