//! `hone`: LoRA fine-tuning of Llama-family models, from raw data to a served model.
//! This binary parses arguments, validates them and dispatches to the library crates; it is the
//! only place that prints and chooses exit codes.

mod args;
mod cmd;

use clap::Parser;

use args::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HONE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.verbose { "debug" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Data(command) => cmd::data::run(command),
        Command::Template(command) => cmd::template::run(command),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
