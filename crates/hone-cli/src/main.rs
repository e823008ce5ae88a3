//! `hone`: LoRA fine-tuning of Llama-family models, from raw data to a served model.
//! This binary parses arguments, validates them and dispatches to the library crates; it is the
//! only place that prints and chooses exit codes.

mod allocator;
mod args;
mod cmd;
mod logging;
mod signals;

use clap::Parser;

use args::{Cli, Command};

fn main() {
    allocator::use_huge_pages();
    allocator::tune();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HONE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.verbose { "debug" } else { "warn" })
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        args::LogFormat::Text => logs.init(),
        args::LogFormat::Json => logs.event_format(logging::JsonLines).init(),
    }
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Data(command) => cmd::data::run(command),
        Command::Template(command) => cmd::template::run(command),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Export(args::ExportCommand::Gguf(args)) => cmd::merge::export_gguf(args),
        Command::Adapter(command) => cmd::adapter::run(command),
        Command::Train(args) => cmd::train::run(args, cli.log_format),
        Command::TrainOrchestrator(args) => cmd::train::orchestrator(args),
        Command::Eval(args) => cmd::eval::run(*args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Rag(command) => cmd::rag::run(command),
    };
    if let Err(err) = result {
        let code = exit_code(&err);
        match cli.log_format {
            args::LogFormat::Text => eprintln!("error: {}", error_chain(&err)),
            args::LogFormat::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "error", "error": error_chain(&err), "exit_code": code})
            ),
        }
        std::process::exit(code);
    }
}

/// Exit codes, the same for every command (README, "Use in CI"). A run stopped by SIGINT or
/// SIGTERM exits with 128 + the signal's number (130, 143).
pub mod exit {
    /// Any error not classified below.
    pub const OTHER: i32 = 1;
    /// A bad flag (clap's own code), config key or value, or a file a flag or config names
    /// that does not exist.
    pub const USAGE: i32 = 2;
    /// A quality gate failed (`hone train`'s `[gates]`/`--fail-if`, `hone eval --max-drop`
    /// against a `--baseline`).
    pub const GATE: i32 = 3;
    /// The data was rejected: more bad records than allowed (`on_error = "fail"`), nothing
    /// left to train on after curation, or a malformed record in an evaluation data file.
    pub const DATA_REJECTED: i32 = 4;
}

/// An error the user fixes in the command line or a config file: exits [`exit::USAGE`].
/// Shows the wrapped error's message and causes as its own.
#[derive(Debug)]
pub struct UsageError(pub Box<dyn std::error::Error + Send + Sync + 'static>);

impl UsageError {
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(err))
    }
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The exit code of a command that failed with `err`: the first typed error of its chain
/// (outermost first) that says what kind of failure it was.
fn exit_code(err: &anyhow::Error) -> i32 {
    use hone_data::DataError;
    use hone_eval::EvalError;
    use hone_train::TrainError;
    fn data(e: &DataError) -> Option<i32> {
        match e {
            DataError::InvalidRecords { .. } => Some(exit::DATA_REJECTED),
            DataError::BadPattern { .. }
            | DataError::NoMatch { .. }
            | DataError::UnsupportedFile { .. }
            | DataError::Detect { .. }
            | DataError::Config { .. } => Some(exit::USAGE),
            DataError::Io { .. } | DataError::Output { .. } => None,
        }
    }
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return exit::USAGE;
        }
        if let Some(e) = cause.downcast_ref::<DataError>() {
            if let Some(code) = data(e) {
                return code;
            }
        }
        if let Some(e) = cause.downcast_ref::<EvalError>() {
            let code = match e {
                EvalError::Config { .. }
                | EvalError::MissingPath { .. }
                | EvalError::Template { .. }
                | EvalError::Resume { .. }
                | EvalError::Baseline { .. }
                | EvalError::UnknownMetric { .. } => Some(exit::USAGE),
                EvalError::Regression { .. } => Some(exit::GATE),
                EvalError::Json { .. } | EvalError::Record { .. } | EvalError::EmptyData { .. } => {
                    Some(exit::DATA_REJECTED)
                }
                EvalError::Interrupted { .. } => {
                    Some(128 + signals::received().unwrap_or(libc::SIGINT))
                }
                _ => None,
            };
            if let Some(code) = code {
                return code;
            }
        }
        if let Some(e) = cause.downcast_ref::<TrainError>() {
            let code = match e {
                TrainError::Config { .. }
                | TrainError::MissingPath { .. }
                | TrainError::RunDir { .. }
                | TrainError::AdapterMismatch { .. }
                | TrainError::ContextTooLong { .. } => Some(exit::USAGE),
                TrainError::NoTrainingData(_) => Some(exit::DATA_REJECTED),
                TrainError::GateFailed { .. } => Some(exit::GATE),
                TrainError::Interrupted { .. } => {
                    Some(128 + signals::received().unwrap_or(libc::SIGINT))
                }
                TrainError::Data(e) => data(e),
                _ => None,
            };
            if let Some(code) = code {
                return code;
            }
        }
    }
    exit::OTHER
}

/// The error and its causes joined by ": ", leaving out a cause whose message the text before
/// it already holds (an error that shows its source in its own message, e.g. thiserror's
/// `#[error("...: {0}")]` on a `#[from]` field, would otherwise print it twice).
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if message.is_empty() || text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// Like thiserror's `#[error("data: {0}")]` on a `#[from]` field: shows its source.
    #[derive(Debug)]
    struct Shows(std::io::Error);

    impl std::fmt::Display for Shows {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "data: {}", self.0)
        }
    }

    impl std::error::Error for Shows {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "x.jsonl:1: malformed JSON");
        let err = anyhow::Error::from(Shows(inner)).context("loading the run");
        assert_eq!(
            error_chain(&err),
            "loading the run: data: x.jsonl:1: malformed JSON"
        );
    }

    #[test]
    fn causes_not_in_the_message_are_all_printed() {
        let inner = std::io::Error::other("No space left on device");
        let err = anyhow::Error::from(inner).context("writing out/train.jsonl");
        assert_eq!(
            error_chain(&err),
            "writing out/train.jsonl: No space left on device"
        );
    }
}
