//! Data sets -> rows with a real tokenizer: packing (fixed length, positions restarting, no
//! label crossing examples, efficiency), padding, truncation policies, the report, and the
//! shard cache (reuse when nothing changed, a new entry when data, tokenizer, template or
//! settings change, recovery from a damaged entry).

mod common;

use std::collections::BTreeMap;

use common::fixture_tokenizer;
use hone_tokenize::{
    tokenize_cached, tokenize_examples, Batch, BuiltinTemplate, CacheKey, CacheStatus,
    ChatTemplate, Encoder, Example, Message, PadTo, Row, ShardCache, TokenizeConfig,
    TokenizedExample, TokenizerSpec, TruncationPolicy, IGNORE_INDEX, PAD_SEGMENT,
};

/// Qwen2's fixture tokenizer (it has `<|im_start|>`, `<|im_end|>`) with the built-in ChatML
/// template.
fn qwen() -> (tokenizers::Tokenizer, ChatTemplate) {
    let tokenizer = fixture_tokenizer("qwen2_tied", &[]);
    let template = ChatTemplate::builtin(BuiltinTemplate::Chatml, Default::default()).unwrap();
    (tokenizer, template)
}

fn spec(tokenizer: &tokenizers::Tokenizer) -> TokenizerSpec<'_> {
    TokenizerSpec {
        tokenizer,
        bos_id: None,
        eos_id: tokenizer.token_to_id("<|im_end|>"),
        pad_id: tokenizer.token_to_id("<|endoftext|>"),
    }
}

/// Conversations of varied lengths, a completion and a text.
fn examples() -> Vec<Example> {
    let mut out: Vec<Example> = (0..12)
        .map(|i| {
            Example::Chat(vec![
                Message::user(format!("Question {i}: {}", "why ".repeat(i % 5))),
                Message::assistant(format!("Answer {i}: {}", "because ".repeat(i % 7))),
            ])
        })
        .collect();
    out.push(Example::completion("2+2=", "4"));
    out.push(Example::text("Plain text for pretraining."));
    out
}

fn config(max_seq_len: usize) -> TokenizeConfig {
    TokenizeConfig {
        max_seq_len,
        ..TokenizeConfig::default()
    }
}

/// The examples of a row, split at segment changes (padding excluded).
fn segments(row: &Row) -> Vec<TokenizedExample> {
    let mut out = Vec::new();
    let mut start = 0;
    for len in row.seq_lens() {
        if row.segment_ids[start] != PAD_SEGMENT {
            out.push(TokenizedExample {
                input_ids: row.input_ids[start..start + len].to_vec(),
                labels: row.labels[start..start + len].to_vec(),
            });
        }
        start += len;
    }
    out
}

#[test]
fn packed_rows_hold_whole_examples_with_restarting_positions() {
    let (tokenizer, template) = qwen();
    let examples = examples();
    let config = config(256);
    let data = tokenize_examples(&examples, spec(&tokenizer), Some(&template), &config).unwrap();
    assert_eq!(data.report.truncated, 0);

    // What each example gives on its own.
    let encoder = Encoder::new(spec(&tokenizer), Some(&template), &config);
    let mut alone: Vec<TokenizedExample> = examples
        .iter()
        .map(|e| encoder.encode(e).unwrap())
        .collect();

    let mut packed = Vec::new();
    for row in &data.rows {
        assert_eq!(
            row.len(),
            256,
            "every packed row has exactly max_seq_len tokens"
        );
        for t in 0..row.len() {
            let starts_segment = t == 0 || row.segment_ids[t] != row.segment_ids[t - 1];
            assert_eq!(
                row.position_ids[t] == 0,
                starts_segment,
                "position restarts at {t}"
            );
            if !starts_segment {
                assert_eq!(row.position_ids[t], row.position_ids[t - 1] + 1);
            }
            // After the model's shift, position t is trained to predict labels[t + 1]: that
            // target always belongs to the same example.
            if t + 1 < row.len() && row.labels[t + 1] != IGNORE_INDEX {
                assert_eq!(
                    row.segment_ids[t],
                    row.segment_ids[t + 1],
                    "label crosses at {t}"
                );
            }
            if row.segment_ids[t] == PAD_SEGMENT {
                assert_eq!(row.labels[t], IGNORE_INDEX);
            }
        }
        packed.extend(segments(row));
    }
    // Every example appears once, intact (packing only reorders).
    let key = |e: &TokenizedExample| (e.input_ids.clone(), e.labels.clone());
    let mut packed: Vec<_> = packed.iter().map(key).collect();
    alone.sort_by_key(key);
    packed.sort();
    assert_eq!(packed, alone.iter().map(key).collect::<Vec<_>>());

    let report = &data.report;
    let tokens: usize = alone.iter().map(TokenizedExample::len).sum();
    assert_eq!(
        (report.examples, report.kept, report.rows),
        (14, 14, data.rows.len())
    );
    assert_eq!(report.tokens, tokens);
    assert_eq!(report.padding_tokens, 256 * data.rows.len() - tokens);
    assert_eq!(
        report.packing_efficiency,
        tokens as f64 / (256 * data.rows.len()) as f64
    );
    assert_eq!(
        report.label_tokens,
        alone
            .iter()
            .map(TokenizedExample::label_tokens)
            .sum::<usize>()
    );
    // Short examples fill the gaps: no more rows than the tokens need.
    assert_eq!(data.rows.len(), tokens.div_ceil(256), "{report:?}");
}

#[test]
fn padding_mode_keeps_one_example_per_row_and_masks_the_padding() {
    let (tokenizer, template) = qwen();
    let config = TokenizeConfig {
        packing: false,
        ..config(96)
    };
    let data = tokenize_examples(&examples(), spec(&tokenizer), Some(&template), &config).unwrap();
    assert_eq!(data.rows.len(), 14);
    assert!(data
        .rows
        .iter()
        .all(|r| r.examples() == 1 && r.padding_tokens() == 0));
    let longest = data.rows.iter().map(Row::len).max().unwrap();
    let pad = spec(&tokenizer).padding_id();
    let batch = Batch::collate(&data.rows[..4], PadTo::Longest, pad).unwrap();
    let batch_longest = data.rows[..4].iter().map(Row::len).max().unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (4, batch_longest));
    for (b, row) in data.rows[..4].iter().enumerate() {
        let mask = &batch.attention_mask()[b * batch.seq_len..(b + 1) * batch.seq_len];
        assert_eq!(mask.iter().filter(|&&m| m).count(), row.len());
        assert!(mask[row.len()..].iter().all(|&m| !m));
    }
    let fixed = Batch::collate(&data.rows, PadTo::Length(96), pad).unwrap();
    assert_eq!(fixed.seq_len, 96);
    let report = &data.report;
    assert_eq!(report.padding_tokens, 96 * 14 - report.tokens);
    assert!(longest <= 96);
}

#[test]
fn truncation_policies_are_applied_and_counted() {
    let (tokenizer, template) = qwen();
    let long = Example::Chat(vec![
        Message::user("Tell me a long story."),
        Message::assistant("Once upon a time ".repeat(20)),
    ]);
    let short = Example::Chat(vec![Message::user("Hi"), Message::assistant("Yo")]);
    let no_answer = Example::Chat(vec![Message::user("Hi")]);
    let examples = [long, short, no_answer];
    let run = |policy| {
        let config = TokenizeConfig {
            truncation: policy,
            ..config(48)
        };
        tokenize_examples(&examples, spec(&tokenizer), Some(&template), &config).unwrap()
    };

    let truncated = run(TruncationPolicy::Truncate);
    let r = &truncated.report;
    assert_eq!(
        (r.kept, r.truncated, r.dropped_too_long, r.dropped_no_labels),
        (2, 1, 0, 1)
    );
    assert!(r.longest_example > 48);
    assert!(truncated.rows.iter().all(|row| row.len() == 48));

    let dropped = run(TruncationPolicy::Drop);
    let r = &dropped.report;
    assert_eq!(
        (r.kept, r.truncated, r.dropped_too_long, r.dropped_no_labels),
        (1, 0, 1, 1)
    );
    assert_eq!(dropped.rows.len(), 1);

    // Keeping the end keeps the final end-of-turn token in the loss.
    let left = run(TruncationPolicy::TruncateLeft);
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap() as i32;
    let long_row = left.rows.iter().find(|r| r.padding_tokens() == 0).unwrap();
    let last_label = long_row.labels.iter().rev().find(|&&l| l != IGNORE_INDEX);
    assert_eq!(last_label, Some(&im_end));
    let truncated_row = truncated
        .rows
        .iter()
        .find(|r| r.padding_tokens() == 0)
        .unwrap();
    assert!(
        !truncated_row.labels.contains(&im_end),
        "cut before its end-of-turn token"
    );
}

fn cached(
    cache: &ShardCache,
    examples: &[Example],
    tokenizer: &tokenizers::Tokenizer,
    template: &ChatTemplate,
    config: &TokenizeConfig,
) -> (hone_tokenize::TokenizedDataset, CacheStatus) {
    tokenize_cached(cache, examples, spec(tokenizer), Some(template), config).unwrap()
}

#[test]
fn cache_is_reused_until_data_tokenizer_template_or_settings_change() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ShardCache::new(dir.path()).with_rows_per_shard(2);
    let (tokenizer, template) = qwen();
    let examples = examples();
    let config = config(64);

    let (built, status) = cached(&cache, &examples, &tokenizer, &template, &config);
    let CacheStatus::Built(entry) = status else {
        panic!("first run must build, got {status:?}")
    };
    assert!(built.rows.len() > 2, "several shards are written");
    let (again, status) = cached(&cache, &examples, &tokenizer, &template, &config);
    assert_eq!(status, CacheStatus::Hit(entry.clone()));
    assert_eq!(again, built, "rows and report survive the round trip");

    // The same tokenizer loaded again gives the same key.
    let reloaded = fixture_tokenizer("qwen2_tied", &[]);
    let (_, status) = cached(&cache, &examples, &reloaded, &template, &config);
    assert_eq!(status, CacheStatus::Hit(entry.clone()));

    // Each change gives a new entry.
    let mut keys = BTreeMap::new();
    let key = |ex: &[Example], tok: &tokenizers::Tokenizer, tpl: &ChatTemplate, cfg| {
        CacheKey::compute(ex, &spec(tok), Some(tpl), cfg).unwrap()
    };
    keys.insert("original", key(&examples, &tokenizer, &template, &config));
    let mut edited = examples.clone();
    edited[3] = Example::text("changed");
    keys.insert("data", key(&edited, &tokenizer, &template, &config));
    let grown = fixture_tokenizer("qwen2_tied", &["<|extra|>"]);
    keys.insert("tokenizer", key(&examples, &grown, &template, &config));
    let other_template = ChatTemplate::new(
        "chatml-variant",
        BuiltinTemplate::Chatml
            .source()
            .replace("'\\n' }}", "'\\n\\n' }}"),
        Default::default(),
    )
    .unwrap();
    keys.insert(
        "template",
        key(&examples, &tokenizer, &other_template, &config),
    );
    let longer = TokenizeConfig {
        max_seq_len: 65,
        ..config.clone()
    };
    keys.insert(
        "max_seq_len",
        key(&examples, &tokenizer, &template, &longer),
    );
    let all_inputs = TokenizeConfig {
        train_on_inputs: true,
        ..config.clone()
    };
    keys.insert(
        "train_on_inputs",
        key(&examples, &tokenizer, &template, &all_inputs),
    );
    let distinct: std::collections::BTreeSet<_> = keys.values().collect();
    assert_eq!(distinct.len(), keys.len(), "{keys:?}");

    let (changed, status) = cached(&cache, &edited, &tokenizer, &template, &config);
    assert!(
        matches!(&status, CacheStatus::Built(p) if *p != entry),
        "{status:?}"
    );
    assert_ne!(changed.rows, built.rows);
    let (_, status) = cached(&cache, &examples, &tokenizer, &template, &longer);
    assert!(matches!(status, CacheStatus::Built(_)));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "three entries, no temporary directories left"
    );
}

#[test]
fn a_damaged_cache_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ShardCache::new(dir.path());
    let (tokenizer, template) = qwen();
    let examples = examples();
    let config = config(64);
    let (built, status) = cached(&cache, &examples, &tokenizer, &template, &config);
    let CacheStatus::Built(entry) = status else {
        panic!("{status:?}")
    };
    let shard = entry.join("shard-00000.safetensors");
    std::fs::write(&shard, b"not a safetensors file").unwrap();
    let key = CacheKey::compute(&examples, &spec(&tokenizer), Some(&template), &config).unwrap();
    let err = cache.load(&key).unwrap_err();
    assert!(err.to_string().contains("shard-00000.safetensors"), "{err}");
    let (rebuilt, status) = cached(&cache, &examples, &tokenizer, &template, &config);
    assert_eq!(status, CacheStatus::Built(entry));
    assert_eq!(rebuilt, built);
}

/// hone-data curates raw text as `{"text": ...}`, and this stage reads that file's examples
/// as they are: raw text, every token in the loss (but the first, as always) and EOS appended,
/// with no role involved.
/// A curated line of the old form (one message with the role `text`) is the same example,
/// with the same cache key.
#[test]
fn curated_raw_text_is_encoded_as_text_with_every_token_in_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("raw.jsonl");
    let text = "Plain text for pretraining.";
    std::fs::write(&input, format!("{{\"text\":\"{text}\"}}\n")).unwrap();
    let mut data_config = hone_data::DataConfig::new([input.to_string_lossy().into_owned()]);
    data_config.split.val_fraction = 0.0;
    let prepared = hone_data::prepare(&data_config).unwrap();
    hone_data::write_prepared(&prepared, &dir.path().join("data")).unwrap();
    let curated = hone_data::read_curated(&dir.path().join("data").join("train.jsonl")).unwrap();
    let (train, _) = prepared.examples();
    assert_eq!(train, [Example::text(text)]);
    assert_eq!(curated[0].example, train[0]);

    let (tokenizer, template) = qwen();
    let spec = spec(&tokenizer);
    let config = config(64);
    let encoded = Encoder::new(spec, None, &config).encode(&train[0]).unwrap();
    let mut ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    ids.push(spec.eos_id.unwrap());
    assert_eq!(encoded.input_ids, ids);
    // Every token is a target, the first excepted (nothing in the example precedes it).
    let mut labels: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
    labels[0] = IGNORE_INDEX;
    assert_eq!(encoded.labels, labels);

    let old: Example = serde_json::from_str(&format!(
        r#"{{"messages":[{{"role":"text","content":"{text}"}}]}}"#
    ))
    .unwrap();
    assert_eq!(old, train[0]);
    let key = |examples: &[Example]| {
        CacheKey::compute(examples, &spec, Some(&template), &config).unwrap()
    };
    assert_eq!(key(&[old]), key(&train));
}
