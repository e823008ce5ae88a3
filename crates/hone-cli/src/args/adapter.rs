//! `hone adapter`'s arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::merge::AdapterSelection;

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
