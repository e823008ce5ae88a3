//! hone-eval against independent computations on real checkpoints: stories260k (a real tiny
//! Llama) and the PEFT fixture llama_gqa with its adapter.

use hone_model::Input;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_eval::report::Sample;
use hone_eval::{
    evaluate, generate_greedy, score_rows, write_report, AdapterSpec, EvalConfig, EvalReport,
    GreedySettings, ScoreRow, TaskConfig, TaskKind,
};
use hone_model::{
    generate, load_model_dir, CausalLm, Cpu, GenerateConfig, LoadOptions, SamplingConfig,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stories() -> PathBuf {
    root().join("checkpoints/base/stories260k")
}

fn gqa() -> PathBuf {
    root().join("fixtures/peft/llama_gqa")
}

/// Log-probabilities of every next token of `ids`, from the full-sequence logits of one
/// unbatched forward pass, with log-softmax computed here in f64.
fn reference_log_probs(model: &CausalLm<Cpu>, ids: &[u32]) -> Vec<f64> {
    let device = Default::default();
    let input = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, ids.len()],
        ),
        &device,
    );
    let logits: Vec<f32> = model
        .forward(Input::new(input))
        .into_data()
        .to_vec()
        .unwrap();
    let vocab = model.config().vocab_size;
    (1..ids.len())
        .map(|t| {
            let row = &logits[(t - 1) * vocab..t * vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[ids[t] as usize] as f64 - lse
        })
        .collect()
}

fn load(dir: &Path) -> hone_model::LoadedModel<Cpu> {
    load_model_dir::<Cpu>(dir, &Default::default(), LoadOptions::default()).unwrap()
}

#[test]
fn batched_choice_log_likelihoods_equal_unbatched_full_sequence_log_softmax() {
    let loaded = load(&stories());
    let tok = &loaded.tokenizer;
    let cases = [
        ("Once upon a time, there was a", " little girl"),
        ("Lily liked to", " play in the park with her friends"),
        ("The dog", " ran"),
        ("Tom and Sue went to the big store to buy", " a red ball"),
    ];
    let rows: Vec<ScoreRow> = cases
        .iter()
        .map(|(c, x)| {
            let context = tok.encode_prompt(c).unwrap();
            let whole = tok.encode_prompt(&format!("{c}{x}")).unwrap();
            ScoreRow::continuation(&context, &whole[context.len()..])
        })
        .collect();
    let mut calls = Vec::new();
    // Batch size 3 over rows of four lengths: padding and a partial batch are exercised.
    let scores = score_rows(&loaded.model, &rows, 3, |n| calls.push(n)).unwrap();
    assert_eq!(calls, [3, 1]);
    for (row, got) in rows.iter().zip(&scores) {
        let reference = reference_log_probs(&loaded.model, &row.ids);
        let n = row.targets();
        assert_eq!(got.len(), n);
        let expected: Vec<f64> = reference[reference.len() - n..].to_vec();
        for (g, e) in got.iter().zip(&expected) {
            assert!((*g as f64 - e).abs() < 1e-4, "{got:?} vs {expected:?}");
        }
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        assert!(sum < 0.0 && sum.is_finite());
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn perplexity_is_exp_of_the_mean_nll_of_every_target_token() {
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "Once upon a time, there was a little dog.",
        "Lily went to the park. She was happy.",
    ];
    let lines: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
        .collect();
    let data = write(dir.path(), "val.jsonl", &lines);
    let config = EvalConfig {
        model: stories(),
        tasks: vec![TaskConfig {
            kind: Some(TaskKind::Perplexity),
            path: Some(data),
            ..TaskConfig::named("val")
        }],
        batch_size: 2,
        ..EvalConfig::default()
    };
    let report =
        evaluate::<Cpu>(&config.resolve().unwrap(), &Default::default(), &mut |_| {}).unwrap();
    let metrics = &report.tasks[0].results[0].metrics;

    // Independent: BOS + text + EOS, every token after the first is a target.
    let loaded = load(&stories());
    let eos = loaded.tokenizer.eos_ids[0];
    let (mut nll, mut count) = (0.0, 0usize);
    for text in texts {
        let mut ids = loaded.tokenizer.encode_prompt(text).unwrap();
        ids.push(eos);
        let lps = reference_log_probs(&loaded.model, &ids);
        nll -= lps.iter().sum::<f64>();
        count += lps.len();
    }
    let mean = nll / count as f64;
    assert_eq!(metrics["tokens"], count as f64);
    assert!(
        (metrics["loss"] - mean).abs() < 1e-4,
        "{} vs {mean}",
        metrics["loss"]
    );
    assert!((metrics["ppl"] - mean.exp()).abs() < 1e-3 * mean.exp());
    assert!((metrics["ppl"] - metrics["loss"].exp()).abs() < 1e-9);
}

#[test]
fn batched_greedy_generation_equals_one_by_one_decoding() {
    for dir in [stories(), gqa()] {
        let loaded = load(&dir);
        let tok = &loaded.tokenizer;
        let prompts: Vec<Vec<u32>> = [
            "Once upon a time",
            "The cat",
            "Lily and Tom went to the big park to play",
        ]
        .iter()
        .map(|p| tok.encode_prompt(p).unwrap())
        .collect();
        // Without stop strings every row runs to the end; with "." rows stop at different
        // steps, so finished rows leave the batch (their cache rows are dropped).
        for stop_strings in [Vec::new(), vec![".".to_string()]] {
            let settings = GreedySettings {
                max_new_tokens: 24,
                stop_ids: tok.eos_ids.clone(),
                stop_strings: stop_strings.clone(),
            };
            // Prompts of different lengths (left padding, masked attention), and one prompt
            // alone (no padding: the model's own causal path).
            let mut batched = generate_greedy(&loaded.model, tok, &prompts, &settings).unwrap();
            batched.extend(generate_greedy(&loaded.model, tok, &prompts[..1], &settings).unwrap());
            let mut lengths = Vec::new();
            for (prompt, got) in prompts.iter().chain(&prompts[..1]).zip(&batched) {
                let config = GenerateConfig {
                    max_new_tokens: 24,
                    sampling: SamplingConfig::default(),
                    stop_ids: tok.eos_ids.clone(),
                    stop_strings: stop_strings.clone(),
                };
                let alone = generate(&loaded.model, tok, prompt, &config, |_| {}).unwrap();
                assert_eq!(got.ids, alone.ids, "{} {stop_strings:?}", dir.display());
                assert_eq!(got.text, alone.text);
                assert_eq!(got.finish_reason, alone.finish_reason);
                lengths.push(got.ids.len());
            }
            if dir == stories() && !stop_strings.is_empty() {
                assert!(
                    lengths.iter().any(|&n| n < 24),
                    "some row stops early: {lengths:?}"
                );
            }
        }
    }
}

fn mc_file(dir: &Path) -> PathBuf {
    write(
        dir,
        "mc.jsonl",
        concat!(
            "{\"question\": \"What do cats say?\", \"choices\": [\"meow\", \"woof\", \"a loud moo\"], \"answer\": 0}\n",
            "{\"question\": \"Which is a colour?\", \"choices\": [\"table\", \"blue\"], \"answer\": \"B\"}\n",
            "{\"question\": \"Two plus two?\", \"choices\": [\"four\", \"five\", \"six\"], \"answer\": 0}\n",
        ),
    )
}

fn choice_lls(report: &EvalReport, task: usize, column: usize) -> Vec<Vec<f64>> {
    report.tasks[task].results[column]
        .samples
        .iter()
        .map(|s| match s {
            Sample::Choice(c) => c.log_likelihoods.clone(),
            _ => panic!("expected a choice sample"),
        })
        .collect()
}

#[test]
fn adapter_columns_differ_from_base_and_match_an_independent_adapter_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mc = mc_file(dir.path());
    let text = write(
        dir.path(),
        "text.jsonl",
        "{\"text\": \"hello world, this is a test\"}\n",
    );
    let config = EvalConfig {
        model: gqa(),
        adapters: vec![AdapterSpec {
            name: "fixture".into(),
            path: gqa().join("adapter"),
        }],
        tasks: vec![
            TaskConfig {
                kind: Some(TaskKind::MultipleChoice),
                path: Some(mc),
                ..TaskConfig::named("mc")
            },
            TaskConfig {
                kind: Some(TaskKind::Perplexity),
                path: Some(text),
                ..TaskConfig::named("ppl")
            },
        ],
        batch_size: 4,
        ..EvalConfig::default()
    };
    let mut events = 0;
    let report = evaluate::<Cpu>(&config.resolve().unwrap(), &Default::default(), &mut |_| {
        events += 1
    })
    .unwrap();
    assert!(events >= 4, "progress is reported per batch");
    assert_eq!(
        report
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["base", "fixture"]
    );
    assert_eq!(report.columns[1].lora_r, Some(8));
    let (base, adapted) = (choice_lls(&report, 0, 0), choice_lls(&report, 0, 1));
    let max_diff = base
        .iter()
        .flatten()
        .zip(adapted.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        max_diff > 1e-2,
        "the adapter changes the scores (max diff {max_diff})"
    );
    let ppl = |c: usize| report.tasks[1].results[c].metrics["ppl"];
    assert!((ppl(0) - ppl(1)).abs() > 1e-3, "{} vs {}", ppl(0), ppl(1));

    // Independent: the adapter loaded onto a fresh model, full-sequence forward per choice.
    let mut loaded = load(&gqa());
    let tok = &loaded.tokenizer;
    let context = tok
        .encode_prompt("Question: What do cats say?\nAnswer:")
        .unwrap();
    let whole = tok
        .encode_prompt("Question: What do cats say?\nAnswer: woof")
        .unwrap();
    let continuation = whole.len() - context.len();
    let base_ref: f64 = reference_log_probs(&loaded.model, &whole)
        .iter()
        .rev()
        .take(continuation)
        .sum();
    loaded.model.load_adapter(&gqa().join("adapter")).unwrap();
    let adapter_ref: f64 = reference_log_probs(&loaded.model, &whole)
        .iter()
        .rev()
        .take(continuation)
        .sum();
    assert!(
        (base[0][1] - base_ref).abs() < 1e-3,
        "{} vs {base_ref}",
        base[0][1]
    );
    assert!(
        (adapted[0][1] - adapter_ref).abs() < 1e-3,
        "{} vs {adapter_ref}",
        adapted[0][1]
    );
}

#[test]
fn limit_and_report_files_on_openbookqa_and_gsm8k() {
    let config = EvalConfig {
        model: stories(),
        tasks: vec![
            TaskConfig {
                path: Some(root().join("datasets/eval/openbookqa_test.jsonl")),
                ..TaskConfig::named("openbookqa")
            },
            TaskConfig {
                path: Some(root().join("datasets/eval/gsm8k_test.jsonl")),
                max_new_tokens: Some(8),
                fewshot: Some(1),
                fewshot_path: Some(root().join("datasets/gsm8k_train.jsonl")),
                ..TaskConfig::named("gsm8k")
            },
        ],
        limit: Some(3),
        batch_size: 2,
        ..EvalConfig::default()
    };
    let report =
        evaluate::<Cpu>(&config.resolve().unwrap(), &Default::default(), &mut |_| {}).unwrap();
    let obqa = &report.tasks[0];
    assert_eq!((obqa.evaluated, obqa.available, obqa.rows), (3, 500, 12));
    assert_eq!(obqa.results[0].samples.len(), 3);
    let gsm = &report.tasks[1];
    assert_eq!((gsm.evaluated, gsm.available), (3, 1319));
    assert_eq!(gsm.prompt.fewshot_lines, [1]);
    assert!(
        gsm.prompt
            .example
            .starts_with("Question: Natalia sold clips"),
        "{}",
        gsm.prompt.example
    );
    for sample in &gsm.results[0].samples {
        let Sample::Generated(g) = sample else {
            panic!("expected generations")
        };
        assert!(g.new_tokens <= 8 && g.new_tokens > 0);
    }

    let out = tempfile::tempdir().unwrap();
    let (json_path, md_path) = write_report(&report, out.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["plan"]["limit"], 3);
    assert_eq!(json["tasks"][1]["generation"]["max_new_tokens"], 8);
    assert!(json["tasks"][0]["results"][0]["metrics"]["acc_norm"].is_number());
    let back: EvalReport = serde_json::from_value(json).unwrap();
    assert_eq!(back.tasks.len(), 2);
    let md = std::fs::read_to_string(&md_path).unwrap();
    let header = md
        .lines()
        .find(|l| l.starts_with("| task | metric"))
        .unwrap();
    assert_eq!(header, "| task | metric | n | base |");
    let table: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| task | metric"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(
        table.iter().all(|l| l.matches('|').count() == 5),
        "{table:?}"
    );
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("| openbookqa | acc_norm | 3 |")),
        "{md}"
    );
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("| gsm8k | numeric_match | 3 |")),
        "{md}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
}
