//! `hone bench ...`: the benchmarks of [`hone_bench`], one JSON line each on stdout. This
//! module only turns the flags into hone-bench's settings and prints what comes back.

use anyhow::{bail, Result};
use hone_bench::data::{bench_data, DataBench};
use hone_bench::generate::{bench_generate, GenerateBench, ModelSource};
use hone_bench::train::{bench_train, TrainBench};

use crate::args::{BenchArgs, BenchCommand, BenchDataArgs, BenchGenerateArgs, BenchTrainArgs};

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Generate(a) => println!("{}", bench_generate(generate_settings(a)?)?),
        BenchCommand::Data(a) => bench_data(&data_settings(a), |line| println!("{line}"))?,
        BenchCommand::Train(a) => println!("{}", bench_train(train_settings(a))?),
        BenchCommand::Serve(a) => crate::cmd::serve::bench(a)?,
    }
    Ok(())
}

fn generate_settings(a: BenchGenerateArgs) -> Result<GenerateBench> {
    let model = match (a.model, a.shape) {
        (Some(dir), _) => ModelSource::Dir(dir),
        (None, Some(shape)) => ModelSource::Shape(shape),
        (None, None) => bail!("give --model DIR or --shape"),
    };
    Ok(GenerateBench {
        model,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        batch: a.batch,
        device: a.device,
        dtype: a.dtype,
        repeat: a.repeat,
        kernels: a.kernels,
    })
}

fn train_settings(a: BenchTrainArgs) -> TrainBench {
    TrainBench {
        shape: a.shape,
        seq: a.seq,
        batch: a.batch,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        targets: a.targets,
        steps: a.steps,
        device: a.device,
        devices: a.devices,
        gradient_checkpointing: a.gradient_checkpointing,
        dtype: a.dtype,
        peak_tflops: a.peak_tflops,
        kernels: a.kernels,
    }
}

fn data_settings(a: BenchDataArgs) -> DataBench {
    DataBench {
        input: a.input,
        examples: a.examples,
        perturb: a.perturb,
        model: a.model,
        template: a.template,
        max_seq_len: a.max_seq_len,
    }
}
