//! `hone eval compare`: the base model and each adapter, closed book and with retrieval, on the
//! same questions (hone-eval's `qa` module); a progress bar on a terminal, a line per arm
//! otherwise; the report into `--out`.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use hone_eval::qa::{compare_qa, write_compare, CompareSettings};
use hone_model::{run_on, BackendTask};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::CompareArgs;

struct CompareTask<'a> {
    settings: &'a CompareSettings,
    bar: Option<ProgressBar>,
}

impl BackendTask for CompareTask<'_> {
    type Output = hone_eval::Result<(hone_eval::CompareReport, Vec<hone_eval::Prediction>)>;

    fn run<B: hone_model::KernelBackend>(self, device: B::Device) -> Self::Output {
        let bar = self.bar;
        let mut current = String::new();
        let mut progress = |arm: &str, done: usize, total: usize| {
            if let Some(bar) = &bar {
                if arm != current {
                    bar.set_length(total as u64);
                    bar.set_message(arm.to_string());
                }
                bar.set_position(done as u64);
            } else if done == total {
                eprintln!("{arm}: {total} questions answered");
            }
            current = arm.to_string();
        };
        let result = compare_qa::<B>(self.settings, &device, &mut progress);
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        result
    }
}

pub fn run(args: CompareArgs) -> Result<()> {
    let settings = CompareSettings {
        model: args.model,
        adapters: args.adapters,
        index: args.rag,
        questions: args.questions,
        k: args.k,
        limit: args.limit,
        batch_size: args.batch_size,
        max_new_tokens: args.max_tokens,
        template: args.template,
        dtype: args.dtype.burn(),
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} questions {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    });
    let task = CompareTask {
        settings: &settings,
        bar,
    };
    let (report, predictions) = run_on(args.device, task)??;
    let files = write_compare(&report, &predictions, &args.out)
        .with_context(|| format!("writing the report into {}", args.out.display()))?;
    print!("{}", hone_eval::qa::markdown(&report));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
