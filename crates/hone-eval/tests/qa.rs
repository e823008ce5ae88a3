//! `hone eval compare` (hone_eval::qa) on the llama_gqa PEFT fixture with its adapter: four arms
//! (base, base+rag, adapter, adapter+rag), each retrieval arm's answers equal one-by-one greedy
//! generation on the prompt hone_rag::prompt builds from the passages the index ranks, batching
//! does not change them, the adapter's training cost is read from its run, and prompts beyond
//! the context are refused naming the question.

use std::path::{Path, PathBuf};

use hone_eval::qa::{compare_qa, write_compare, CompareSettings};
use hone_eval::AdapterSpec;
use hone_model::{generate, load_model_dir, Cpu, GenerateConfig, LoadOptions, SamplingConfig};
use hone_rag::prompt::{self, Passage};
use hone_rag::{build_index, BuildOptions, RagIndex, SearchOptions};
use hone_tokenize::{BuiltinTemplate, ChatTemplate, ExtraContext, SpecialTokens};
use serde_json::json;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft/llama_gqa")
}

const DOCS: [(&str, &str); 3] = [
    ("lily", "Lily had a red ball in the park."),
    ("tom", "Tom had a big dog named Max."),
    ("sue", "Sue baked a cake with her mom."),
];

/// Corpus, index, questions and an adapter run directory in `dir`.
fn setup(dir: &Path) -> CompareSettings {
    let corpus: String = DOCS
        .iter()
        .map(|(id, text)| json!({"id": id, "title": id, "text": text}).to_string() + "\n")
        .collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    let questions = [
        json!({"id": "q1", "question": "What did Lily have?", "answers": ["a red ball"], "gold_passage_ids": ["lily"]}),
        json!({"id": "q2", "question": "What was the dog named?", "answers": ["Max"], "gold_passage_ids": ["tom"]}),
        json!({"id": "q3", "question": "Who flew to the moon?", "answers": [], "answerable": false}),
    ];
    let lines: String = questions.iter().map(|q| q.to_string() + "\n").collect();
    std::fs::write(dir.join("questions.jsonl"), lines).unwrap();
    build_index(&BuildOptions {
        inputs: vec![dir.join("corpus.jsonl").display().to_string()],
        out: dir.join("index"),
        chunking: Default::default(),
        tokenizer: None,
        embedder: None,
        vectors: Default::default(),
        on_error: hone_data::OnError::Fail,
        force: false,
    })
    .unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(run.join("adapter")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixture().join("adapter").join(f),
            run.join("adapter").join(f),
        )
        .unwrap();
    }
    std::fs::write(
        run.join("summary.json"),
        json!({"wall_seconds": 12.5, "tokens": 1000, "tokens_per_sec": 80.0}).to_string(),
    )
    .unwrap();
    CompareSettings {
        model: fixture(),
        adapters: vec![AdapterSpec {
            name: "tuned".into(),
            path: run.join("adapter"),
        }],
        index: Some(dir.join("index")),
        questions: dir.join("questions.jsonl"),
        k: 2,
        limit: None,
        batch_size: 3,
        max_new_tokens: 6,
        template: "chatml".parse().unwrap(),
        dtype: burn::tensor::DType::F32,
    }
}

#[test]
fn every_arm_answers_as_one_by_one_generation_on_the_retrieval_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = setup(tmp.path());
    let (report, predictions) =
        compare_qa::<Cpu>(&settings, &Default::default(), &mut |_, _, _| {}).unwrap();
    let names: Vec<&str> = report.arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["base", "base+rag", "tuned", "tuned+rag"]);
    assert_eq!(predictions.len(), 12);
    let retrieval = report.retrieval.as_ref().unwrap();
    assert_eq!((retrieval.questions, retrieval.k), (2, 2));
    assert_eq!((retrieval.recall_at_k, retrieval.mrr), (1.0, 1.0));
    for arm in &report.arms {
        assert_eq!((arm.answerable, arm.unanswerable), (2, 1), "{}", arm.name);
        assert_eq!(arm.retrieval, arm.name.ends_with("+rag"));
        assert_eq!(
            arm.training.is_some(),
            arm.column == "tuned",
            "{}",
            arm.name
        );
        assert_eq!(
            arm.groundedness.is_some() || arm.citation_recall.is_some(),
            arm.retrieval
        );
    }
    let cost = report.arms[2].training.as_ref().unwrap();
    assert_eq!(
        (cost.wall_seconds, cost.tokens, cost.tokens_per_sec),
        (12.5, 1000, 80.0)
    );

    // The reference: the passages the index ranks, the prompt hone_rag::prompt writes, the
    // ChatML template, one question at a time through hone_model::generate.
    let index = RagIndex::open(&tmp.path().join("index")).unwrap();
    let template =
        ChatTemplate::builtin(BuiltinTemplate::Chatml, SpecialTokens::default()).unwrap();
    for (column, adapter) in [("base", None), ("tuned", Some(&settings.adapters[0].path))] {
        let mut loaded =
            load_model_dir::<Cpu>(&fixture(), &Default::default(), LoadOptions::default()).unwrap();
        if let Some(a) = adapter {
            loaded.model.load_adapter(a).unwrap();
        }
        for with_rag in [false, true] {
            let arm = if with_rag {
                format!("{column}+rag")
            } else {
                column.to_string()
            };
            for p in predictions.iter().filter(|p| p.arm == arm) {
                let passages: Vec<Passage> = index
                    .search_with(&p.question, 2, &SearchOptions::default())
                    .unwrap()
                    .into_iter()
                    .map(|h| Passage {
                        id: h.chunk.doc_id,
                        title: h.chunk.title,
                        text: h.chunk.text,
                    })
                    .collect();
                let messages =
                    prompt::messages(&p.question, with_rag.then_some(passages.as_slice()));
                let text = template
                    .render(&messages, true, &ExtraContext::new())
                    .unwrap();
                let ids = loaded
                    .tokenizer
                    .inner()
                    .encode(text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                assert_eq!(p.prompt_tokens, ids.len(), "{arm} {}", p.id);
                let config = GenerateConfig {
                    max_new_tokens: 6,
                    sampling: SamplingConfig::default(),
                    stop_ids: loaded.tokenizer.eos_ids.clone(),
                    stop_strings: vec![],
                };
                let out =
                    generate(&loaded.model, &loaded.tokenizer, &ids, &config, |_| {}).unwrap();
                assert_eq!(p.answer, out.text.trim(), "{arm} {}", p.id);
            }
        }
    }

    // Batches of one give the same answers; the adapter changes some.
    let one = CompareSettings {
        batch_size: 1,
        ..settings.clone()
    };
    let (_, alone) = compare_qa::<Cpu>(&one, &Default::default(), &mut |_, _, _| {}).unwrap();
    let answers = |ps: &[hone_eval::Prediction]| -> Vec<String> {
        ps.iter().map(|p| p.answer.clone()).collect()
    };
    assert_eq!(answers(&alone), answers(&predictions));
    assert_ne!(answers(&predictions[..6]), answers(&predictions[6..]));

    let files = write_compare(&report, &predictions, &tmp.path().join("out")).unwrap();
    assert_eq!(files.len(), 4);
    let md = std::fs::read_to_string(tmp.path().join("out/eval.md")).unwrap();
    assert!(
        md.contains("| metric | base | base+rag | tuned | tuned+rag |"),
        "{md}"
    );
    let lines = std::fs::read_to_string(tmp.path().join("out/predictions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
}

#[test]
fn a_prompt_beyond_the_context_is_refused_naming_the_question() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = CompareSettings {
        max_new_tokens: 250,
        ..setup(tmp.path())
    };
    let e = compare_qa::<Cpu>(&settings, &Default::default(), &mut |_, _, _| {})
        .expect_err("a prompt beyond the context of 256")
        .to_string();
    assert!(
        e.contains("question 1 (q1)") && e.contains("--max-tokens"),
        "{e}"
    );
    let missing = CompareSettings {
        index: Some(tmp.path().join("nowhere")),
        ..setup(tmp.path())
    };
    let e = compare_qa::<Cpu>(&missing, &Default::default(), &mut |_, _, _| {})
        .expect_err("a missing index")
        .to_string();
    assert!(e.contains("nowhere"), "{e}");
}
