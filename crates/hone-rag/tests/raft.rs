//! Retrieval-aware training examples on the shipped QA sets (datasets/rag): the split by
//! question, gold passages and their citations, distractors, abstentions, determinism.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hone_data::{Example, OnError};
use hone_rag::prompt::{cited_labels, ABSTAIN};
use hone_rag::{
    build_index, build_raft, read_corpus, read_questions, BuildOptions, ChunkConfig, Document,
    Question, RaftOptions, RagIndex, WithoutGold,
};

fn data(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/rag")
        .join(set)
}

struct Set {
    _dir: tempfile::TempDir,
    index: RagIndex,
    corpus: Vec<Document>,
    questions: Vec<Question>,
}

fn load(set: &str) -> Set {
    let corpus_file = data(set).join("corpus.jsonl").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("index");
    build_index(&BuildOptions {
        inputs: vec![corpus_file.clone()],
        out: out.clone(),
        chunking: ChunkConfig::default(),
        tokenizer: None,
        embedder: None,
        vectors: Default::default(),
        on_error: OnError::Fail,
        force: false,
    })
    .unwrap();
    Set {
        index: RagIndex::open(&out).unwrap(),
        corpus: read_corpus(&[corpus_file], OnError::Fail)
            .unwrap()
            .documents,
        questions: read_questions(&data(set).join("questions.jsonl")).unwrap(),
        _dir: dir,
    }
}

/// (system, user, assistant) of a chat example.
fn turns(e: &Example) -> (&str, &str, &str) {
    let Example::Chat(m) = e else {
        panic!("not a chat example: {e:?}")
    };
    assert_eq!(m.len(), 3);
    assert_eq!(
        (m[0].role.as_str(), m[1].role.as_str(), m[2].role.as_str()),
        ("system", "user", "assistant")
    );
    (&m[0].content, &m[1].content, &m[2].content)
}

/// The passages of a user message, by number: (title line, text).
fn shown(user: &str) -> Vec<String> {
    let body = user.strip_prefix("Passages:\n").unwrap();
    let (passages, _question) = body.rsplit_once("\n\nQuestion: ").unwrap();
    passages
        .split("\n\n")
        .enumerate()
        .map(|(i, p)| {
            let head = format!("[{}]", i + 1);
            assert!(p.starts_with(&head), "passage {} is `{p}`", i + 1);
            p.to_string()
        })
        .collect()
}

fn question_of(user: &str) -> &str {
    user.rsplit_once("\n\nQuestion: ").unwrap().1
}

#[test]
fn squad_examples_cite_a_passage_holding_the_answer_and_abstain_when_unanswerable() {
    let set = load("squad_v2_complexity");
    let options = RaftOptions {
        k: 4,
        gold_share: 0.7,
        ..Default::default()
    };
    let raft = build_raft(&set.questions, &set.corpus, &set.index, &options).unwrap();
    let r = &raft.report;
    assert_eq!(r.questions, 418);
    assert_eq!(r.train_questions + r.heldout_questions, 418);
    assert_eq!(raft.train.len(), r.train_questions);
    // About a fifth held out.
    assert!((60..=110).contains(&r.heldout_questions), "{r:?}");
    let by_question: std::collections::HashMap<&str, &Question> = set
        .questions
        .iter()
        .map(|q| (q.question.trim(), q))
        .collect();
    let gold_text = |q: &Question| -> Vec<String> {
        q.gold_passage_ids
            .iter()
            .map(|id| {
                set.corpus
                    .iter()
                    .find(|d| &d.id == id)
                    .unwrap()
                    .text
                    .clone()
            })
            .collect()
    };
    let (mut with_gold, mut answerable) = (0, 0);
    for e in &raft.train {
        let (system, user, target) = turns(e);
        assert_eq!(system, hone_rag::prompt::SYSTEM_PROMPT);
        let q = by_question[question_of(user)];
        let passages = shown(user);
        assert_eq!(passages.len(), 4, "{user}");
        // Distinct passages.
        assert_eq!(passages.iter().collect::<HashSet<_>>().len(), 4);
        let gold = gold_text(q);
        let gold_shown = passages
            .iter()
            .filter(|p| gold.iter().any(|g| p.ends_with(g.trim())))
            .count();
        if !q.is_answerable() {
            assert_eq!(target, ABSTAIN);
            continue;
        }
        answerable += 1;
        let labels = cited_labels(target, passages.len());
        if gold_shown > 0 {
            with_gold += 1;
            // The target is the first answer, then the gold passage's number; that passage
            // holds the answer (SQuAD answers are spans of their paragraph).
            assert_eq!(labels.len(), 1, "{target}");
            assert!(target.starts_with(q.answers[0].trim()), "{target}");
            let cited = &passages[labels[0] - 1];
            assert!(
                cited.contains(q.answers[0].trim()),
                "{target} cites {cited}"
            );
        } else {
            // RAFT: gold left out, the answer without a citation.
            assert!(labels.is_empty(), "{target}");
            assert_eq!(target, q.answers[0].trim());
        }
    }
    // gold_share 0.7 of the answerable ones, within four binomial standard deviations.
    let expected = 0.7 * answerable as f64;
    let sd = (answerable as f64 * 0.7 * 0.3).sqrt();
    assert!(
        (with_gold as f64 - expected).abs() < 4.0 * sd,
        "{with_gold} of {answerable}"
    );
    assert_eq!(with_gold, r.with_gold);
    // 48 paragraphs on one topic: BM25 always has enough non-gold matches.
    assert_eq!(r.random_distractors, 0);
    assert_eq!(r.missing_gold, 0);
}

#[test]
fn the_split_is_by_question_stable_and_the_build_deterministic() {
    let set = load("squad_v2_complexity");
    let options = RaftOptions::default();
    let a = build_raft(&set.questions, &set.corpus, &set.index, &options).unwrap();
    let b = build_raft(&set.questions, &set.corpus, &set.index, &options).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.heldout, b.heldout);
    // No held-out question has a training example.
    let trained: HashSet<String> = a
        .train
        .iter()
        .map(|e| question_of(turns(e).1).to_string())
        .collect();
    for q in &a.heldout {
        assert!(!trained.contains(q.question.trim()), "{}", q.id);
    }
    // Dropping half the questions leaves the others on the side they were.
    let half: Vec<Question> = set.questions.iter().step_by(2).cloned().collect();
    let c = build_raft(&half, &set.corpus, &set.index, &options).unwrap();
    let held: HashSet<&str> = a.heldout.iter().map(|q| q.id.as_str()).collect();
    for q in &half {
        assert_eq!(
            c.heldout.iter().any(|h| h.id == q.id),
            held.contains(q.id.as_str()),
            "{}",
            q.id
        );
    }
    // Another seed, another split.
    let d = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions { seed: 1, ..options },
    )
    .unwrap();
    assert_ne!(a.heldout, d.heldout);
}

#[test]
fn hotpotqa_shows_both_gold_paragraphs_and_cites_both() {
    let set = load("hotpotqa_dev_distractor_60");
    let options = RaftOptions {
        k: 5,
        gold_share: 1.0,
        heldout_fraction: 0.0,
        ..Default::default()
    };
    let raft = build_raft(&set.questions, &set.corpus, &set.index, &options).unwrap();
    assert_eq!(raft.train.len(), 60);
    assert_eq!(raft.report.with_gold, 60);
    for (e, q) in raft.train.iter().zip(&set.questions) {
        let (_, user, target) = turns(e);
        let passages = shown(user);
        assert_eq!(passages.len(), 5);
        let labels = cited_labels(target, passages.len());
        let cited: HashSet<String> = labels
            .iter()
            .map(|&n| {
                let head = passages[n - 1].lines().next().unwrap();
                head.split_once("] ").unwrap().1.to_string()
            })
            .collect();
        // HotpotQA's passage ids are the paragraph titles.
        let gold: HashSet<String> = q.gold_passage_ids.iter().cloned().collect();
        assert_eq!(cited, gold, "{target}");
    }
}

#[test]
fn closed_book_and_abstaining_without_gold() {
    let set = load("squad_v2_complexity");
    let closed = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions {
            closed_book: true,
            ..Default::default()
        },
    )
    .unwrap();
    for e in &closed.train {
        let (system, user, target) = turns(e);
        assert_eq!(system, hone_rag::prompt::CLOSED_BOOK_SYSTEM_PROMPT);
        assert!(!user.contains("Passages:"));
        assert!(cited_labels(target, 10).is_empty());
    }
    let abstain = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions {
            gold_share: 0.0,
            without_gold: WithoutGold::Abstain,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(abstain.report.with_gold, 0);
    for e in &abstain.train {
        assert_eq!(turns(e).2, ABSTAIN);
    }
}

#[test]
fn bad_question_files_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.jsonl");
    std::fs::write(
        &path,
        "{\"id\": \"a\", \"question\": \"why?\", \"answers\": [\"because\"]}\n{\"id\": \"b\"}\n",
    )
    .unwrap();
    let e = read_questions(&path).unwrap_err().to_string();
    assert!(
        e.contains("q.jsonl") && e.contains(":2") && e.contains("question"),
        "{e}"
    );
    std::fs::write(
        &path,
        "{\"id\": \"a\", \"question\": \"why?\"}\n{\"id\": \"a\", \"question\": \"how?\"}\n",
    )
    .unwrap();
    let e = read_questions(&path).unwrap_err().to_string();
    assert!(e.contains(":2") && e.contains("twice"), "{e}");
    let set = load("squad_v2_complexity");
    let e = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions {
            k: 0,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("k"), "{e}");
}

#[test]
fn the_unanswerable_share_of_training_examples_is_capped() {
    let set = load("squad_v2_complexity");
    let all = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions::default(),
    )
    .unwrap();
    let capped = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions {
            unanswerable_share: Some(0.25),
            ..Default::default()
        },
    )
    .unwrap();
    let (a, c) = (&all.report, &capped.report);
    // SQuAD 2.0's own share in training is over half.
    assert!(a.unanswerable * 2 > a.train_questions, "{a:?}");
    assert_eq!(a.unanswerable_dropped, 0);
    // The held-out questions do not move; answerable examples are all kept.
    let ids = |r: &hone_rag::Raft| r.heldout.iter().map(|q| q.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&all), ids(&capped));
    assert_eq!(a.with_gold + a.without_gold, c.with_gold + c.without_gold);
    assert_eq!(c.unanswerable + c.unanswerable_dropped, a.unanswerable);
    assert_eq!(capped.train.len(), c.train_questions);
    // The share lands near the cap (a seeded draw per question: binomial noise, 4 sigma).
    let expected = 0.25 / 0.75 * (c.with_gold + c.without_gold) as f64;
    let p = expected / a.unanswerable as f64;
    let sigma = (a.unanswerable as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (c.unanswerable as f64 - expected).abs() <= 4.0 * sigma,
        "{} unanswerable kept, expected about {expected:.1}: {c:?}",
        c.unanswerable
    );
    let bad = build_raft(
        &set.questions,
        &set.corpus,
        &set.index,
        &RaftOptions {
            unanswerable_share: Some(1.5),
            ..Default::default()
        },
    );
    let message = bad.expect_err("a share above 1").to_string();
    assert!(message.contains("unanswerable_share"), "{message}");
}
