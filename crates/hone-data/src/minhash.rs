//! Near-duplicate removal with MinHash signatures and LSH banding.
//!
//! Reference: Broder, "On the resemblance and containment of documents" (1997), and Leskovec,
//! Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3 (banding technique).
//!
//! Each text is shingled ([`crate::shingle`]); permutation `i` is the universal hash
//! `h_i(x) = (a_i * x + b_i) >> 32` over 64-bit shingle hashes (multiply-shift, `a_i` odd), with
//! `a_i, b_i` drawn from SplitMix64 seeded by `seed`, so signatures are deterministic. The
//! signature keeps the minimum of each `h_i`: `num_perm` u32 values. It is split into `bands`
//! bands of `num_perm / bands` rows; texts that agree on a whole band become candidate pairs,
//! and a pair is a near-duplicate only if the estimated Jaccard similarity (the fraction of
//! equal signature values) is at least `threshold`.
//!
//! Texts are visited in input order; a text is dropped when it is a near-duplicate of a text
//! already kept, otherwise it is kept and indexed. So the survivors hold no verified
//! near-duplicate pair, and since this runs before the train/validation split, no
//! near-duplicates leak between train and validation. Texts without any shingle (no words) are
//! left alone.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::shingle::{mix64, shingles, Scratch, ShingleUnit};

/// Near-duplicate settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NearDedupConfig {
    /// Run near-duplicate removal.
    pub enabled: bool,
    /// Shingle over words or characters.
    pub unit: ShingleUnit,
    /// Shingle size in units. The default, 3 words, suits instruction-sized texts: one word
    /// changed in a 40-word text leaves a Jaccard similarity of 35/41 = 0.85 (5-grams: 0.76,
    /// too close to the threshold for 128 permutations). For chars, try 5-10.
    pub ngram: usize,
    /// Number of hash permutations (signature length).
    pub num_perm: usize,
    /// Number of LSH bands; must divide `num_perm`. With 128 permutations, 32 bands of 4
    /// rows make a pair with similarity 0.7 a candidate with probability 0.9998 (and one at
    /// 0.42 with probability 1/2); candidates are then verified against `threshold`.
    pub bands: usize,
    /// Estimated Jaccard similarity at or above which two texts are near-duplicates.
    pub threshold: f64,
    /// Seed of the permutations.
    pub seed: u64,
}

impl Default for NearDedupConfig {
    fn default() -> Self {
        NearDedupConfig {
            enabled: true,
            unit: ShingleUnit::Words,
            ngram: 3,
            num_perm: 128,
            bands: 32,
            threshold: 0.7,
            seed: 42,
        }
    }
}

impl NearDedupConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.ngram == 0 {
            return Err(DataError::config("dedupe.near.ngram", "must be at least 1"));
        }
        if self.num_perm == 0 || self.bands == 0 {
            return Err(DataError::config(
                "dedupe.near.num_perm",
                "num_perm and bands must be at least 1",
            ));
        }
        if !self.num_perm.is_multiple_of(self.bands) {
            return Err(DataError::config(
                "dedupe.near.bands",
                format!(
                    "bands ({}) must divide num_perm ({})",
                    self.bands, self.num_perm
                ),
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(DataError::config(
                "dedupe.near.threshold",
                format!("must be in (0, 1], found {}", self.threshold),
            ));
        }
        Ok(())
    }

    /// The similarity at which a pair becomes a candidate with probability 1/2 or so:
    /// `(1 / bands) ^ (1 / rows)`. Useful to check the banding suits `threshold`.
    pub fn lsh_threshold(&self) -> f64 {
        let rows = (self.num_perm / self.bands.max(1)).max(1) as f64;
        (1.0 / self.bands.max(1) as f64).powf(1.0 / rows)
    }
}

/// The permutation family.
#[derive(Clone, Debug)]
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    unit: ShingleUnit,
    ngram: usize,
}

impl MinHasher {
    pub fn new(config: &NearDedupConfig) -> Self {
        let mut state = config.seed;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            mix64(state)
        };
        let mut a = Vec::with_capacity(config.num_perm);
        let mut b = Vec::with_capacity(config.num_perm);
        for _ in 0..config.num_perm {
            a.push(next() | 1);
            b.push(next());
        }
        MinHasher {
            a,
            b,
            unit: config.unit,
            ngram: config.ngram,
        }
    }

    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// Writes the signature of `text` into `sig` (length `num_perm`); false if `text` has no
    /// shingle (then `sig` is all `u32::MAX`).
    pub fn signature_into(&self, text: &str, scratch: &mut Scratch, sig: &mut [u32]) -> bool {
        shingles(text, self.unit, self.ngram, scratch);
        sig.fill(u32::MAX);
        let k = sig.len().min(self.a.len());
        update_signature(&mut sig[..k], &self.a[..k], &self.b[..k], &scratch.shingles);
        !scratch.shingles.is_empty()
    }

    /// Signatures of many texts, computed in parallel.
    pub fn signatures<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Signatures {
        let k = self.num_perm();
        let mut data = vec![u32::MAX; texts.len() * k];
        let mut has = vec![false; texts.len()];
        if k > 0 {
            data.par_chunks_mut(k)
                .zip(has.par_iter_mut())
                .zip(texts.par_iter())
                .for_each_init(Scratch::default, |scratch, ((sig, has), text)| {
                    *has = self.signature_into(text.as_ref(), scratch, sig);
                });
        }
        Signatures { data, has, k }
    }
}

/// `sig[i] = min(sig[i], min over x of (a[i] * x + b[i]) >> 32)`: the hot loop.
///
/// The portable build targets baseline x86-64, which has no vector 64-bit multiply; where the
/// CPU has AVX-512 DQ or AVX2, the same code is compiled for it and picked at run time.
fn update_signature(sig: &mut [u32], a: &[u64], b: &[u64], shingles: &[u64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512dq") && std::is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU supports every feature the function is compiled for (checked above).
            return unsafe { update_signature_avx512(sig, a, b, shingles) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return unsafe { update_signature_avx2(sig, a, b, shingles) };
        }
    }
    update_signature_portable(sig, a, b, shingles)
}

#[inline(always)]
fn update_signature_portable(sig: &mut [u32], a: &[u64], b: &[u64], shingles: &[u64]) {
    for &x in shingles {
        for ((s, &a), &b) in sig.iter_mut().zip(a).zip(b) {
            let h = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
            *s = (*s).min(h);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn update_signature_avx512(sig: &mut [u32], a: &[u64], b: &[u64], shingles: &[u64]) {
    update_signature_portable(sig, a, b, shingles)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_signature_avx2(sig: &mut [u32], a: &[u64], b: &[u64], shingles: &[u64]) {
    update_signature_portable(sig, a, b, shingles)
}

/// Signatures of a list of texts, stored flat.
#[derive(Clone, Debug)]
pub struct Signatures {
    data: Vec<u32>,
    has: Vec<bool>,
    k: usize,
}

impl Signatures {
    pub fn len(&self) -> usize {
        self.has.len()
    }

    pub fn is_empty(&self) -> bool {
        self.has.is_empty()
    }

    /// The signature of text `i`, or `None` if it had no shingle.
    pub fn get(&self, i: usize) -> Option<&[u32]> {
        self.has
            .get(i)
            .copied()
            .filter(|&h| h)
            .map(|_| &self.data[i * self.k..(i + 1) * self.k])
    }
}

/// Fraction of positions where two signatures agree: an unbiased estimate of Jaccard similarity.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len() as f64
}

/// Hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// LSH buckets of the kept texts: per band, bucket key -> newest entry; entries chain to older
/// ones, so inserting allocates no per-bucket list.
struct BandIndex {
    heads: Vec<HashMap<u64, u32, BuildHasherDefault<IdHasher>>>,
    /// (text index, previous entry in the same bucket or `NONE`).
    entries: Vec<(u32, u32)>,
}

const NONE: u32 = u32::MAX;

impl BandIndex {
    fn new(bands: usize, capacity: usize) -> Self {
        BandIndex {
            heads: (0..bands)
                .map(|_| HashMap::with_capacity_and_hasher(capacity, Default::default()))
                .collect(),
            entries: Vec::with_capacity(capacity * bands),
        }
    }

    fn insert(&mut self, band: usize, key: u64, text: u32) {
        let entry = self.entries.len() as u32;
        let prev = self.heads[band].insert(key, entry).unwrap_or(NONE);
        self.entries.push((text, prev));
    }

    fn bucket(&self, band: usize, key: u64, out: &mut Vec<u32>) {
        let mut e = self.heads[band].get(&key).copied().unwrap_or(NONE);
        while e != NONE {
            let (text, prev) = self.entries[e as usize];
            out.push(text);
            e = prev;
        }
    }
}

/// A text found to be a near-duplicate of an earlier kept one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NearMatch {
    /// Index of the earlier, kept text.
    pub of: usize,
    /// Estimated Jaccard similarity between the two.
    pub similarity: f64,
}

/// For each text (in order), the kept text it near-duplicates, or `None` if it is kept.
pub fn find_near_duplicates(
    sigs: &Signatures,
    bands: usize,
    threshold: f64,
) -> Vec<Option<NearMatch>> {
    let n = sigs.len();
    if sigs.k == 0 || n > NONE as usize {
        return vec![None; n];
    }
    let bands = bands.clamp(1, sigs.k);
    let rows = sigs.k / bands; // config validation makes this exact
                               // Band keys in parallel: n * bands u64.
    let keys: Vec<u64> = (0..n)
        .into_par_iter()
        .flat_map_iter(|i| {
            let sig = sigs.get(i);
            (0..bands).map(move |band| match sig {
                Some(sig) => {
                    let mut h = mix64(band as u64 ^ 0xA076_1D64_78BD_642F);
                    for &v in &sig[band * rows..(band + 1) * rows] {
                        h = mix64(h ^ v as u64);
                    }
                    h
                }
                None => 0,
            })
        })
        .collect();
    let mut index = BandIndex::new(bands, n);
    let mut out = vec![None; n];
    let mut candidates: Vec<u32> = Vec::new();
    for i in 0..n {
        let Some(sig) = sigs.get(i) else { continue };
        let my_keys = &keys[i * bands..(i + 1) * bands];
        candidates.clear();
        for (band, &key) in my_keys.iter().enumerate() {
            index.bucket(band, key, &mut candidates);
        }
        candidates.sort_unstable();
        candidates.dedup();
        let found = candidates.iter().find_map(|&j| {
            let other = sigs.get(j as usize)?;
            let similarity = estimated_jaccard(sig, other);
            (similarity >= threshold).then_some(NearMatch {
                of: j as usize,
                similarity,
            })
        });
        match found {
            Some(m) => out[i] = Some(m),
            None => {
                for (band, &key) in my_keys.iter().enumerate() {
                    index.insert(band, key, i as u32);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NearDedupConfig {
        NearDedupConfig::default()
    }

    #[test]
    fn identical_texts_have_identical_signatures() {
        let h = MinHasher::new(&config());
        let s = h.signatures(&[
            "the cat sat on the mat today",
            "the cat sat on the mat today",
        ]);
        assert_eq!(s.get(0), s.get(1));
        assert!(s.get(0).is_some());
    }

    #[test]
    fn estimate_tracks_true_jaccard() {
        // 100 distinct words; B shares the first 60 with A and adds 40 others: with 1-word
        // shingles J = 60 / 140.
        let a: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
        let b: Vec<String> = (0..60).chain(100..140).map(|i| format!("w{i}")).collect();
        let cfg = NearDedupConfig {
            ngram: 1,
            num_perm: 512,
            bands: 64,
            ..config()
        };
        let h = MinHasher::new(&cfg);
        let s = h.signatures(&[a.join(" "), b.join(" ")]);
        let est = estimated_jaccard(s.get(0).unwrap(), s.get(1).unwrap());
        let truth = 60.0 / 140.0;
        assert!((est - truth).abs() < 0.07, "estimate {est} vs true {truth}");
    }

    #[test]
    fn seed_changes_signatures_deterministically() {
        let h1 = MinHasher::new(&config());
        let h2 = MinHasher::new(&NearDedupConfig {
            seed: 7,
            ..config()
        });
        let t = ["one two three four five six seven"];
        assert_eq!(
            h1.signatures(&t).get(0),
            MinHasher::new(&config()).signatures(&t).get(0)
        );
        assert_ne!(h1.signatures(&t).get(0), h2.signatures(&t).get(0));
    }

    /// The run-time-dispatched kernel must give the portable kernel's result exactly.
    #[test]
    fn dispatched_kernel_matches_portable() {
        let h = MinHasher::new(&config());
        let shingles: Vec<u64> = (0..300u64).map(mix64).collect();
        let mut fast = vec![u32::MAX; h.num_perm()];
        let mut slow = fast.clone();
        update_signature(&mut fast, &h.a, &h.b, &shingles);
        update_signature_portable(&mut slow, &h.a, &h.b, &shingles);
        assert_eq!(fast, slow);
        assert!(slow.iter().all(|&v| v < u32::MAX));
    }

    #[test]
    fn bands_must_divide_num_perm() {
        let cfg = NearDedupConfig {
            num_perm: 100,
            bands: 32,
            ..config()
        };
        assert!(cfg.validate().is_err());
    }
}
