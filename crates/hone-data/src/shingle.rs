//! Shingling: text -> 64-bit hashes of word or character n-grams, shared by near-duplicate
//! detection and decontamination.
//!
//! Words are maximal runs of alphanumeric characters, lowercased; punctuation and whitespace
//! only separate them. Characters are lowercased, with every whitespace run read as one space.
//! Each unit is hashed (xxh3 for words, SplitMix64 for chars); an n-gram's hash folds its unit
//! hashes with a multiply-add and a SplitMix64 finaliser. A text with fewer units than `n` gives
//! one shingle of all its units, so short texts can still be compared; an empty one gives none.
//! No `String` is allocated per word: lowercasing reuses one buffer per call site.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// What an n-gram is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShingleUnit {
    #[default]
    Words,
    Chars,
}

/// SplitMix64 finaliser: a fast, well-mixing bijection on u64.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Reusable buffers for shingling, one per thread.
#[derive(Default)]
pub struct Scratch {
    word: String,
    units: Vec<u64>,
    /// The shingle hashes of the last call.
    pub shingles: Vec<u64>,
}

/// Calls `f` with the hash of each lowercased word of `text`.
pub fn for_each_word_hash(text: &str, buf: &mut String, mut f: impl FnMut(u64)) {
    let bytes = text.as_bytes();
    let mut start = None;
    let mut i = 0;
    while i < bytes.len() {
        // ASCII fast path; other characters are decoded (i is always on a char boundary).
        let (word_char, len) = if bytes[i] < 0x80 {
            (bytes[i].is_ascii_alphanumeric(), 1)
        } else {
            match text[i..].chars().next() {
                Some(c) => (c.is_alphanumeric(), c.len_utf8()),
                None => break,
            }
        };
        match (word_char, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                f(word_hash(&text[s..i], buf));
                start = None;
            }
            _ => {}
        }
        i += len;
    }
    if let Some(s) = start {
        f(word_hash(&text[s..], buf));
    }
}

fn word_hash(word: &str, buf: &mut String) -> u64 {
    if word
        .bytes()
        .all(|b| !b.is_ascii_uppercase() && b.is_ascii())
    {
        return xxh3_64(word.as_bytes());
    }
    buf.clear();
    for c in word.chars() {
        buf.extend(c.to_lowercase());
    }
    xxh3_64(buf.as_bytes())
}

fn char_units(text: &str, out: &mut Vec<u64>) {
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(mix64(' ' as u64));
            }
            in_space = true;
            continue;
        }
        in_space = false;
        for l in c.to_lowercase() {
            out.push(mix64(l as u64));
        }
    }
}

/// Hash of one n-gram of unit hashes.
#[inline]
fn fold(window: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &u in window {
        h = h.wrapping_mul(0x100_0000_01B3).wrapping_add(u);
        h = h.rotate_left(23);
    }
    mix64(h ^ window.len() as u64)
}

/// Fills `scratch.shingles` with the n-gram hashes of `text` (duplicates included).
pub fn shingles(text: &str, unit: ShingleUnit, n: usize, scratch: &mut Scratch) {
    let n = n.max(1);
    scratch.units.clear();
    scratch.shingles.clear();
    match unit {
        ShingleUnit::Words => {
            let units = &mut scratch.units;
            for_each_word_hash(text, &mut scratch.word, |h| units.push(h));
        }
        ShingleUnit::Chars => char_units(text.trim(), &mut scratch.units),
    }
    let units = &scratch.units;
    if units.is_empty() {
        return;
    }
    if units.len() < n {
        scratch.shingles.push(fold(units));
        return;
    }
    scratch.shingles.extend(units.windows(n).map(fold));
}

/// The n-gram hashes of `text` over words, only for full windows of `n` words (for
/// decontamination, where a short text must not match by being short).
pub fn full_word_ngrams(text: &str, n: usize, scratch: &mut Scratch) {
    let n = n.max(1);
    scratch.units.clear();
    scratch.shingles.clear();
    let units = &mut scratch.units;
    for_each_word_hash(text, &mut scratch.word, |h| units.push(h));
    if scratch.units.len() >= n {
        let units = &scratch.units;
        scratch.shingles.extend(units.windows(n).map(fold));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_ignore_case_and_punctuation() {
        let mut s = Scratch::default();
        shingles("Hello, World! Foo", ShingleUnit::Words, 2, &mut s);
        let a = s.shingles.clone();
        shingles("hello world   foo.", ShingleUnit::Words, 2, &mut s);
        assert_eq!(a, s.shingles);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn unicode_words_are_lowercased() {
        let mut s = Scratch::default();
        shingles("ÉCOLE Straße naïve", ShingleUnit::Words, 1, &mut s);
        let a = s.shingles.clone();
        shingles("école straße—naïve", ShingleUnit::Words, 1, &mut s);
        assert_eq!(a, s.shingles);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn word_order_matters() {
        let mut s = Scratch::default();
        shingles("a b", ShingleUnit::Words, 2, &mut s);
        let a = s.shingles.clone();
        shingles("b a", ShingleUnit::Words, 2, &mut s);
        assert_ne!(a, s.shingles);
    }

    #[test]
    fn short_text_gives_one_shingle_and_empty_gives_none() {
        let mut s = Scratch::default();
        shingles("two words", ShingleUnit::Words, 5, &mut s);
        assert_eq!(s.shingles.len(), 1);
        shingles(" ... ", ShingleUnit::Words, 5, &mut s);
        assert!(s.shingles.is_empty());
        full_word_ngrams("two words", 5, &mut s);
        assert!(s.shingles.is_empty());
    }

    #[test]
    fn char_ngrams_collapse_whitespace() {
        let mut s = Scratch::default();
        shingles("Ab  c", ShingleUnit::Chars, 3, &mut s);
        let a = s.shingles.clone();
        shingles("ab c", ShingleUnit::Chars, 3, &mut s);
        assert_eq!(a, s.shingles);
        assert_eq!(a.len(), 2);
    }
}
