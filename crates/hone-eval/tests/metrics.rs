//! Metrics, prompt templates, data readers and config resolution on hand-computed cases (no
//! model involved).

use std::path::{Path, PathBuf};

use hone_eval::data::{read_generation, read_lm, read_multiple_choice};
use hone_eval::metrics::*;
use hone_eval::prompt::{Field, PromptTemplate, Values};
use hone_eval::{EvalConfig, EvalError, TaskConfig, TaskKind};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn rouge_l_matches_hand_computed_lcs_f_measures() {
    // LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert!(close(
        rouge_l("the cat sat on the mat", "the cat is on the mat"),
        5.0 / 6.0
    ));
    // LCS "a c" = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert!(close(rouge_l("a b c d", "a c e"), 4.0 / 7.0));
    // Order matters (subsequence, not bag of words): LCS of "c b a" and "a b c" is 1.
    assert!(close(rouge_l("c b a", "a b c"), 1.0 / 3.0));
    assert!(close(rouge_l("The  Cat\n", "the cat"), 1.0));
    assert_eq!(rouge_l("", "a"), 0.0);
    assert_eq!(rouge_l("a", ""), 0.0);
    assert_eq!(rouge_l("x y", "a b"), 0.0);
    assert_eq!(lcs_len(&[1, 3, 4, 1, 2], &[3, 4, 1, 2, 1, 3]), 4);
}

#[test]
fn numbers_are_extracted_with_commas_negatives_and_decimals() {
    assert_eq!(extract_numbers("The answer is 1,234."), vec![1234.0]);
    assert_eq!(extract_numbers("x = -2.5 and .5"), vec![-2.5, 0.5]);
    assert_eq!(extract_numbers("16-3-4=9"), vec![16.0, 3.0, 4.0, 9.0]);
    assert_eq!(
        extract_numbers("costs $3.50, total 1,000,000.25"),
        vec![3.5, 1_000_000.25]
    );
    assert_eq!(
        extract_numbers("1,23 and 1,2345"),
        vec![1.0, 23.0, 1.0, 2345.0]
    );
    assert_eq!(extract_numbers("(-7) is -7"), vec![-7.0, -7.0]);
    assert_eq!(extract_numbers("no digits"), Vec::<f64>::new());
    assert_eq!(answer_number("so 5 + 3\n#### 18\nlater 20"), Some(18.0));
    assert_eq!(answer_number("#### -5"), Some(-5.0));
    assert_eq!(
        answer_number("She makes 9 * 2 = $18 every day."),
        Some(18.0)
    );
    assert_eq!(answer_number("none"), None);
}

#[test]
fn numeric_match_compares_the_final_numbers() {
    let reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72";
    assert!(numeric_match("She sold 48 + 24 = 72 clips.", reference));
    assert!(numeric_match("#### 72.0", reference));
    assert!(!numeric_match("She sold 72 then 73", reference));
    assert!(!numeric_match("no idea", reference));
    assert!(numeric_match("It costs $1,000.", "#### 1000"));
    assert!(numeric_match("-3", "#### -3"));
    assert!(!numeric_match("3", "#### -3"));
}

#[test]
fn exact_match_normalises_case_punctuation_articles_and_space() {
    assert_eq!(
        normalize_answer("The  Answer, is:\tA  Dog!"),
        "answer is dog"
    );
    assert!(exact_match(" The answer\n", "answer."));
    assert!(exact_match("work... #### 18", "steps\n#### 18"));
    assert!(!exact_match("18 apples", "#### 18"));
    assert!(contains_answer("I think it is 18 apples", "#### 18"));
    assert!(!contains_answer("it is 180", "#### 18"));
    assert!(contains_answer("It was the Big Red Dog.", "big red dog"));
    assert!(!contains_answer("anything", ""));
}

#[test]
fn acc_and_acc_norm_disagree_on_a_constructed_case() {
    // Choice 0: short (2 chars), total -4 (-2 per char). Choice 1: long (12 chars), total -6
    // (-0.5 per char). acc picks the higher total, acc_norm the higher per-character value.
    let lls = [-4.0, -6.0];
    let chars = [2, 12];
    assert_eq!(choose(&lls), Some(0));
    assert_eq!(choose_normalized(&lls, &chars), Some(1));
    assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1), "ties go to the first");
    assert_eq!(argmax(&[]), None);
    assert!(close(perplexity(4f64.ln()), 4.0));
    assert!(close(mean_stderr(0.5, 5), (0.25f64 / 4.0).sqrt()));
}

#[test]
fn prompt_templates_substitute_and_reject_unknown_placeholders() {
    let t = PromptTemplate::parse(
        "Q: {question}\n{choices}\n{{A}}:",
        &[Field::Question, Field::Choices],
    )
    .unwrap();
    let out = t.render(&Values {
        question: "Why?",
        choices: "A. x\nB. y",
        ..Values::default()
    });
    assert_eq!(out, "Q: Why?\nA. x\nB. y\n{A}:");
    let err = PromptTemplate::parse("{question} {answer}", &[Field::Question]).unwrap_err();
    assert!(
        err.to_string().contains("{answer}") && err.to_string().contains("{question}"),
        "{err}"
    );
    assert!(
        PromptTemplate::parse("{choices}", &[Field::Question]).is_err(),
        "not allowed here"
    );
    assert!(PromptTemplate::parse("open {question", &[Field::Question]).is_err());
    assert!(PromptTemplate::parse("close }", &[Field::Question]).is_err());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn readers_accept_openbookqa_and_generic_records_and_name_bad_lines() {
    let obqa =
        read_multiple_choice(&root().join("datasets/eval/openbookqa_test.jsonl"), Some(2)).unwrap();
    assert_eq!(obqa.items.len(), 2);
    assert_eq!(obqa.available, 500);
    let first = &obqa.items[0];
    assert!(first
        .question
        .starts_with("A person wants to start saving money"));
    assert_eq!(first.labels, ["A", "B", "C", "D"]);
    assert_eq!(
        (first.answer, first.choices[1].as_str()),
        (1, "quit eating lunch out")
    );

    let dir = tempfile::tempdir().unwrap();
    let generic = write(
        dir.path(),
        "mc.jsonl",
        concat!(
            "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": 1}\n",
            "\n",
            "{\"question\": \"Sky?\", \"choices\": {\"text\": [\"red\", \"blue\"], \"label\": [\"1\", \"2\"]}, \"answerKey\": \"2\"}\n",
            "{\"question\": \"Up?\", \"choices\": [{\"text\": \"no\", \"label\": \"X\"}, {\"text\": \"yes\", \"label\": \"Y\"}], \"answer\": \"Y\"}\n",
        ),
    );
    let items = read_multiple_choice(&generic, None).unwrap().items;
    assert_eq!(
        items.iter().map(|i| i.answer).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    assert_eq!(items[0].labels, ["A", "B"]);
    assert_eq!(items[1].line, 3);

    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": \"C\"}\n",
    );
    let err = read_multiple_choice(&bad, None).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EvalError::Record { line: 1, .. }), "{text}");
    assert!(
        text.contains("bad.jsonl:1") && text.contains("`answer`") && text.contains("A, B"),
        "{text}"
    );

    let no_answer = write(dir.path(), "no_answer.jsonl", "{\"question\": \"q\"}\n");
    let err = read_generation(&no_answer, None).unwrap_err();
    assert!(
        err.to_string().contains("no_answer.jsonl:1") && err.to_string().contains("answer"),
        "{err}"
    );
    let err = read_lm(&no_answer, None).unwrap_err();
    assert!(
        err.to_string().contains("no_answer.jsonl:1") && err.to_string().contains("messages"),
        "{err}"
    );
    let broken = write(dir.path(), "broken.jsonl", "{\"text\": \"fine\"}\n{oops\n");
    let err = read_lm(&broken, None).unwrap_err();
    assert!(matches!(err, EvalError::Json { line: 2, .. }), "{err}");
    assert_eq!(
        read_lm(&broken, Some(1)).unwrap().items.len(),
        1,
        "lines past the limit are not parsed"
    );

    let gsm = read_generation(&root().join("datasets/eval/gsm8k_test.jsonl"), Some(1)).unwrap();
    assert_eq!(answer_number(&gsm.items[0].answer), Some(18.0));
}

#[test]
fn config_resolves_presets_and_names_bad_keys() {
    let toml = format!(
        r#"
[train]
ignored = true

[eval]
model = "{root}/checkpoints/base/stories260k"
limit = 3
[[eval.tasks]]
name = "openbookqa"
path = "{root}/datasets/eval/openbookqa_test.jsonl"
[[eval.tasks]]
name = "gsm8k"
path = "{root}/datasets/eval/gsm8k_test.jsonl"
max_new_tokens = 16
"#,
        root = root().display()
    );
    let config = EvalConfig::from_toml_str(&toml, Path::new("x.toml")).unwrap();
    let plan = config.resolve().unwrap();
    assert_eq!(plan.tasks[0].kind, TaskKind::MultipleChoice);
    assert_eq!(plan.tasks[0].prompt, "Question: {question}\nAnswer:");
    assert_eq!(plan.tasks[0].choice_format, " {choice}");
    assert_eq!(plan.tasks[1].kind, TaskKind::Generation);
    assert_eq!(
        (plan.tasks[1].max_new_tokens, plan.tasks[1].limit),
        (16, Some(3))
    );
    assert_eq!(plan.tasks[1].stop, ["Question:", "\n\n"]);
    assert_eq!(plan.columns(), ["base"]);

    let err = EvalConfig::from_toml_str("[eval]\nbatch = 4\n", Path::new("x.toml")).unwrap_err();
    assert!(err.to_string().contains("batch"), "{err}");

    let mut config = config.clone();
    config.tasks.push(TaskConfig::named("mine"));
    let err = config.resolve().unwrap_err();
    assert!(err.to_string().contains("tasks.mine.kind"), "{err}");
    config.tasks.pop();
    config.batch_size = 0;
    assert!(config
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("batch_size"));
    config.batch_size = 2;
    config.tasks[0].prompt = Some("{question} {bogus}".into());
    assert!(config
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("{bogus}"));
    config.tasks[0].prompt = None;
    config
        .adapters
        .push("x=/nonexistent/adapter".parse().unwrap());
    let err = config.resolve().unwrap_err();
    assert!(err.to_string().contains("/nonexistent/adapter"), "{err}");
}

fn ppl_sample(line: usize, nll: f64, tokens: usize) -> hone_eval::report::Sample {
    hone_eval::report::Sample::Perplexity(hone_eval::report::PerplexitySample { line, nll, tokens })
}

#[test]
fn loss_stderr_is_the_per_example_spread_of_the_token_weighted_mean() {
    use hone_eval::aggregate::task_metrics;
    // Hand computed: L = 9 / 6 = 1.5, mean tokens 2, u = (0.25, 0.75, -1.0),
    // SE = sqrt(1.625 / (3 * 2)).
    let samples = [
        ppl_sample(1, 2.0, 1),
        ppl_sample(2, 6.0, 3),
        ppl_sample(3, 1.0, 2),
    ];
    let m = task_metrics(hone_eval::TaskKind::Perplexity, &samples);
    assert!(close(m["loss"], 1.5), "{m:?}");
    assert!(close(m["loss_stderr"], (1.625f64 / 6.0).sqrt()), "{m:?}");
    assert!(close(m["ppl"], 1.5f64.exp()), "{m:?}");
    assert!(
        close(m["ppl_stderr"], 1.5f64.exp() * (1.625f64 / 6.0).sqrt()),
        "{m:?}"
    );
    assert_eq!(m["tokens"], 6.0);

    // Accuracy: 3 of 4, lm-evaluation-harness' sqrt(p (1 - p) / (n - 1)).
    let choice = |line: usize, predicted: usize| {
        hone_eval::report::Sample::Choice(hone_eval::report::ChoiceSample {
            line,
            answer: 1,
            predicted,
            predicted_norm: 0,
            log_likelihoods: vec![-1.0, -2.0],
        })
    };
    let samples = [choice(1, 1), choice(2, 1), choice(3, 0), choice(4, 1)];
    let m = task_metrics(hone_eval::TaskKind::MultipleChoice, &samples);
    assert!(
        close(m["acc"], 0.75) && close(m["acc_stderr"], 0.25),
        "{m:?}"
    );
    assert!(
        close(m["acc_norm"], 0.0) && close(m["acc_norm_stderr"], 0.0),
        "{m:?}"
    );
}

#[test]
fn max_drop_gates_parse_task_metric_and_drop_and_reject_bad_drops() {
    use hone_eval::MaxDrop;
    let gate: MaxDrop = "openbookqa/acc=0.01".parse().unwrap();
    assert_eq!(gate.task.as_deref(), Some("openbookqa"));
    assert_eq!((gate.metric.as_str(), gate.max_drop), ("acc", 0.01));
    let gate: MaxDrop = "loss=0".parse().unwrap();
    assert_eq!(
        (gate.task, gate.metric.as_str(), gate.max_drop),
        (None, "loss", 0.0)
    );
    for bad in ["acc", "acc=-0.1", "acc=nan", "acc=x", "/acc=0.1", "=0.1"] {
        assert!(bad.parse::<MaxDrop>().is_err(), "{bad}");
    }
    use hone_eval::Direction;
    assert_eq!(Direction::of("ppl"), Some(Direction::LowerIsBetter));
    assert_eq!(Direction::of("rouge_l"), Some(Direction::HigherIsBetter));
    assert_eq!(Direction::of("tokens"), None);
    assert!(Direction::LowerIsBetter.drop(1.0, 1.2) > 0.0);
    assert!(Direction::HigherIsBetter.drop(0.5, 0.6) < 0.0);
}
