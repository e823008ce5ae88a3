//! Exact duplicate removal on the normalised text.
//!
//! The key is a 128-bit xxh3 hash of every message's role and content (after cleaning), so two
//! examples are duplicates when their conversations are identical; raw text hashes as one piece
//! labelled `text` (see [`Example::parts`]), as it did when it was stored as a `text` message,
//! so the split of a data set does not move. The first occurrence in
//! input order is kept. The same hash, folded to 64 bits, keys the train/validation split.

use std::collections::HashMap;

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::example::Example;

/// Content hash of an example: roles and contents, with separators that cannot occur in text
/// order ambiguously (lengths are hashed too).
pub fn content_hash(example: &Example) -> u128 {
    let mut h = Xxh3::new();
    for (label, content) in example.parts() {
        h.update(label.as_bytes());
        h.update(&[0]);
        h.update(&(content.len() as u64).to_le_bytes());
        h.update(content.as_bytes());
    }
    h.digest128()
}

/// Content hashes of many examples, in parallel.
pub fn content_hashes(examples: &[&Example]) -> Vec<u128> {
    examples.par_iter().map(|e| content_hash(e)).collect()
}

/// For each position, the index of the earlier identical item, if any.
pub fn find_exact_duplicates(hashes: &[u128]) -> Vec<Option<usize>> {
    let mut first: HashMap<u128, usize> = HashMap::with_capacity(hashes.len());
    hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| match first.get(&h) {
            Some(&j) => Some(j),
            None => {
                first.insert(h, i);
                None
            }
        })
        .collect()
}
