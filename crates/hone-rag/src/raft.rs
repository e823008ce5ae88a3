//! Retrieval-aware training examples (RAFT, Zhang et al. 2024): each question is shown with `k`
//! passages, its gold passages among hard distractors (the retriever's best non-gold matches for
//! the question), and the target is a short answer that cites the gold passages by number
//! ([`crate::prompt`]). In a share of the examples (`1 - gold_share`) the gold passages are left
//! out, and the target is the answer without a citation (RAFT: the model also learns the domain
//! itself) or, with [`WithoutGold::Abstain`], the abstention. A question without an answer
//! (SQuAD 2.0's unanswerable ones) gets [`crate::prompt::ABSTAIN`] whatever is shown. The
//! closed-book form is the question alone and its answer (the fine-tuning-only arm).
//!
//! Questions are split into training and held-out sets by a hash of their id and the seed, so a
//! question is never in both and adding questions does not move the others. Every random choice
//! (gold left out, passage order, filler distractors) is drawn from a generator seeded by the
//! seed and the question id: the same inputs give the same examples.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use hone_data::{Example, Message, RecordError};
use serde::{Deserialize, Serialize};

use crate::document::Document;
use crate::error::{RagError, Result};
use crate::prompt::{self, Passage, ABSTAIN};
use crate::retriever::Retriever;

/// One question of a QA file (`questions.jsonl` of `datasets/rag/`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Question {
    pub id: String,
    pub question: String,
    /// Accepted answers (empty: unanswerable).
    #[serde(default)]
    pub answers: Vec<String>,
    /// Explicitly unanswerable (`false`) or answerable; default: whether `answers` is non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answerable: Option<bool>,
    /// Ids of the passages that hold the answer (document ids of the corpus).
    #[serde(default)]
    pub gold_passage_ids: Vec<String>,
}

impl Question {
    /// Whether the question has an answer.
    pub fn is_answerable(&self) -> bool {
        self.answerable.unwrap_or(!self.answers.is_empty()) && !self.answers.is_empty()
    }
}

/// Reads a JSONL file of [`Question`]s (other fields are ignored); a bad line is an error naming
/// the file and line, as are a repeated id and an empty file.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|source| RagError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, message: String| RagError::InvalidDocuments {
        errors: vec![RecordError {
            file: path.display().to_string(),
            line,
            key: None,
            message,
        }],
    };
    let mut questions = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| {
            bad(
                i + 1,
                format!(
                    "expected a question object {{id, question, answers, gold_passage_ids}}: {e}"
                ),
            )
        })?;
        if q.question.trim().is_empty() {
            return Err(bad(i + 1, format!("question `{}` has no text", q.id)));
        }
        if !seen.insert(q.id.clone()) {
            return Err(bad(i + 1, format!("question id `{}` appears twice", q.id)));
        }
        questions.push(q);
    }
    if questions.is_empty() {
        return Err(RagError::Config {
            key: "questions".into(),
            message: format!("{}: no questions", path.display()),
        });
    }
    Ok(questions)
}

/// What the target is when the gold passages are left out of an answerable question's example.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WithoutGold {
    /// The answer, without a citation (RAFT).
    #[default]
    Answer,
    /// The abstention.
    Abstain,
}

/// How examples are made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RaftOptions {
    /// Passages shown with each question (gold included).
    pub k: usize,
    /// Share of answerable questions whose example shows the gold passages (RAFT's P), in [0, 1].
    pub gold_share: f64,
    /// The target when the gold passages are left out.
    pub without_gold: WithoutGold,
    /// Share of questions held out (written as questions, never as training examples), in [0, 1).
    pub heldout_fraction: f64,
    /// The question alone, no passages (the closed-book arm).
    pub closed_book: bool,
    /// Largest share of unanswerable questions among the training examples, in [0, 1]; `None`:
    /// all of them (the data set's own share). Above it, unanswerable training questions are
    /// left out by a seeded draw per question id (the share lands near the cap). A model
    /// trained on mostly unanswerable questions learns to refuse everything.
    pub unanswerable_share: Option<f64>,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            k: 4,
            gold_share: 0.8,
            without_gold: WithoutGold::Answer,
            heldout_fraction: 0.2,
            closed_book: false,
            unanswerable_share: None,
            seed: 0,
        }
    }
}

impl RaftOptions {
    fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: &str| {
            Err(RagError::Config {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.k == 0 {
            return bad("k", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.gold_share) {
            return bad("gold_share", "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.heldout_fraction) {
            return bad("heldout_fraction", "must be in [0, 1)");
        }
        if self
            .unanswerable_share
            .is_some_and(|s| !(0.0..=1.0).contains(&s))
        {
            return bad("unanswerable_share", "must be in [0, 1]");
        }
        Ok(())
    }
}

/// Counts of what [`build_raft`] made.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RaftReport {
    pub questions: usize,
    pub train_questions: usize,
    pub heldout_questions: usize,
    /// Training examples showing their gold passages.
    pub with_gold: usize,
    /// Training examples of answerable questions with the gold passages left out.
    pub without_gold: usize,
    /// Training examples of unanswerable questions (target: the abstention).
    pub unanswerable: usize,
    /// Unanswerable training questions left out by `unanswerable_share`.
    pub unanswerable_dropped: usize,
    /// Distractors taken from the retriever's ranking / drawn at random when it had too few.
    pub hard_distractors: usize,
    pub random_distractors: usize,
    /// Gold passage ids not in the corpus (those questions are shown without them).
    pub missing_gold: usize,
}

/// Training examples, held-out questions and counts.
#[derive(Clone, Debug)]
pub struct Raft {
    pub train: Vec<Example>,
    pub heldout: Vec<Question>,
    pub report: RaftReport,
}

/// SplitMix64: a small seeded generator (the choices need reproducibility, not quality).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, id: &str) -> Self {
        Self(seed ^ xxhash_rust::xxh3::xxh3_64(id.as_bytes()))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Whether question `id` is held out: a hash of the id and the seed, not its position.
fn held_out(id: &str, seed: u64, fraction: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), seed ^ 0x686f_6e65);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Candidates asked of the retriever per question, for the distractors.
const CANDIDATES_PER_PASSAGE: usize = 4;

/// Builds the examples of `questions` over the documents of `corpus`, with distractors from
/// `retriever` (which must index the same documents: hits are mapped to documents by doc id).
pub fn build_raft(
    questions: &[Question],
    corpus: &[Document],
    retriever: &dyn Retriever,
    options: &RaftOptions,
) -> Result<Raft> {
    options.validate()?;
    if corpus.is_empty() {
        return Err(RagError::EmptyCorpus {
            inputs: "the corpus".into(),
        });
    }
    let by_id: HashMap<&str, &Document> = corpus.iter().map(|d| (d.id.as_str(), d)).collect();
    let passage = |d: &Document| Passage {
        id: d.id.clone(),
        title: d.title.clone(),
        text: d.text.clone(),
    };
    let mut report = RaftReport {
        questions: questions.len(),
        ..Default::default()
    };
    let mut train = Vec::new();
    let mut heldout = Vec::new();
    // The probability of keeping an unanswerable training question that brings their share
    // down to the cap: kept / (kept + answerable) = share.
    let keep_unanswerable = options.unanswerable_share.map_or(1.0, |share| {
        let training = questions
            .iter()
            .filter(|q| !held_out(&q.id, options.seed, options.heldout_fraction));
        let (unanswerable, answerable) =
            training.fold((0usize, 0usize), |(u, a), q| match q.is_answerable() {
                true => (u, a + 1),
                false => (u + 1, a),
            });
        if unanswerable == 0 || share >= 1.0 {
            1.0
        } else {
            (share / (1.0 - share) * answerable as f64 / unanswerable as f64).min(1.0)
        }
    });
    for q in questions {
        if held_out(&q.id, options.seed, options.heldout_fraction) {
            heldout.push(q.clone());
            continue;
        }
        // Kept when a seeded hash of the id falls below the keep probability.
        if !q.is_answerable() && !held_out(&q.id, options.seed ^ 0x756e_616e, keep_unanswerable) {
            report.unanswerable_dropped += 1;
            continue;
        }
        report.train_questions += 1;
        let mut rng = Rng::new(options.seed, &q.id);
        let answerable = q.is_answerable();
        let answer = q.answers.first().map(|a| a.trim()).unwrap_or_default();
        if options.closed_book {
            let target = if answerable { answer } else { ABSTAIN };
            if answerable {
                report.without_gold += 1;
            } else {
                report.unanswerable += 1;
            }
            let mut messages = prompt::messages(&q.question, None);
            messages.push(Message::assistant(target));
            train.push(Example::Chat(messages));
            continue;
        }
        let gold: Vec<&Document> = q
            .gold_passage_ids
            .iter()
            .filter_map(|id| {
                let found = by_id.get(id.as_str()).copied();
                if found.is_none() {
                    report.missing_gold += 1;
                }
                found
            })
            .take(options.k)
            .collect();
        // The draw is made for every question, so that changing one option leaves the others'
        // choices where they were.
        let show_gold = rng.unit() < options.gold_share && !gold.is_empty();
        let mut shown: Vec<Passage> = if show_gold {
            gold.iter().map(|d| passage(d)).collect()
        } else {
            Vec::new()
        };
        let mut taken: HashSet<&str> = q.gold_passage_ids.iter().map(String::as_str).collect();
        let wanted = options.k - shown.len();
        let hits = retriever.search(
            &q.question,
            wanted.max(1) * CANDIDATES_PER_PASSAGE + gold.len(),
        )?;
        for hit in hits {
            if shown.len() == options.k {
                break;
            }
            if let Some(d) = by_id.get(hit.chunk.doc_id.as_str()) {
                if taken.insert(d.id.as_str()) {
                    shown.push(passage(d));
                    report.hard_distractors += 1;
                }
            }
        }
        // A small corpus or a narrow ranking: fill with random documents.
        let free = corpus.len()
            - corpus
                .iter()
                .filter(|d| taken.contains(d.id.as_str()))
                .count();
        let mut left = (options.k - shown.len()).min(free);
        while left > 0 {
            let d = &corpus[rng.below(corpus.len())];
            if taken.insert(d.id.as_str()) {
                shown.push(passage(d));
                report.random_distractors += 1;
                left -= 1;
            }
        }
        rng.shuffle(&mut shown);
        let target = if !answerable {
            report.unanswerable += 1;
            ABSTAIN.to_string()
        } else if show_gold {
            report.with_gold += 1;
            let labels: Vec<usize> = shown
                .iter()
                .enumerate()
                .filter(|(_, p)| gold.iter().any(|g| g.id == p.id))
                .map(|(i, _)| i + 1)
                .collect();
            prompt::cited_answer(answer, &labels)
        } else {
            report.without_gold += 1;
            match options.without_gold {
                WithoutGold::Answer => answer.to_string(),
                WithoutGold::Abstain => ABSTAIN.to_string(),
            }
        };
        let mut messages = prompt::messages(&q.question, Some(&shown));
        messages.push(Message::assistant(target));
        train.push(Example::Chat(messages));
    }
    report.heldout_questions = heldout.len();
    Ok(Raft {
        train,
        heldout,
        report,
    })
}
