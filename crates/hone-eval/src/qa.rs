//! `hone eval compare`: question answering with and without retrieval, for a base model and
//! each adapter, on the same questions — the RAG vs LoRA vs hybrid comparison.
//!
//! Every column (the base model, then each adapter) answers every question in two arms:
//! closed book (the question alone, [`hone_rag::prompt::CLOSED_BOOK_SYSTEM_PROMPT`]) and, with an
//! index, with the `k` passages retrieved for the question (the one retrieval prompt of
//! [`hone_rag::prompt`], as `hone data raft` trains with and `hone serve --rag` serves). Prompts
//! go through the model's chat template; decoding is greedy and batched.
//!
//! Scores, per arm:
//! * answerable questions: exact match, token F1 and containment with SQuAD's normalisation
//!   (lower case, no punctuation or articles; the best over the accepted answers; citation
//!   markers `[n]` removed first), and the share answered with the abstention text;
//! * unanswerable questions: abstention accuracy (the answer contains
//!   [`hone_rag::prompt::ABSTAIN`], normalised);
//! * with retrieval: citation precision (cited passages that are gold) and recall (gold passages
//!   cited, over answerable questions with gold ids), and groundedness: the share of answers
//!   (not abstentions) whose normalised tokens are at least 80% found in the passages shown;
//! * latency per question: retrieval (each search timed alone) and generation (the wall time of
//!   the batch the question was decoded in: what a caller of a batch of `batch_size` waits),
//!   p50 and p95; prompt tokens per question;
//! * each adapter's training cost from its run directory's `summary.json` (the adapter's
//!   parent): wall time, tokens, tokens/s.
//!
//! Retrieval itself is scored once (it does not depend on the model): recall@k (a gold passage
//! among the `k`) and MRR over answerable questions with gold ids.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::DType;
use hone_model::{load_model_dir, CausalLm, KernelBackend, LoadOptions, Tokenizer};
use hone_rag::prompt::{self, Passage};
use hone_rag::{Question, RagIndex, SearchOptions};
use hone_tokenize::{ChatTemplate, ExtraContext, TemplateSource};
use serde::Serialize;

use crate::config::AdapterSpec;
use crate::error::{EvalError, Result};
use crate::generate::{generate_greedy, GreedySettings};
use crate::metrics::normalize_answer;
use crate::runner::adapter_error;

/// File names written into the output directory.
pub const COMPARE_JSON: &str = "eval.json";
pub const COMPARE_MARKDOWN: &str = "eval.md";
pub const COMPARE_PLOT: &str = "accuracy_latency.png";
pub const PREDICTIONS_FILE: &str = "predictions.jsonl";

/// Share of an answer's tokens that must occur in the passages shown for it to count as
/// grounded.
pub const GROUNDED_SHARE: f64 = 0.8;

/// What `hone eval compare` runs.
#[derive(Debug, Clone)]
pub struct CompareSettings {
    /// Base model: a Hugging Face directory or a GGUF file.
    pub model: PathBuf,
    pub adapters: Vec<AdapterSpec>,
    /// The retrieval index; `None`: closed-book arms only.
    pub index: Option<PathBuf>,
    /// Questions: JSONL `{id, question, answers, answerable?, gold_passage_ids}`.
    pub questions: PathBuf,
    pub k: usize,
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub template: TemplateSource,
    pub dtype: DType,
}

/// One question's retrieval.
#[derive(Debug, Clone, Serialize)]
pub struct Retrieval {
    /// Document ids of the passages, best first.
    pub doc_ids: Vec<String>,
    pub seconds: f64,
    /// 1-based rank of the first gold passage, if any is retrieved.
    pub gold_rank: Option<usize>,
}

/// Retrieval quality over the questions (model-independent).
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalScores {
    pub k: usize,
    /// Answerable questions with gold passage ids (what recall and MRR average over).
    pub questions: usize,
    pub recall_at_k: f64,
    pub mrr: f64,
    pub seconds_p50: f64,
    pub seconds_p95: f64,
}

/// An adapter's training cost, from its run's `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingCost {
    pub run_dir: PathBuf,
    pub wall_seconds: f64,
    pub tokens: u64,
    pub tokens_per_sec: f64,
}

/// The scores of one arm (a column, with or without retrieval).
#[derive(Debug, Clone, Serialize)]
pub struct ArmScores {
    /// `base`, `base+rag`, `NAME`, `NAME+rag`.
    pub name: String,
    pub column: String,
    pub adapter: Option<PathBuf>,
    pub retrieval: bool,
    pub answerable: usize,
    pub unanswerable: usize,
    pub exact_match: f64,
    pub f1: f64,
    pub contains: f64,
    /// Answerable questions answered with the abstention text.
    pub false_abstention: f64,
    /// Unanswerable questions answered with the abstention text (`None`: there are none).
    pub abstention_accuracy: Option<f64>,
    /// Retrieval arms: cited passages that are gold, over answers citing any (`None`: no
    /// citation at all, or a closed-book arm).
    pub citation_precision: Option<f64>,
    /// Retrieval arms: gold passages cited, over answerable questions with gold ids.
    pub citation_recall: Option<f64>,
    /// Share of answers citing at least one passage.
    pub cited_share: Option<f64>,
    /// Retrieval arms: share of non-abstaining answers grounded in the passages shown.
    pub groundedness: Option<f64>,
    pub prompt_tokens_mean: f64,
    pub retrieval_p50: Option<f64>,
    pub retrieval_p95: Option<f64>,
    pub generation_p50: f64,
    pub generation_p95: f64,
    /// Retrieval + generation per question.
    pub latency_p50: f64,
    pub latency_p95: f64,
    pub training: Option<TrainingCost>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub model: PathBuf,
    pub questions_file: PathBuf,
    pub questions: usize,
    pub index: Option<PathBuf>,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub retrieval: Option<RetrievalScores>,
    pub arms: Vec<ArmScores>,
    pub seconds: f64,
}

/// One answer, as written to `predictions.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub arm: String,
    pub id: String,
    pub question: String,
    pub answer: String,
    pub answerable: bool,
    pub exact_match: bool,
    pub f1: f64,
    pub contains: bool,
    pub abstained: bool,
    pub cited: Vec<String>,
    pub grounded: Option<bool>,
    pub prompt_tokens: usize,
    pub generation_seconds: f64,
}

/// Progress of a comparison: (arm, questions done, questions in all).
pub type CompareProgress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// The text of an answer without its citation markers `[n]`.
pub fn strip_citations(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if after[..close].trim().parse::<usize>().is_ok() => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// SQuAD's token F1 between a prediction and one reference (both normalised).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let p: Vec<String> = normalize_answer(prediction)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let r: Vec<String> = normalize_answer(reference)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if p.is_empty() || r.is_empty() {
        return (p.is_empty() && r.is_empty()) as u8 as f64;
    }
    let mut left = r.clone();
    let mut common = 0usize;
    for t in &p {
        if let Some(i) = left.iter().position(|x| x == t) {
            left.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Whether an answer is the abstention text (normalised containment).
pub fn abstains(answer: &str) -> bool {
    normalize_answer(answer).contains(&normalize_answer(prompt::ABSTAIN))
}

/// Whether at least [`GROUNDED_SHARE`] of the answer's normalised tokens occur in `passages`.
pub fn grounded(answer: &str, passages: &[Passage]) -> bool {
    let tokens: Vec<String> = normalize_answer(&strip_citations(answer))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return false;
    }
    let shown: HashSet<String> = passages
        .iter()
        .flat_map(|p| {
            normalize_answer(&format!("{} {}", p.title, p.text))
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let found = tokens.iter().filter(|t| shown.contains(*t)).count();
    found as f64 >= GROUNDED_SHARE * tokens.len() as f64
}

/// The `q`-quantile (nearest rank) of `values`.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// The training cost of the run an adapter comes from: `summary.json` beside the adapter's
/// directory (a `hone train` run directory), if there is one.
pub fn training_cost(adapter: &Path) -> Option<TrainingCost> {
    let run_dir = adapter.parent()?;
    let text = std::fs::read_to_string(run_dir.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(TrainingCost {
        run_dir: run_dir.to_path_buf(),
        wall_seconds: v.get("wall_seconds")?.as_f64()?,
        tokens: v.get("tokens")?.as_u64()?,
        tokens_per_sec: v.get("tokens_per_sec")?.as_f64()?,
    })
}

fn rag_error(e: hone_rag::RagError) -> EvalError {
    EvalError::Config {
        key: "rag".into(),
        message: e.to_string(),
    }
}

/// Reads the questions (an error names the file and line).
pub fn read_questions(path: &Path, limit: Option<usize>) -> Result<Vec<Question>> {
    let mut questions = hone_rag::read_questions(path).map_err(|e| EvalError::Config {
        key: "questions".into(),
        message: e.to_string(),
    })?;
    if let Some(n) = limit {
        questions.truncate(n);
    }
    if questions.is_empty() {
        return Err(EvalError::EmptyData {
            path: path.to_path_buf(),
            detail: String::new(),
        });
    }
    Ok(questions)
}

/// Searches `index` for every question: the passages and the time of each search.
pub fn retrieve(
    index: &RagIndex,
    questions: &[Question],
    k: usize,
) -> Result<Vec<(Vec<Passage>, Retrieval)>> {
    let options = SearchOptions::default();
    questions
        .iter()
        .map(|q| {
            let t = Instant::now();
            let hits = index
                .search_with(&q.question, k, &options)
                .map_err(rag_error)?;
            let seconds = t.elapsed().as_secs_f64();
            let passages: Vec<Passage> = hits
                .iter()
                .map(|h| Passage {
                    id: h.chunk.doc_id.clone(),
                    title: h.chunk.title.clone(),
                    text: h.chunk.text.clone(),
                })
                .collect();
            let gold_rank = passages
                .iter()
                .position(|p| q.gold_passage_ids.contains(&p.id))
                .map(|i| i + 1);
            let doc_ids = passages.iter().map(|p| p.id.clone()).collect();
            Ok((
                passages,
                Retrieval {
                    doc_ids,
                    seconds,
                    gold_rank,
                },
            ))
        })
        .collect()
}

/// Recall@k and MRR over answerable questions with gold ids.
pub fn retrieval_scores(questions: &[Question], found: &[Retrieval], k: usize) -> RetrievalScores {
    let scored: Vec<&Retrieval> = questions
        .iter()
        .zip(found)
        .filter(|(q, _)| q.is_answerable() && !q.gold_passage_ids.is_empty())
        .map(|(_, r)| r)
        .collect();
    let seconds: Vec<f64> = found.iter().map(|r| r.seconds).collect();
    RetrievalScores {
        k,
        questions: scored.len(),
        recall_at_k: mean(scored.iter().map(|r| r.gold_rank.is_some() as u8 as f64)),
        mrr: mean(
            scored
                .iter()
                .map(|r| r.gold_rank.map_or(0.0, |rank| 1.0 / rank as f64)),
        ),
        seconds_p50: quantile(&seconds, 0.5),
        seconds_p95: quantile(&seconds, 0.95),
    }
}

/// Scores one answer to `q` (with the passages shown, for a retrieval arm).
fn score(
    arm: &str,
    q: &Question,
    answer: &str,
    passages: Option<&[Passage]>,
    prompt_tokens: usize,
    generation_seconds: f64,
) -> Prediction {
    let text = strip_citations(answer);
    let abstained = abstains(answer);
    let (mut em, mut f1, mut contains) = (false, 0f64, false);
    for reference in &q.answers {
        em |= crate::metrics::exact_match(&text, reference);
        f1 = f1.max(token_f1(&text, reference));
        contains |= crate::metrics::contains_answer(&text, reference);
    }
    Prediction {
        arm: arm.to_string(),
        id: q.id.clone(),
        question: q.question.clone(),
        answer: answer.to_string(),
        answerable: q.is_answerable(),
        exact_match: em,
        f1,
        contains,
        abstained,
        cited: passages.map_or_else(Vec::new, |p| prompt::cited_ids(answer, p)),
        grounded: passages.map(|p| !abstained && grounded(answer, p)),
        prompt_tokens,
        generation_seconds,
    }
}

/// The arm's scores from its predictions.
fn arm_scores(
    name: String,
    column: &str,
    adapter: Option<&AdapterSpec>,
    questions: &[Question],
    predictions: &[Prediction],
    retrieval: Option<&[Retrieval]>,
) -> ArmScores {
    let answerable: Vec<&Prediction> = predictions.iter().filter(|p| p.answerable).collect();
    let unanswerable: Vec<&Prediction> = predictions.iter().filter(|p| !p.answerable).collect();
    let frac = |ps: &[&Prediction], f: &dyn Fn(&Prediction) -> bool| {
        mean(ps.iter().map(|p| f(p) as u8 as f64))
    };
    let (mut citation_precision, mut citation_recall, mut cited_share, mut groundedness) =
        (None, None, None, None);
    if retrieval.is_some() {
        let gold = |p: &Prediction| -> &Question {
            questions
                .iter()
                .find(|q| q.id == p.id)
                .expect("a prediction answers a question")
        };
        let citing: Vec<&Prediction> = predictions.iter().filter(|p| !p.cited.is_empty()).collect();
        if !citing.is_empty() {
            citation_precision = Some(mean(citing.iter().map(|p| {
                let g = &gold(p).gold_passage_ids;
                p.cited.iter().filter(|c| g.contains(c)).count() as f64 / p.cited.len() as f64
            })));
        }
        let with_gold: Vec<&&Prediction> = answerable
            .iter()
            .filter(|p| !gold(p).gold_passage_ids.is_empty())
            .collect();
        if !with_gold.is_empty() {
            citation_recall = Some(mean(with_gold.iter().map(|p| {
                let g = &gold(p).gold_passage_ids;
                g.iter().filter(|id| p.cited.contains(id)).count() as f64 / g.len() as f64
            })));
        }
        cited_share = Some(mean(
            predictions.iter().map(|p| !p.cited.is_empty() as u8 as f64),
        ));
        let answered: Vec<&Prediction> = predictions.iter().filter(|p| !p.abstained).collect();
        if !answered.is_empty() {
            groundedness = Some(mean(
                answered
                    .iter()
                    .map(|p| p.grounded.unwrap_or(false) as u8 as f64),
            ));
        }
    }
    let generation: Vec<f64> = predictions.iter().map(|p| p.generation_seconds).collect();
    let retrieval_seconds: Option<Vec<f64>> =
        retrieval.map(|r| r.iter().map(|x| x.seconds).collect());
    let total: Vec<f64> = match &retrieval_seconds {
        Some(r) => generation.iter().zip(r).map(|(g, r)| g + r).collect(),
        None => generation.clone(),
    };
    ArmScores {
        name,
        column: column.to_string(),
        adapter: adapter.map(|a| a.path.clone()),
        retrieval: retrieval.is_some(),
        answerable: answerable.len(),
        unanswerable: unanswerable.len(),
        exact_match: frac(&answerable, &|p| p.exact_match),
        f1: mean(answerable.iter().map(|p| p.f1)),
        contains: frac(&answerable, &|p| p.contains),
        false_abstention: frac(&answerable, &|p| p.abstained),
        abstention_accuracy: (!unanswerable.is_empty())
            .then(|| frac(&unanswerable, &|p| p.abstained)),
        citation_precision,
        citation_recall,
        cited_share,
        groundedness,
        prompt_tokens_mean: mean(predictions.iter().map(|p| p.prompt_tokens as f64)),
        retrieval_p50: retrieval_seconds.as_ref().map(|r| quantile(r, 0.5)),
        retrieval_p95: retrieval_seconds.as_ref().map(|r| quantile(r, 0.95)),
        generation_p50: quantile(&generation, 0.5),
        generation_p95: quantile(&generation, 0.95),
        latency_p50: quantile(&total, 0.5),
        latency_p95: quantile(&total, 0.95),
        training: adapter.and_then(|a| training_cost(&a.path)),
    }
}

/// Token ids of a conversation through the chat template (with the generation prompt), as
/// `apply_chat_template(tokenize=True)`: the template writes any BOS itself.
fn encode(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    question: &str,
    passages: Option<&[Passage]>,
) -> Result<Vec<u32>> {
    let messages = prompt::messages(question, passages);
    let text = template
        .render(&messages, true, &ExtraContext::new())
        .map_err(EvalError::ChatTemplate)?;
    let encoding = tokenizer
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| EvalError::Tokenize {
            task: "compare".into(),
            index: 0,
            message: e.to_string(),
        })?;
    Ok(encoding.get_ids().to_vec())
}

/// Runs the comparison on backend `B`; `progress` hears of every batch. Returns the report and
/// every prediction.
pub fn compare_qa<B: KernelBackend>(
    settings: &CompareSettings,
    device: &B::Device,
    progress: CompareProgress<'_>,
) -> Result<(CompareReport, Vec<Prediction>)> {
    let started = Instant::now();
    if settings.k == 0 || settings.batch_size == 0 || settings.max_new_tokens == 0 {
        return Err(EvalError::Config {
            key: "k / batch_size / max_tokens".into(),
            message: "must be at least 1".into(),
        });
    }
    let questions = read_questions(&settings.questions, settings.limit)?;
    let retrieved = match &settings.index {
        Some(dir) => {
            let index = RagIndex::open(dir).map_err(rag_error)?;
            Some(retrieve(&index, &questions, settings.k)?)
        }
        None => None,
    };
    let loaded = load_model_dir::<B>(
        &settings.model,
        device,
        LoadOptions {
            dtype: settings.dtype,
            ..LoadOptions::default()
        },
    )?;
    let mut model: CausalLm<B> = loaded.model;
    let tokenizer = loaded.tokenizer;
    for adapter in &settings.adapters {
        model
            .load_adapter(&adapter.path)
            .map_err(|cause| adapter_error(adapter, cause))?;
    }
    let template =
        ChatTemplate::load(&settings.template, &settings.model).map_err(EvalError::ChatTemplate)?;
    let mut stop_ids = tokenizer.eos_ids.clone();
    if let Some(id) = template
        .special_tokens()
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.inner().token_to_id(t))
    {
        stop_ids.push(id);
    }
    let gen = GreedySettings {
        max_new_tokens: settings.max_new_tokens,
        stop_ids,
        stop_strings: Vec::new(),
    };
    let max_prompt = model.config().max_position_embeddings;
    let mut arms_prompts: Vec<(bool, Vec<Vec<u32>>)> = Vec::new();
    for with_rag in [false, true] {
        if with_rag && retrieved.is_none() {
            continue;
        }
        let prompts = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let passages = retrieved.as_ref().map(|r| r[i].0.as_slice());
                let ids = encode(
                    &template,
                    &tokenizer,
                    &q.question,
                    if with_rag { passages } else { None },
                )?;
                if ids.len() + settings.max_new_tokens > max_prompt {
                    return Err(EvalError::Config {
                        key: "k".into(),
                        message: format!(
                            "question {} ({}): a {}-token prompt plus {} new tokens exceeds the \
                             model's context of {max_prompt}; use a smaller -k or --max-tokens",
                            i + 1,
                            q.id,
                            ids.len(),
                            settings.max_new_tokens
                        ),
                    });
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        arms_prompts.push((with_rag, prompts));
    }

    let mut arms = Vec::new();
    let mut predictions = Vec::new();
    let columns: Vec<Option<&AdapterSpec>> = std::iter::once(None)
        .chain(settings.adapters.iter().map(Some))
        .collect();
    for adapter in columns {
        let column = adapter.map_or(crate::config::BASE_COLUMN, |a| a.name.as_str());
        match adapter {
            None => model.detach_lora(),
            Some(a) => {
                model
                    .load_adapter(&a.path)
                    .map_err(|cause| adapter_error(a, cause))?;
            }
        }
        for (with_rag, prompts) in &arms_prompts {
            let name = if *with_rag {
                format!("{column}+rag")
            } else {
                column.to_string()
            };
            let mut arm_predictions = Vec::with_capacity(questions.len());
            for (b, batch) in prompts.chunks(settings.batch_size).enumerate() {
                let t = Instant::now();
                let outputs = generate_greedy(&model, &tokenizer, batch, &gen)?;
                let seconds = t.elapsed().as_secs_f64();
                for (j, out) in outputs.iter().enumerate() {
                    let i = b * settings.batch_size + j;
                    let passages = retrieved
                        .as_ref()
                        .filter(|_| *with_rag)
                        .map(|r| r[i].0.as_slice());
                    arm_predictions.push(score(
                        &name,
                        &questions[i],
                        out.text.trim(),
                        passages,
                        batch[j].len(),
                        seconds,
                    ));
                }
                progress(&name, arm_predictions.len(), questions.len());
            }
            let retrieval: Option<Vec<Retrieval>> = retrieved
                .as_ref()
                .filter(|_| *with_rag)
                .map(|r| r.iter().map(|x| x.1.clone()).collect());
            arms.push(arm_scores(
                name,
                column,
                adapter,
                &questions,
                &arm_predictions,
                retrieval.as_deref(),
            ));
            predictions.extend(arm_predictions);
        }
    }
    let retrieval = retrieved.as_ref().map(|r| {
        let found: Vec<Retrieval> = r.iter().map(|x| x.1.clone()).collect();
        retrieval_scores(&questions, &found, settings.k)
    });
    Ok((
        CompareReport {
            model: settings.model.clone(),
            questions_file: settings.questions.clone(),
            questions: questions.len(),
            index: settings.index.clone(),
            batch_size: settings.batch_size,
            max_new_tokens: settings.max_new_tokens,
            retrieval,
            arms,
            seconds: started.elapsed().as_secs_f64(),
        },
        predictions,
    ))
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}

/// `eval.md`: one table, the arms as columns.
pub fn markdown(report: &CompareReport) -> String {
    let mut out = String::from("# Retrieval and fine-tuning compared\n\n");
    out.push_str(&format!(
        "- model `{}`; questions `{}` ({}); greedy, at most {} new tokens, batches of {}\n",
        report.model.display(),
        report.questions_file.display(),
        report.questions,
        report.max_new_tokens,
        report.batch_size
    ));
    if let (Some(index), Some(r)) = (&report.index, &report.retrieval) {
        out.push_str(&format!(
            "- index `{}`: recall@{} {:.3}, MRR {:.3} over {} answerable questions with gold \
             passages; search p50 {:.2} ms, p95 {:.2} ms\n",
            index.display(),
            r.k,
            r.recall_at_k,
            r.mrr,
            r.questions,
            r.seconds_p50 * 1e3,
            r.seconds_p95 * 1e3
        ));
    }
    out.push_str(&format!("- total {:.1} s\n\n", report.seconds));
    let arms = &report.arms;
    out.push_str("| metric |");
    for a in arms {
        out.push_str(&format!(" {} |", a.name));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(arms.len()));
    out.push('\n');
    let mut row = |label: &str, f: &dyn Fn(&ArmScores) -> String| {
        out.push_str(&format!("| {label} |"));
        for a in arms {
            out.push_str(&format!(" {} |", f(a)));
        }
        out.push('\n');
    };
    row("answerable: exact match", &|a| {
        format!("{:.3}", a.exact_match)
    });
    row("answerable: token F1", &|a| format!("{:.3}", a.f1));
    row("answerable: contains answer", &|a| {
        format!("{:.3}", a.contains)
    });
    row("answerable: abstained (wrongly)", &|a| {
        format!("{:.3}", a.false_abstention)
    });
    row("unanswerable: abstained", &|a| opt(a.abstention_accuracy));
    row("citation precision", &|a| opt(a.citation_precision));
    row("citation recall", &|a| opt(a.citation_recall));
    row("answers citing a passage", &|a| opt(a.cited_share));
    row("groundedness", &|a| opt(a.groundedness));
    row("prompt tokens (mean)", &|a| {
        format!("{:.0}", a.prompt_tokens_mean)
    });
    row(
        "retrieval p50 / p95 (ms)",
        &|a| match (a.retrieval_p50, a.retrieval_p95) {
            (Some(p50), Some(p95)) => format!("{:.2} / {:.2}", p50 * 1e3, p95 * 1e3),
            _ => "–".into(),
        },
    );
    row("generation p50 / p95 (s)", &|a| {
        format!("{:.2} / {:.2}", a.generation_p50, a.generation_p95)
    });
    row("latency p50 / p95 (s)", &|a| {
        format!("{:.2} / {:.2}", a.latency_p50, a.latency_p95)
    });
    row("training (s, tokens, tokens/s)", &|a| match &a.training {
        Some(t) => format!(
            "{:.0} s, {}, {:.0}",
            t.wall_seconds, t.tokens, t.tokens_per_sec
        ),
        None => "–".into(),
    });
    out.push_str(&format!(
        "\nn: {} answerable, {} unanswerable. Scores use SQuAD's normalisation after removing \
         citation markers; groundedness = at least {:.0}% of an answer's tokens occur in the \
         passages shown; generation latency is the wall time of the question's batch.\n",
        arms.first().map_or(0, |a| a.answerable),
        arms.first().map_or(0, |a| a.unanswerable),
        GROUNDED_SHARE * 100.0
    ));
    out
}

/// Writes `eval.json`, `eval.md`, `predictions.jsonl` and the accuracy-vs-latency plot into
/// `out` (each staged, then renamed). Returns the files written.
pub fn write_compare(
    report: &CompareReport,
    predictions: &[Prediction],
    out: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|e| EvalError::Write {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
        let path = out.join(name);
        hone_io::write_file(&path, bytes).map_err(|e| EvalError::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(path)
    };
    let json = serde_json::to_string_pretty(report).expect("the report serialises");
    let mut lines = String::new();
    for p in predictions {
        lines.push_str(&serde_json::to_string(p).expect("a prediction serialises"));
        lines.push('\n');
    }
    let mut files = vec![
        write(COMPARE_JSON, json.as_bytes())?,
        write(COMPARE_MARKDOWN, markdown(report).as_bytes())?,
        write(PREDICTIONS_FILE, lines.as_bytes())?,
    ];
    let points: Vec<(String, f64, f64)> = report
        .arms
        .iter()
        .map(|a| (a.name.clone(), a.latency_p50, a.f1))
        .collect();
    let plot = out.join(COMPARE_PLOT);
    crate::plot::scatter(
        &plot,
        "Answer F1 vs latency per arm",
        "latency p50 (s)",
        "answerable: token F1",
        &points,
    )?;
    files.push(plot);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_are_removed_but_other_brackets_kept() {
        assert_eq!(strip_citations("Paris [1] [2]."), "Paris  .");
        assert_eq!(strip_citations("a [note] b [3]"), "a [note] b ");
        assert_eq!(strip_citations("[ 2 ]x"), "x");
    }

    #[test]
    fn token_f1_follows_squad() {
        // SQuAD v2 evaluate script: "the cat sat" vs "a cat sat down" -> p 1, r 2/3.
        assert!((token_f1("the cat sat", "a cat sat down") - 0.8).abs() < 1e-12);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        assert_eq!(token_f1("The Cat!", "cat"), 1.0);
        // Repeated tokens count once per occurrence in both.
        assert!((token_f1("cat cat", "cat") - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn abstention_and_grounding() {
        assert!(abstains("I cannot answer from the given passages."));
        assert!(abstains("Sorry. i CANNOT answer from given passages"));
        assert!(!abstains("Paris"));
        let shown = [Passage {
            id: "d".into(),
            title: "France".into(),
            text: "Paris is the capital of France.".into(),
        }];
        assert!(grounded("The capital is Paris [1]", &shown));
        assert!(!grounded("Lyon was the capital of Gaul", &shown));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.95), 5.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
