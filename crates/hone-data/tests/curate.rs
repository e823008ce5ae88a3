//! Curation: cleanup, filters, exact and near-duplicate removal, decontamination, the split,
//! the report and the atomic writer; plus the shipped data sets.

mod common;

use std::collections::HashSet;

use common::*;
use hone_data::{
    prepare, prepare_with, read_curated, summary_table, write_prepared, write_prepared_with,
    DataConfig, DataError, Example, FormatChoice, Overwrite, RemovalReason, ShingleUnit,
    SourcedExample,
};
use serde_json::json;

fn text_rows(texts: &[String]) -> Vec<serde_json::Value> {
    texts.iter().map(|t| json!({ "text": t })).collect()
}

fn texts(examples: &[SourcedExample]) -> Vec<String> {
    examples.iter().map(|e| text_of(e).to_string()).collect()
}

/// `count` distinct 40-word texts, and for each a copy with one middle word changed.
fn planted_pairs(seed: u64, count: usize) -> (Vec<String>, Vec<String>) {
    let mut rng = Rng(seed);
    let mut originals = Vec::new();
    let mut variants = Vec::new();
    for _ in 0..count {
        let mut words = random_words(&mut rng, 40);
        originals.push(words.join(" "));
        let at = 10 + rng.below(20);
        words[at] = "changedword".to_string();
        variants.push(words.join(" "));
    }
    (originals, variants)
}

#[test]
fn minhash_removes_planted_near_duplicates_and_keeps_distinct_texts() {
    let dir = tempdir();
    let (originals, variants) = planted_pairs(1, 30);
    // Interleave: each original is followed later by its variant.
    let mut all = originals.clone();
    all.extend(variants.iter().take(15).cloned());
    // 20 more distinct texts that are not near anything.
    let (extra, _) = planted_pairs(2, 20);
    all.extend(extra.iter().cloned());
    all.extend(variants.iter().skip(15).cloned());
    let f = write_jsonl(dir.path(), "t.jsonl", &text_rows(&all));
    let mut c = bare_config(&[f]);
    c.dedupe.near.enabled = true;
    let p = prepare(&c).unwrap();
    let kept: HashSet<String> = texts(&p.train).into_iter().collect();
    let expected: HashSet<String> = originals.iter().chain(&extra).cloned().collect();
    assert_eq!(kept, expected);
    assert_eq!(p.report.removed[&RemovalReason::NearDuplicate], 30);
    let sample = &p.report.removed_examples[&RemovalReason::NearDuplicate][0];
    assert_eq!(sample.line, 31, "the first variant is on line 31");
    assert!(
        sample.detail.starts_with("near-duplicate of ") && sample.detail.contains(":1 "),
        "{}",
        sample.detail
    );
}

#[test]
fn char_ngram_minhash_also_finds_near_duplicates() {
    let dir = tempdir();
    let (originals, variants) = planted_pairs(3, 10);
    let mut all = originals.clone();
    all.extend(variants);
    let f = write_jsonl(dir.path(), "t.jsonl", &text_rows(&all));
    let mut c = bare_config(&[f]);
    c.dedupe.near.enabled = true;
    c.dedupe.near.unit = ShingleUnit::Chars;
    c.dedupe.near.ngram = 5;
    let p = prepare(&c).unwrap();
    assert_eq!(texts(&p.train), originals);
}

#[test]
fn near_duplicates_never_straddle_train_and_val() {
    let dir = tempdir();
    let (originals, variants) = planted_pairs(4, 150);
    let mut all = originals.clone();
    all.extend(variants);
    let f = write_jsonl(dir.path(), "t.jsonl", &text_rows(&all));
    let mut c = bare_config(&[f]);
    c.split.val_fraction = 0.3;
    let leaks = |c: &DataConfig| {
        let p = prepare(c).unwrap();
        let train: Vec<_> = p.train.iter().map(|e| trigrams(text_of(e))).collect();
        p.val
            .iter()
            .filter(|v| {
                let v = trigrams(text_of(v));
                train.iter().any(|t| jaccard(t, &v) >= 0.7)
            })
            .count()
    };
    // Without near-dedupe, planted pairs do land on both sides...
    assert!(leaks(&c) > 10);
    // ...with it, none does.
    c.dedupe.near.enabled = true;
    assert_eq!(leaks(&c), 0);
    let p = prepare(&c).unwrap();
    assert_eq!(p.report.kept.train + p.report.kept.val, 150);
}

#[test]
fn split_is_deterministic_order_independent_and_exact() {
    let dir = tempdir();
    let mut rng = Rng(5);
    let all: Vec<String> = (0..1000)
        .map(|i| format!("example {i} {}", random_words(&mut rng, 5).join(" ")))
        .collect();
    let mut reversed = all.clone();
    reversed.reverse();
    let f = write_jsonl(dir.path(), "a.jsonl", &text_rows(&all));
    let g = write_jsonl(dir.path(), "b.jsonl", &text_rows(&reversed));
    let val_of = |path: &str, seed: u64, fraction: f64| {
        let mut c = bare_config(&[path.to_string()]);
        c.split.val_fraction = fraction;
        c.split.seed = seed;
        let p = prepare(&c).unwrap();
        assert_eq!(p.train.len() + p.val.len(), 1000);
        texts(&p.val).into_iter().collect::<HashSet<_>>()
    };
    let v1 = val_of(&f, 42, 0.2);
    assert_eq!(v1.len(), 200);
    assert_eq!(val_of(&f, 42, 0.2), v1, "same seed, same split");
    assert_eq!(val_of(&g, 42, 0.2), v1, "input order does not matter");
    let other = val_of(&f, 7, 0.2);
    assert!(
        other.intersection(&v1).count() < 100,
        "another seed gives another split"
    );
    assert_eq!(val_of(&f, 42, 0.05).len(), 50);
    assert_eq!(val_of(&f, 42, 0.0).len(), 0);
}

#[test]
fn decontamination_drops_a_planted_overlap() {
    let dir = tempdir();
    let eval = write_jsonl(
        dir.path(),
        "eval.jsonl",
        &[
            json!({"id": 1, "question": {"stem": "unrelated evaluation text about planets"}}),
            json!({"id": 2, "question": {"stem": "Janet has three ducks that lay sixteen eggs every day and she eats three for breakfast every morning"}, "answer": "9"}),
        ],
    );
    let train = vec![
        // 13 consecutive words of eval line 2, with other case and punctuation.
        "Q: JANET has three ducks, that lay sixteen eggs every day; and she eats three for lunch."
            .to_string(),
        // Only 12 of them: kept.
        "Janet has three ducks that lay sixteen eggs every day and she sells them".to_string(),
        "A completely different training text about cooking rice and beans".to_string(),
    ];
    let f = write_jsonl(dir.path(), "train.jsonl", &text_rows(&train));
    let mut c = bare_config(&[f]);
    c.decontaminate.eval_files = vec![eval.clone()];
    let p = prepare(&c).unwrap();
    assert_eq!(texts(&p.train), train[1..].to_vec());
    assert_eq!(p.report.removed[&RemovalReason::Contaminated], 1);
    let sample = &p.report.removed_examples[&RemovalReason::Contaminated][0];
    assert_eq!(sample.line, 1);
    assert!(
        sample.detail.contains(&format!("{eval}:2")),
        "{}",
        sample.detail
    );
    let d = p.report.decontamination.as_ref().unwrap();
    assert_eq!((d.eval_records, d.ngram), (2, 13));
}

#[test]
fn exact_duplicates_are_found_after_cleanup() {
    let dir = tempdir();
    let rows = vec![
        json!({"prompt": "Caf\u{e9} question", "completion": "An answer."}),
        json!({"prompt": "Cafe\u{301}  question ", "completion": "An answer.\r\n"}),
        json!({"prompt": "Another question", "completion": "An answer."}),
        json!({"prompt": "Caf\u{e9} question", "completion": "An answer."}),
    ];
    let f = write_jsonl(dir.path(), "d.jsonl", &rows);
    let mut c = bare_config(std::slice::from_ref(&f));
    c.dedupe.exact = true;
    let p = prepare(&c).unwrap();
    assert_eq!(
        p.train.iter().map(|e| e.source.line).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(p.report.removed[&RemovalReason::ExactDuplicate], 2);
    assert_eq!(p.report.cleaned.nfc, 1);
    assert_eq!(p.report.cleaned.whitespace, 1);
    let detail = &p.report.removed_examples[&RemovalReason::ExactDuplicate][0].detail;
    assert_eq!(detail, &format!("same text as {f}:1"));
    // Without cleanup, only the byte-identical copy goes.
    c.clean.nfc = false;
    c.clean.whitespace = false;
    let p = prepare(&c).unwrap();
    assert_eq!(
        p.train.iter().map(|e| e.source.line).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[test]
fn filters_drop_empty_assistantless_and_out_of_bounds_examples() {
    let dir = tempdir();
    let rows = vec![
        json!({"messages": [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "hi, how are you"}]}), // 1 kept
        json!({"messages": [{"role": "user", "content": "only a question"}]}), // 2 no assistant
        json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \t "}]}), // 3 empty
        json!({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]}), // 4 too short (3 chars)
        json!({"messages": [{"role": "user", "content": "x".repeat(60)}, {"role": "assistant", "content": "y"}]}), // 5 too long
        json!({"messages": [{"role": "user", "content": "one two three four five six"}, {"role": "assistant", "content": "seven eight nine ten"}]}), // 6 too many tokens
    ];
    let f = write_jsonl(dir.path(), "m.jsonl", &rows);
    let mut c = bare_config(&[f]);
    c.format = FormatChoice::Messages;
    c.filter.min_chars = Some(5);
    c.filter.max_chars = Some(50);
    c.filter.max_tokens = Some(8);
    let err = prepare(&c).expect_err("token bounds need a counter");
    assert!(
        matches!(err, DataError::Config { ref key, .. } if key == "filter.max_tokens"),
        "{err}"
    );
    let words = |s: &str| s.split_whitespace().count();
    let p = prepare_with(&c, Some(&words)).unwrap();
    assert_eq!(
        p.train.iter().map(|e| e.source.line).collect::<Vec<_>>(),
        vec![1]
    );
    let r = &p.report.removed;
    assert_eq!(
        (
            r[&RemovalReason::NoAssistant],
            r[&RemovalReason::Empty],
            r[&RemovalReason::TooShort],
            r[&RemovalReason::TooLong],
            r[&RemovalReason::TooManyTokens]
        ),
        (1, 1, 1, 1, 1)
    );
    let t = p.report.token_length.unwrap();
    assert_eq!((t.min, t.max), (7, 7), "3 + 4 words");
    let ch = p.report.char_length.unwrap();
    assert_eq!(ch.max, "hello there friend".len() + "hi, how are you".len());
}

#[test]
fn output_is_written_atomically_and_replaces_the_whole_directory() {
    let dir = tempdir();
    let rows: Vec<_> = (0..20).map(|i| json!({"prompt": format!("question number {i}"), "completion": format!("answer {i}")})).collect();
    let f = write_jsonl(dir.path(), "in.jsonl", &rows);
    let mut c = bare_config(&[f]);
    c.split.val_fraction = 0.25;
    let p = prepare(&c).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "old run").unwrap();
    write_prepared_with(&p, &out, Overwrite::Any).unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["report.json", "train.jsonl", "val.jsonl"]);
    let train_text = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    assert_eq!(train_text.lines().count(), 15);
    let first: serde_json::Value =
        serde_json::from_str(train_text.lines().next().unwrap()).unwrap();
    assert_eq!(first["messages"][0]["role"], "user");
    assert_eq!(first["messages"][1]["role"], "assistant");
    assert_eq!(
        first.as_object().unwrap().len(),
        1,
        "only `messages` on a line"
    );
    let back = read_curated(&out.join("val.jsonl")).unwrap();
    assert_eq!(
        back.iter().map(|e| e.example.clone()).collect::<Vec<_>>(),
        p.val.iter().map(|e| e.example.clone()).collect::<Vec<_>>()
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["input_records"], 20);
    assert_eq!(report["detected_format"], "completion");
    assert_eq!(report["kept"], json!({"train": 15, "val": 5}));
    assert_eq!(report["removed"]["near_duplicate"], 0);
    assert!(report["errors"].as_array().unwrap().is_empty());
    for key in ["min", "median", "p95", "max"] {
        assert!(report["char_length"][key].is_u64(), "{key}");
    }

    // Nothing but `in.jsonl` and `out` next to the output: no temp or backup dirs.
    let mut siblings: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    siblings.sort();
    assert_eq!(siblings, vec!["in.jsonl", "out"]);

    // A target that is a file is refused and left alone, with no temp dir left behind.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "keep me").unwrap();
    assert!(write_prepared(&p, &blocker).is_err());
    assert_eq!(std::fs::read_to_string(&blocker).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn summary_table_shows_counts() {
    let dir = tempdir();
    let rows = vec![
        json!({"text": "a b c"}),
        json!({"text": "a b c"}),
        json!({"text": "d e f"}),
    ];
    let f = write_jsonl(dir.path(), "t.jsonl", &rows);
    let mut c = bare_config(&[f]);
    c.dedupe.exact = true;
    let p = prepare(&c).unwrap();
    let table = summary_table(&p.report);
    assert!(
        table.contains("records   3 in 1 file, format text"),
        "{table}"
    );
    assert!(table.contains("train 2   val 0"), "{table}");
    assert!(table.contains("1 (exact_duplicate 1)"), "{table}");
    assert!(
        table.contains("min 5   median 5   p95 5   max 5"),
        "{table}"
    );
}

/// The data sets shipped in `datasets/` are read with `auto` and give the README's counts.
#[test]
fn shipped_datasets_are_detected_and_counted() {
    let root = manifest_dir().join("../../datasets");
    let cases = [
        (
            "gsm8k_train.jsonl",
            "completion (prompt=question, completion=answer)",
            7473,
        ),
        ("alpaca_libre_ok.jsonl", "alpaca", 1202),
        (
            "self_instruct_seed_tasks.jsonl",
            "alpaca (input=instances.0.input, output=instances.0.output)",
            175,
        ),
        (
            "eval/gsm8k_test.jsonl",
            "completion (prompt=question, completion=answer)",
            1319,
        ),
    ];
    for (name, format, rows) in cases {
        let path = root.join(name).to_string_lossy().into_owned();
        let mut c = DataConfig::new([path]);
        c.dedupe.near.enabled = false;
        let p = prepare(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.report.files[0].format.as_deref(), Some(format), "{name}");
        assert_eq!(p.report.input_records, rows, "{name}");
        assert!(p.report.errors.is_empty());
    }
}

/// GSM8K train against its test split: decontamination and MinHash run on real data.
#[test]
fn gsm8k_curates_with_decontamination() {
    let root = manifest_dir().join("../../datasets");
    let mut c = DataConfig::new([root
        .join("gsm8k_train.jsonl")
        .to_string_lossy()
        .into_owned()]);
    c.decontaminate.eval_files = vec![root.join("eval/*.jsonl").to_string_lossy().into_owned()];
    let p = prepare(&c).unwrap();
    let r = &p.report;
    assert_eq!(r.input_records, 7473);
    assert_eq!(r.kept.train + r.kept.val + r.total_removed(), 7473);
    assert_eq!(r.decontamination.as_ref().unwrap().eval_records, 1319 + 500);
    // 5% validation, rounded.
    let kept = r.kept.train + r.kept.val;
    assert_eq!(r.kept.val, (kept as f64 * 0.05).round() as usize);
    assert!(r.total_removed() < 200, "{}", summary_table(r));
}

/// Timing check: 100k GSM8K-sized examples (GSM8K train repeated, every copy with a few words
/// changed) through the whole pipeline with MinHash. Run with
/// `cargo test --release -p hone-data -- --ignored --nocapture curation_speed`.
#[test]
#[ignore = "benchmark; prints timings"]
fn curation_speed_on_100k_gsm8k_sized_examples() {
    let root = manifest_dir().join("../../datasets/gsm8k_train.jsonl");
    let source = std::fs::read_to_string(root).unwrap();
    let rows: Vec<serde_json::Value> = source
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut rng = Rng(9);
    let mut out = String::new();
    for i in 0..100_000 {
        let mut row = rows[i % rows.len()].clone();
        if i >= rows.len() {
            let q = row["question"].as_str().unwrap().to_string();
            let mut words: Vec<&str> = q.split(' ').collect();
            let fresh: Vec<String> = (0..words.len() / 3)
                .map(|_| word(rng.below(2000)))
                .collect();
            for f in &fresh {
                let at = rng.below(words.len());
                words[at] = f;
            }
            row["question"] = json!(words.join(" "));
        }
        out.push_str(&row.to_string());
        out.push('\n');
    }
    let dir = tempdir();
    let f = write(dir.path(), "big.jsonl", out);
    let c = DataConfig::new([f]);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let t = std::time::Instant::now();
    let p = prepare(&c).unwrap();
    eprintln!("{}", summary_table(&p.report));
    eprintln!("prepare: {:.2}s", t.elapsed().as_secs_f64());
}

/// Regression: `--input DIR/raw.jsonl --out DIR` replaced DIR as a whole and so deleted the
/// input, leaving only train/val/report.
#[test]
fn output_directory_holding_an_input_is_never_replaced_even_with_force() {
    let dir = tempdir();
    let rows: Vec<_> = (0..4)
        .map(|i| json!({"prompt": format!("question {i}"), "completion": format!("answer {i}")}))
        .collect();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let f = write_jsonl(&data, "raw.jsonl", &rows);
    let p = prepare(&bare_config(std::slice::from_ref(&f))).unwrap();
    // Spelled another way: the comparison is of canonical paths.
    let out = data.join("..").join("data");
    for overwrite in [Overwrite::Prepared, Overwrite::Any] {
        let err = write_prepared_with(&p, &out, overwrite).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DataError::Output { .. })
                && msg.contains("raw.jsonl")
                && msg.contains("even with --force"),
            "{msg}"
        );
        assert!(
            std::path::Path::new(&f).is_file(),
            "the input is still there"
        );
    }
}

#[test]
fn foreign_output_directory_needs_force_and_a_previous_output_is_replaced_without() {
    let dir = tempdir();
    let rows: Vec<_> = (0..4)
        .map(|i| json!({"prompt": format!("question {i}"), "completion": format!("answer {i}")}))
        .collect();
    let f = write_jsonl(dir.path(), "in.jsonl", &rows);
    let p = prepare(&bare_config(&[f])).unwrap();
    let out = dir.path().join("out");

    // A previous output (and an empty directory) is replaced without asking.
    std::fs::create_dir(&out).unwrap();
    write_prepared(&p, &out).unwrap();
    write_prepared(&p, &out).unwrap();

    // Anything else in it: refused, naming the file, and left alone.
    std::fs::write(out.join("notes.md"), "mine").unwrap();
    let msg = write_prepared(&p, &out).unwrap_err().to_string();
    assert!(
        msg.contains("notes.md") && msg.contains("--force") && msg.contains("not an output"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.md")).unwrap(),
        "mine"
    );

    // A report.json that is not hone's does not make a directory an output either.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("report.json"), "{\"quarter\": 3}").unwrap();
    assert!(write_prepared(&p, &other).is_err());
    assert!(other.join("report.json").is_file());

    write_prepared_with(&p, &out, Overwrite::Any).unwrap();
    assert!(!out.join("notes.md").exists());
    assert!(out.join("train.jsonl").is_file());
}

#[test]
fn raw_text_is_curated_as_a_text_line_and_read_back_as_text() {
    let dir = tempdir();
    let f = write_jsonl(
        dir.path(),
        "in.jsonl",
        &text_rows(&["Once upon a time.".into()]),
    );
    let p = prepare(&bare_config(&[f])).unwrap();
    let out = dir.path().join("out");
    write_prepared(&p, &out).unwrap();
    let line = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    assert_eq!(line, "{\"text\":\"Once upon a time.\"}\n");
    let back = read_curated(&out.join("train.jsonl")).unwrap();
    assert_eq!(back[0].example, Example::text("Once upon a time."));
}

/// Curated files written before `{"text": ...}` held raw text as one message with the role
/// `text`; they still read as raw text, through `read_curated` and as `hone data` input.
#[test]
fn an_old_curated_text_role_line_still_reads_as_text() {
    let dir = tempdir();
    let old = write(
        dir.path(),
        "train.jsonl",
        "{\"messages\":[{\"role\":\"text\",\"content\":\"Once upon a time.\"}]}\n",
    );
    let back = read_curated(std::path::Path::new(&old)).unwrap();
    assert_eq!(back[0].example, Example::text("Once upon a time."));
    let p = prepare(&bare_config(&[old])).unwrap();
    assert_eq!(p.train[0].example, Example::text("Once upon a time."));
}
