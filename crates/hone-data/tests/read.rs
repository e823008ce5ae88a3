//! Reading: every format, `auto` detection, field maps, file types, and bad input.

mod common;

use common::*;
use hone_data::{
    prepare, write_prepared, DataConfig, DataError, Example, FieldMap, FormatChoice, Message,
    OnError, Role,
};
use serde_json::json;

fn msgs(pairs: &[(Role, &str)]) -> Example {
    Example::Chat(pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect())
}

fn all_messages(config: &DataConfig) -> Vec<Example> {
    let p = prepare(config).expect("prepare");
    p.train.into_iter().map(|e| e.example).collect()
}

#[test]
fn alpaca_joins_instruction_and_input_into_the_user_turn() {
    let dir = tempdir();
    let f = write_jsonl(
        dir.path(),
        "a.jsonl",
        &[
            json!({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}),
            json!({"instruction": "Say hi.", "input": "", "output": "Hi!"}),
            json!({"instruction": "Be terse.", "output": "Ok.", "system": "You are brief."}),
        ],
    );
    let mut c = bare_config(&[f]);
    c.format = FormatChoice::Alpaca;
    assert_eq!(
        all_messages(&c),
        vec![
            msgs(&[
                (Role::User, "Add the numbers.\n\n2 and 3"),
                (Role::Assistant, "5")
            ]),
            msgs(&[(Role::User, "Say hi."), (Role::Assistant, "Hi!")]),
            msgs(&[
                (Role::System, "You are brief."),
                (Role::User, "Be terse."),
                (Role::Assistant, "Ok.")
            ]),
        ]
    );
}

#[test]
fn sharegpt_maps_human_gpt_and_system() {
    let dir = tempdir();
    let f = write_jsonl(
        dir.path(),
        "s.jsonl",
        &[json!({"conversations": [
            {"from": "system", "value": "Be nice."},
            {"from": "human", "value": "Hello"},
            {"from": "gpt", "value": "Hi there"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye"}
        ]})],
    );
    let mut c = bare_config(&[f]);
    c.format = FormatChoice::Sharegpt;
    assert_eq!(
        all_messages(&c),
        vec![msgs(&[
            (Role::System, "Be nice."),
            (Role::User, "Hello"),
            (Role::Assistant, "Hi there"),
            (Role::User, "Bye"),
            (Role::Assistant, "Goodbye"),
        ])]
    );
}

#[test]
fn openai_messages_keep_system_turns_and_join_text_parts() {
    let dir = tempdir();
    let f = write_jsonl(
        dir.path(),
        "m.jsonl",
        &[
            json!({"messages": [
                {"role": "system", "content": "Sys"},
                {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
                {"role": "assistant", "content": "Answer"}
            ]}),
            // An empty system message is dropped, not an error.
            json!({"messages": [
                {"role": "system", "content": "  "},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}
            ]}),
        ],
    );
    let mut c = bare_config(&[f]);
    c.format = FormatChoice::Messages;
    assert_eq!(
        all_messages(&c),
        vec![
            msgs(&[
                (Role::System, "Sys"),
                (Role::User, "Part one. Part two."),
                (Role::Assistant, "Answer")
            ]),
            msgs(&[(Role::User, "Q"), (Role::Assistant, "A")]),
        ]
    );
}

#[test]
fn completion_and_text_formats() {
    let dir = tempdir();
    let comp = write_jsonl(
        dir.path(),
        "c.jsonl",
        &[json!({"prompt": "2+2=", "completion": "4"})],
    );
    let text = write_jsonl(
        dir.path(),
        "t.jsonl",
        &[json!({"text": "Once upon a time."})],
    );
    let mut c = bare_config(&[comp]);
    c.format = FormatChoice::Completion;
    assert_eq!(
        all_messages(&c),
        vec![msgs(&[(Role::User, "2+2="), (Role::Assistant, "4")])]
    );
    let mut c = bare_config(&[text]);
    c.format = FormatChoice::Text;
    assert_eq!(all_messages(&c), vec![Example::text("Once upon a time.")]);
}

#[test]
fn auto_detects_each_format_per_file_and_reports_it() {
    let dir = tempdir();
    let cases = [
        (
            "alpaca",
            json!({"instruction": "I", "input": "", "output": "O"}),
        ),
        (
            "sharegpt",
            json!({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}),
        ),
        (
            "messages",
            json!({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
        ),
        ("completion", json!({"prompt": "p", "completion": "c"})),
        ("text", json!({"text": "t"})),
    ];
    let mut paths = Vec::new();
    for (name, row) in &cases {
        let path = write_jsonl(
            dir.path(),
            &format!("{name}.jsonl"),
            &[row.clone(), row.clone()],
        );
        let report = prepare(&bare_config(std::slice::from_ref(&path)))
            .expect("prepare")
            .report;
        assert_eq!(report.detected_format, *name, "{path}");
        assert_eq!(report.files[0].format.as_deref(), Some(*name));
        assert_eq!(
            report.files[0].detection,
            "auto: 2 of 2 sampled records match"
        );
        paths.push(path);
    }
    let report = prepare(&bare_config(&paths)).expect("prepare").report;
    assert_eq!(report.detected_format, "mixed");
    assert_eq!(report.kept.train, 10);
}

#[test]
fn auto_detects_gsm8k_and_self_instruct_shapes() {
    let dir = tempdir();
    let gsm = write_jsonl(
        dir.path(),
        "gsm.jsonl",
        &[json!({"question": "How many?", "answer": "Two.\n#### 2"})],
    );
    let seed = write_jsonl(
        dir.path(),
        "seed.jsonl",
        &[
            json!({"id": "seed_task_0", "name": "n", "instruction": "Do it.",
                 "instances": [{"input": "x", "output": "y"}], "is_classification": false}),
        ],
    );
    let p = prepare(&bare_config(&[gsm])).expect("gsm");
    assert_eq!(
        p.report.files[0].format.as_deref(),
        Some("completion (prompt=question, completion=answer)")
    );
    assert_eq!(
        p.train[0].example,
        msgs(&[(Role::User, "How many?"), (Role::Assistant, "Two.\n#### 2")])
    );
    let p = prepare(&bare_config(&[seed])).expect("seed");
    assert_eq!(
        p.report.files[0].format.as_deref(),
        Some("alpaca (input=instances.0.input, output=instances.0.output)")
    );
    assert_eq!(
        p.train[0].example,
        msgs(&[(Role::User, "Do it.\n\nx"), (Role::Assistant, "y")])
    );
}

#[test]
fn field_map_renames_fields_including_dotted_paths() {
    let dir = tempdir();
    let f = write_jsonl(
        dir.path(),
        "q.jsonl",
        &[json!({"q": {"stem": "Why?"}, "a": ["Because."]})],
    );
    let mut c = bare_config(&[f]);
    c.fields = FieldMap {
        prompt: Some("q.stem".into()),
        completion: Some("a.0".into()),
        ..Default::default()
    };
    // auto with a field map only tries formats under those names.
    assert_eq!(
        all_messages(&c),
        vec![msgs(&[(Role::User, "Why?"), (Role::Assistant, "Because.")])]
    );
    // A field another format uses is a config error for an explicit format.
    c.format = FormatChoice::Alpaca;
    let err = prepare(&c).expect_err("prompt is not an alpaca field");
    assert!(
        matches!(&err, DataError::Config { key, .. } if key == "fields.prompt"),
        "{err}"
    );
}

#[test]
fn undetectable_file_names_its_keys() {
    let dir = tempdir();
    let f = write_jsonl(dir.path(), "x.jsonl", &[json!({"foo": 1, "bar": 2})]);
    let err = prepare(&bare_config(&[f])).expect_err("no format");
    let text = err.to_string();
    assert!(matches!(err, DataError::Detect { .. }));
    assert!(text.contains("`foo`") && text.contains("`bar`"), "{text}");
}

/// Every kind of bad line, one per line, with good lines around them.
fn messy_file(dir: &std::path::Path) -> String {
    let mut bytes: Vec<u8> = Vec::new();
    let good = |t: &str| format!("{{\"prompt\": \"{t}\", \"completion\": \"fine\"}}\n");
    bytes.extend(good("one").as_bytes()); // 1
    bytes.extend(b"{\"prompt\": \"broken\", \"completion\": \n"); // 2 malformed JSON
    bytes.extend(b"{\"prompt\": \"no completion\"}\n"); // 3 missing field
    bytes.extend(b"{\"prompt\": \"typed\", \"completion\": 42}\n"); // 4 wrong type
    bytes.extend(b"{\"prompt\": \"bad \xff\xfe bytes\", \"completion\": \"x\"}\n"); // 5 invalid UTF-8
    bytes.extend(b"\n"); // 6 empty line
    bytes.extend(b"[1, 2]\r\n"); // 7 not an object (CRLF)
    bytes.extend(good("two").as_bytes()); // 8
    write(dir, "messy.jsonl", bytes)
}

#[test]
fn messy_file_with_skip_lists_exact_file_and_line_errors() {
    let dir = tempdir();
    let f = messy_file(dir.path());
    let mut c = bare_config(std::slice::from_ref(&f));
    c.format = FormatChoice::Completion;
    c.on_error = OnError::Skip;
    let p = prepare(&c).expect("skip mode succeeds");
    let got: Vec<(String, usize, String)> = p
        .report
        .errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.message.clone()))
        .collect();
    let expected = [
        (2, "malformed JSON at column"),
        (3, "missing field `completion`"),
        (4, "field `completion`: expected a string, found number"),
        (5, "invalid UTF-8 at byte 17 of the line"),
        (6, "empty line"),
        (7, "expected a JSON object, found array"),
    ];
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for ((file, line, message), (want_line, want)) in got.iter().zip(expected) {
        assert_eq!(file, &f);
        assert_eq!(*line, want_line, "{message}");
        assert!(
            message.starts_with(want),
            "line {line}: {message:?} should start with {want:?}"
        );
    }
    assert_eq!(p.report.errors[1].key.as_deref(), Some("completion"));
    assert_eq!(
        p.report.errors[1].to_string(),
        format!("{f}:3: missing field `completion`")
    );
    assert_eq!(p.report.input_records, 8);
    assert_eq!(p.report.files[0].errors, 6);
    let kept: Vec<usize> = p.train.iter().map(|e| e.source.line).collect();
    assert_eq!(kept, vec![1, 8]);
}

#[test]
fn messy_file_with_fail_errors_and_writes_nothing() {
    let dir = tempdir();
    let f = messy_file(dir.path());
    let mut c = bare_config(std::slice::from_ref(&f));
    c.format = FormatChoice::Completion;
    c.on_error = OnError::Fail;
    let out = dir.path().join("out");
    let result = prepare(&c).and_then(|p| write_prepared(&p, &out));
    match result {
        Err(DataError::InvalidRecords { errors }) => {
            assert_eq!(
                errors.iter().map(|e| e.line).collect::<Vec<_>>(),
                vec![2, 3, 4, 5, 6, 7]
            );
        }
        other => panic!("expected InvalidRecords, got {other:?}"),
    }
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("messy.jsonl")]);
}

#[test]
fn auto_detection_survives_bad_lines() {
    let dir = tempdir();
    let f = messy_file(dir.path());
    let mut c = bare_config(&[f]);
    c.on_error = OnError::Skip;
    let p = prepare(&c).expect("auto on messy file");
    assert_eq!(p.report.detected_format, "completion");
    assert_eq!(p.train.len(), 2);
}

#[test]
fn gzip_input_reads_like_plain_jsonl() {
    use std::io::Write;
    let dir = tempdir();
    let rows = [
        json!({"text": "alpha beta"}),
        json!({"text": "gamma delta"}),
    ];
    let plain = write_jsonl(dir.path(), "p.jsonl", &rows);
    let file = std::fs::File::create(dir.path().join("p2.jsonl.gz")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    enc.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    enc.finish().unwrap();
    let gz = dir
        .path()
        .join("p2.jsonl.gz")
        .to_string_lossy()
        .into_owned();
    let a = prepare(&bare_config(&[plain])).unwrap();
    let b = prepare(&bare_config(&[gz])).unwrap();
    let content = |p: &hone_data::Prepared| {
        p.train
            .iter()
            .map(|e| e.example.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(content(&a), content(&b));
    assert_eq!(b.train.len(), 2);
    assert_eq!(b.train[1].source.line, 2);
}

#[test]
fn corrupt_gzip_is_a_file_error() {
    let dir = tempdir();
    let f = write(dir.path(), "bad.jsonl.gz", b"not gzip at all");
    let err = prepare(&bare_config(&[f])).expect_err("corrupt gzip");
    assert!(matches!(err, DataError::Io { .. }), "{err}");
}

#[test]
fn json_array_elements_carry_their_line() {
    let dir = tempdir();
    let f = write(
        dir.path(),
        "arr.json",
        "[\n  {\"prompt\": \"a\", \"completion\": \"b\"},\n\n  {\"prompt\": \"c\",\n   \"completion\": 7}\n]\n",
    );
    let mut c = bare_config(std::slice::from_ref(&f));
    c.on_error = OnError::Skip;
    let p = prepare(&c).unwrap();
    assert_eq!(p.train.len(), 1);
    assert_eq!(p.train[0].source.line, 2);
    assert_eq!(p.report.errors.len(), 1);
    assert_eq!(p.report.errors[0].line, 4);
    // A syntax error fails the whole file at the reported line.
    let g = write(
        dir.path(),
        "broken.json",
        "[\n {\"text\": \"a\"},\n {\"text\": }\n]",
    );
    let mut c = bare_config(&[g]);
    c.on_error = OnError::Skip;
    c.format = FormatChoice::Text;
    let p = prepare(&c).unwrap();
    assert_eq!(p.train.len(), 0);
    assert_eq!(p.report.errors[0].line, 3);
}

#[test]
fn csv_rows_become_records_with_their_line() {
    let dir = tempdir();
    let f = write(
        dir.path(),
        "d.csv",
        "question,answer\nWhat is 1+1?,2\n\"Multi\nline?\",yes\nonly one column\nLast?,\"ok, done\"\n",
    );
    let mut c = bare_config(std::slice::from_ref(&f));
    c.on_error = OnError::Skip;
    let p = prepare(&c).unwrap();
    let got: Vec<(usize, String, String)> = p
        .train
        .iter()
        .map(|e| match &e.example {
            Example::Chat(m) => (e.source.line, m[0].content.clone(), m[1].content.clone()),
            other => panic!("expected a chat, found {other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "What is 1+1?".into(), "2".into()),
            (3, "Multi\nline?".into(), "yes".into()),
            (6, "Last?".into(), "ok, done".into()),
        ]
    );
    assert_eq!(p.report.errors.len(), 1);
    assert_eq!(p.report.errors[0].line, 5);
    assert!(p.report.errors[0]
        .message
        .contains("expected 2 columns, found 1"));
}

#[test]
fn globs_expand_and_missing_inputs_fail() {
    let dir = tempdir();
    write_jsonl(dir.path(), "b.jsonl", &[json!({"text": "from b"})]);
    write_jsonl(dir.path(), "a.jsonl", &[json!({"text": "from a"})]);
    let pattern = dir.path().join("*.jsonl").to_string_lossy().into_owned();
    let p = prepare(&bare_config(&[pattern])).unwrap();
    let texts: Vec<&str> = p.train.iter().map(text_of).collect();
    assert_eq!(texts, vec!["from a", "from b"]);
    let none = dir.path().join("*.csv").to_string_lossy().into_owned();
    assert!(matches!(
        prepare(&bare_config(&[none])),
        Err(DataError::NoMatch { .. })
    ));
    let odd = write(dir.path(), "x.parquet", "");
    assert!(matches!(
        prepare(&bare_config(&[odd])),
        Err(DataError::UnsupportedFile { .. })
    ));
}

#[test]
fn config_rejects_unknown_fields_and_bad_values() {
    let bad = serde_json::from_str::<DataConfig>(
        r#"{"inputs": ["x"], "dedupe": {"near": {"treshold": 0.5}}}"#,
    );
    assert!(bad.unwrap_err().to_string().contains("treshold"));
    let ok: DataConfig = serde_json::from_str(
        r#"{"inputs": ["x"], "format": "completion", "fields": {"prompt": "question", "completion": "answer"}, "on_error": "skip"}"#,
    )
    .unwrap();
    assert_eq!(ok.on_error, OnError::Skip);
    assert_eq!(ok.dedupe.near.num_perm, 128);
    let mut c = ok.clone();
    c.split.val_fraction = 1.0;
    assert!(
        matches!(c.validate(), Err(DataError::Config { key, .. }) if key == "split.val_fraction")
    );
    let mut c = ok.clone();
    c.dedupe.near.bands = 30;
    assert!(
        matches!(c.validate(), Err(DataError::Config { key, .. }) if key == "dedupe.near.bands")
    );
    let c = DataConfig::default();
    assert!(matches!(c.validate(), Err(DataError::Config { key, .. }) if key == "inputs"));
}

/// Regression: a 50 MB single-line record took 111 s and 5.2 GB to curate. A record over
/// `max_record_bytes` is now a bad record naming its file, line and size, and the lines after
/// it keep their numbers.
#[test]
fn records_over_max_record_bytes_are_bad_records_naming_file_and_line() {
    let dir = tempdir();
    let long = "x".repeat(5000);
    let jsonl = write(
        dir.path(),
        "big.jsonl",
        format!(
            "{{\"text\": \"short one\"}}\n{{\"text\": \"{long}\"}}\n{{\"text\": \"short two\"}}\n{{\"text\": \"{long}\"}}"
        ),
    );
    let array = write(
        dir.path(),
        "big.json",
        format!("[\n{{\"text\": \"a\"}},\n{{\"text\": \"{long}\"}}\n]\n"),
    );
    let csv = write(
        dir.path(),
        "big.csv",
        format!("text\nshort\n{long}\nshort too\n"),
    );
    let txt = write(dir.path(), "big.txt", &long);
    let mut c = bare_config(&[jsonl.clone(), array.clone(), csv.clone(), txt.clone()]);
    c.format = FormatChoice::Text;
    c.on_error = OnError::Skip;
    c.max_record_bytes = 1000;
    let p = prepare(&c).unwrap();
    let kept: Vec<(String, usize)> = p
        .train
        .iter()
        .chain(&p.val)
        .map(|e| (e.source.file.to_string(), e.source.line))
        .collect();
    assert!(
        kept.contains(&(jsonl.clone(), 1)) && kept.contains(&(jsonl.clone(), 3)),
        "{kept:?}"
    );
    let bad: Vec<(String, usize)> = p
        .report
        .errors
        .iter()
        .map(|e| (e.file.clone(), e.line))
        .collect();
    assert_eq!(
        bad,
        vec![
            (jsonl.clone(), 2),
            (jsonl.clone(), 4),
            (array, 3),
            (csv, 3),
            (txt, 1)
        ]
    );
    for e in &p.report.errors {
        assert!(
            e.message.contains("max_record_bytes = 1000"),
            "{}",
            e.message
        );
    }
    let size = format!("{} bytes", long.len() + r#"{"text": ""}"#.len());
    assert!(
        p.report.errors[0].message.contains(&size),
        "{}",
        p.report.errors[0]
    );

    // With on_error = fail, nothing is curated and the error names the file and line.
    c.on_error = OnError::Fail;
    c.inputs = vec![jsonl.clone()];
    let msg = prepare(&c).unwrap_err().to_string();
    assert!(msg.contains(&format!("{jsonl}:2:")), "{msg}");

    // The default limit keeps these records.
    let mut c = bare_config(&[jsonl]);
    c.format = FormatChoice::Text;
    assert_eq!(prepare(&c).unwrap().train.len(), 4);
}

#[test]
fn gzip_lines_over_max_record_bytes_are_skipped_without_losing_the_next_line() {
    use std::io::Write;
    let dir = tempdir();
    let path = dir.path().join("big.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let long = "y".repeat(300_000);
    write!(gz, "{{\"text\": \"{long}\"}}\n{{\"text\": \"after\"}}\n").unwrap();
    gz.finish().unwrap();
    let mut c = bare_config(&[path.to_string_lossy().into_owned()]);
    c.format = FormatChoice::Text;
    c.on_error = OnError::Skip;
    c.max_record_bytes = 4096;
    let p = prepare(&c).unwrap();
    assert_eq!(p.train.len(), 1);
    assert_eq!((p.train[0].source.line, text_of(&p.train[0])), (2, "after"));
    assert_eq!(p.report.errors.len(), 1);
    assert_eq!(p.report.errors[0].line, 1);
    let size = format!("{} bytes", long.len() + r#"{"text": ""}"#.len());
    assert!(
        p.report.errors[0].message.contains(&size),
        "{}",
        p.report.errors[0]
    );
}

#[test]
fn max_record_bytes_of_zero_is_a_config_error() {
    let mut c = bare_config(&["x.jsonl".to_string()]);
    c.max_record_bytes = 0;
    let msg = c.validate().unwrap_err().to_string();
    assert!(msg.contains("max_record_bytes"), "{msg}");
}
