//! Scoring functions, free of any model: answer normalisation and exact match (SQuAD's
//! `normalize_answer`), word-bounded "contains", numbers in free text (GSM8K's `#### N` or the
//! last number, as lm-evaluation-harness' `flexible-extract` filter), ROUGE-L (Lin 2004: the
//! LCS-based F-measure, β = 1, as `rouge-score`'s `rougeL`, here on lower-cased whitespace
//! tokens), multiple-choice decisions (`acc` and the per-character `acc_norm` of
//! lm-evaluation-harness) and perplexity.

/// The marker GSM8K puts before the final answer.
pub const ANSWER_MARKER: &str = "####";

/// SQuAD's answer normalisation: lower case, ASCII punctuation removed, the articles `a`, `an`,
/// `the` removed, whitespace collapsed to single spaces.
pub fn normalize_answer(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The final answer of a worked solution: the text after the last `####` when there is one,
/// else the whole text; trimmed.
pub fn final_answer(text: &str) -> &str {
    match text.rfind(ANSWER_MARKER) {
        Some(at) => text[at + ANSWER_MARKER.len()..].trim(),
        None => text.trim(),
    }
}

/// Exact match after [`final_answer`] and [`normalize_answer`] on both sides.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalize_answer(final_answer(prediction)) == normalize_answer(final_answer(reference))
}

/// Whether the normalised final answer of `reference` appears in the normalised prediction as
/// a run of whole words (so `18` is not found in `180`). An empty reference is never found.
pub fn contains_answer(prediction: &str, reference: &str) -> bool {
    let needle = normalize_answer(final_answer(reference));
    if needle.is_empty() {
        return false;
    }
    let hay = normalize_answer(prediction);
    let hay: Vec<&str> = hay.split_whitespace().collect();
    let needle: Vec<&str> = needle.split_whitespace().collect();
    hay.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Every number in `text`, in order: optional minus sign (only where it cannot be a binary
/// minus, i.e. not right after a letter or digit), digits with optional thousands separators
/// (`1,234`), optional decimals (`3.50`, `.5`). `$18.` reads as 18.
pub fn extract_numbers(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_number = |j: usize| -> bool {
            match chars.get(j) {
                Some(c) if c.is_ascii_digit() => true,
                Some('.') => chars.get(j + 1).is_some_and(|c| c.is_ascii_digit()),
                _ => false,
            }
        };
        let negative =
            chars[i] == '-' && starts_number(i + 1) && (i == 0 || !chars[i - 1].is_alphanumeric());
        if !(negative || starts_number(i)) {
            i += 1;
            continue;
        }
        let mut j = if negative { i + 1 } else { i };
        let mut digits = String::new();
        if negative {
            digits.push('-');
        }
        // Integer part with thousands separators: a comma counts only before exactly 3 digits.
        while j < chars.len() {
            let c = chars[j];
            if c.is_ascii_digit() {
                digits.push(c);
                j += 1;
            } else if c == ','
                && (1..=3).all(|k| chars.get(j + k).is_some_and(|d| d.is_ascii_digit()))
                && !chars.get(j + 4).is_some_and(|d| d.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        if chars.get(j) == Some(&'.') && chars.get(j + 1).is_some_and(|c| c.is_ascii_digit()) {
            digits.push('.');
            j += 1;
            while j < chars.len() && chars[j].is_ascii_digit() {
                digits.push(chars[j]);
                j += 1;
            }
        }
        if let Ok(value) = digits.parse::<f64>() {
            out.push(value);
        }
        i = j.max(i + 1);
    }
    out
}

/// The answer number of a text: the first number after the last `####` if the text has one,
/// else the last number of the text.
pub fn answer_number(text: &str) -> Option<f64> {
    match text.rfind(ANSWER_MARKER) {
        Some(at) => extract_numbers(&text[at + ANSWER_MARKER.len()..])
            .first()
            .copied(),
        None => extract_numbers(text).last().copied(),
    }
}

/// Numeric match: both texts have an [`answer_number`] and they are equal (within 1e-6
/// relative, for decimals written differently).
pub fn numeric_match(prediction: &str, reference: &str) -> bool {
    match (answer_number(prediction), answer_number(reference)) {
        (Some(p), Some(r)) => (p - r).abs() <= 1e-6 * r.abs().max(1.0),
        _ => false,
    }
}

/// Length of the longest common subsequence of two token sequences.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure (β = 1) of `prediction` against `reference` on lower-cased whitespace
/// tokens: `P = LCS / |prediction|`, `R = LCS / |reference|`, `F = 2PR / (P + R)`; 0 when
/// either side is empty or nothing is shared.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p = prediction.to_lowercase();
    let r = reference.to_lowercase();
    let p: Vec<&str> = p.split_whitespace().collect();
    let r: Vec<&str> = r.split_whitespace().collect();
    let lcs = lcs_len(&p, &r);
    if lcs == 0 {
        return 0.0;
    }
    let precision = lcs as f64 / p.len() as f64;
    let recall = lcs as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Index of the largest value, the first on ties (`None` for an empty slice or NaN only).
pub fn argmax(values: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some(b) if values[b] >= *v => {}
            _ => best = Some(i),
        }
    }
    best
}

/// The choice with the highest log-likelihood (`acc`).
pub fn choose(log_likelihoods: &[f64]) -> Option<usize> {
    argmax(log_likelihoods)
}

/// The choice with the highest log-likelihood per character of the choice's text (`acc_norm` of
/// lm-evaluation-harness, which divides by `len(continuation)` in characters).
pub fn choose_normalized(log_likelihoods: &[f64], choice_chars: &[usize]) -> Option<usize> {
    let per_char: Vec<f64> = log_likelihoods
        .iter()
        .zip(choice_chars)
        .map(|(ll, &n)| ll / n.max(1) as f64)
        .collect();
    argmax(&per_char)
}

/// Perplexity of a mean negative log-likelihood (nats per token).
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

/// Standard error of a mean of `n` values in [0, 1] with mean `p` (sample standard deviation
/// over `sqrt(n)`, as lm-evaluation-harness reports `acc_stderr`); 0 for fewer than 2 values.
pub fn mean_stderr(p: f64, n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    (p * (1.0 - p) / (n as f64 - 1.0)).max(0.0).sqrt()
}

/// Running mean of a metric.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean {
    sum: f64,
    count: usize,
}

impl Mean {
    /// Adds one value.
    pub fn add(&mut self, value: f64) {
        self.sum += value;
        self.count += 1;
    }

    /// Adds 1 for true, 0 for false.
    pub fn add_bool(&mut self, value: bool) {
        self.add(if value { 1.0 } else { 0.0 });
    }

    /// The mean (0 when empty).
    pub fn value(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// Number of values.
    pub fn count(&self) -> usize {
        self.count
    }
}
