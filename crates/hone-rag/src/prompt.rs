//! The retrieval-augmented prompt, one format for every place that shows passages to a model:
//! retrieval-aware training examples ([`crate::raft`]), and the serving and evaluation commands
//! that answer with retrieval. Passages are numbered in the order shown, `[1]`, `[2]`, ...; the
//! model cites them by number, and [`cited_ids`] maps the numbers of an answer back to passage
//! ids. Short numbers are easier for a small model to copy than document ids.
//!
//! ```text
//! system:    SYSTEM_PROMPT
//! user:      Passages:
//!            [1] <title>
//!            <text>
//!
//!            [2] ...
//!
//!            Question: <question>
//! assistant: <answer> [2]            (or ABSTAIN)
//! ```

use hone_data::Message;

/// The system message of a prompt with passages.
pub const SYSTEM_PROMPT: &str = "Answer the question using the passages. Give a short answer and \
     cite the passages it comes from by their numbers, like [1]. If the passages do not contain \
     the answer, answer exactly: I cannot answer from the given passages.";

/// The answer to a question the passages do not answer.
pub const ABSTAIN: &str = "I cannot answer from the given passages.";

/// The system message of a closed-book prompt (no passages).
pub const CLOSED_BOOK_SYSTEM_PROMPT: &str = "Answer the question with a short answer.";

/// A passage shown to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passage {
    /// The document id (what gold passage ids name).
    pub id: String,
    pub title: String,
    pub text: String,
}

/// The user message: the numbered passages, then the question.
pub fn user_message(question: &str, passages: &[Passage]) -> String {
    let mut out = String::from("Passages:\n");
    for (i, p) in passages.iter().enumerate() {
        let title = p.title.trim();
        if title.is_empty() {
            out.push_str(&format!("[{}]\n{}\n\n", i + 1, p.text.trim()));
        } else {
            out.push_str(&format!("[{}] {title}\n{}\n\n", i + 1, p.text.trim()));
        }
    }
    out.push_str("Question: ");
    out.push_str(question.trim());
    out
}

/// System and user messages of a question with passages (`None`: closed book, the question
/// alone).
pub fn messages(question: &str, passages: Option<&[Passage]>) -> Vec<Message> {
    match passages {
        Some(passages) => vec![
            Message::system(SYSTEM_PROMPT),
            Message::user(user_message(question, passages)),
        ],
        None => vec![
            Message::system(CLOSED_BOOK_SYSTEM_PROMPT),
            Message::user(question.trim()),
        ],
    }
}

/// An answer that cites `labels` (1-based passage numbers): `answer [1] [3]`.
pub fn cited_answer(answer: &str, labels: &[usize]) -> String {
    let mut out = answer.trim().to_string();
    for label in labels {
        out.push_str(&format!(" [{label}]"));
    }
    out
}

/// The passage numbers an answer cites (`[n]` with `1 <= n <= passages`), in order, without
/// repeats; other bracketed text is not a citation.
pub fn cited_labels(answer: &str, passages: usize) -> Vec<usize> {
    let mut labels = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        if let Ok(n) = rest[..close].trim().parse::<usize>() {
            if (1..=passages).contains(&n) && !labels.contains(&n) {
                labels.push(n);
            }
        }
        rest = &rest[close + 1..];
    }
    labels
}

/// The ids of the passages an answer cites.
pub fn cited_ids(answer: &str, passages: &[Passage]) -> Vec<String> {
    cited_labels(answer, passages.len())
        .into_iter()
        .map(|n| passages[n - 1].id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(id: &str) -> Passage {
        Passage {
            id: id.into(),
            title: format!("title of {id}"),
            text: format!("text of {id}"),
        }
    }

    #[test]
    fn passages_are_numbered_in_order_and_the_question_comes_last() {
        let text = user_message(" why? ", &[passage("a"), passage("b")]);
        assert_eq!(
            text,
            "Passages:\n[1] title of a\ntext of a\n\n[2] title of b\ntext of b\n\nQuestion: why?"
        );
    }

    #[test]
    fn citations_map_numbers_back_to_ids() {
        let shown = [passage("a"), passage("b"), passage("c")];
        let answer = cited_answer("Paris", &[3, 1]);
        assert_eq!(answer, "Paris [3] [1]");
        assert_eq!(cited_ids(&answer, &shown), ["c", "a"]);
        // Out of range, repeated, or not a number: not citations.
        assert_eq!(
            cited_ids("x [4] [0] [2] [2] [see above] [ 1 ]", &shown),
            ["b", "a"]
        );
        assert!(cited_ids("no citation", &shown).is_empty());
    }
}
