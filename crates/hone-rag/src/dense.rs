//! The dense vector index: one L2-normalised embedding per chunk, searched exactly (dot product =
//! cosine similarity over every row).
//!
//! ```text
//! DIR/dense-NNNNNN/vectors.f32   rows x dim little-endian f32, row i = rows.json's chunk i
//! DIR/dense-NNNNNN/rows.json     {"dim": D, "rows": [{"id": chunk id, "doc_id": ...}, ...]}
//! ```
//!
//! A change never edits a directory that readers may have open: `add`/`remove` write the next
//! generation's directory completely (staged, then renamed), and the manifest names the current
//! one; the previous generation is kept for readers that read the old manifest, older ones are
//! removed. Exact search is one pass over `rows x dim` floats (about 8 ms per query for 100k
//! chunks of 384 dimensions on one core). Above a size threshold ([`VectorPolicy`]) the
//! directory also holds an HNSW graph ([`crate::hnsw`]) that searches visit instead; its
//! candidates are scored exactly, so scores never depend on the search method.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{RagError, Result};
use crate::hnsw::{self, Graph, HnswParams};

/// The vectors file of a dense directory.
pub const VECTORS_FILE: &str = "vectors.f32";
/// The row list of a dense directory.
pub const ROWS_FILE: &str = "rows.json";

/// The name of the dense directory of generation `generation`.
pub fn dense_dir_name(generation: u64) -> String {
    format!("dense-{generation:06}")
}

/// Which chunk a row holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub doc_id: String,
}

#[derive(Serialize, Deserialize)]
struct RowsFile {
    dim: usize,
    rows: Vec<Row>,
}

/// Which vector search an index uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VectorMode {
    /// Exact below `hnsw_threshold` rows, HNSW from there on.
    #[default]
    Auto,
    /// Always exact.
    Exact,
    /// Always HNSW.
    Hnsw,
}

/// When a dense index keeps an HNSW graph, and how it is built and searched. Recorded in the
/// manifest, so that `add` and `remove` follow the choice the build made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VectorPolicy {
    pub mode: VectorMode,
    /// Rows from which `auto` builds a graph.
    pub hnsw_threshold: usize,
    pub hnsw: HnswParams,
}

/// Rows from which `auto` builds a graph: exact search over 20k rows of 384 values takes
/// about 1.5 ms per query on one core, below what the graph saves.
pub const DEFAULT_HNSW_THRESHOLD: usize = 20_000;

impl Default for VectorPolicy {
    fn default() -> Self {
        VectorPolicy {
            mode: VectorMode::Auto,
            hnsw_threshold: DEFAULT_HNSW_THRESHOLD,
            hnsw: HnswParams::default(),
        }
    }
}

impl VectorPolicy {
    /// Whether an index of `rows` rows keeps a graph.
    pub fn wants_graph(&self, rows: usize) -> bool {
        match self.mode {
            VectorMode::Auto => rows >= self.hnsw_threshold,
            VectorMode::Exact => false,
            VectorMode::Hnsw => true,
        }
    }
}

/// Vectors of chunks, in memory.
#[derive(Clone, Debug)]
pub struct DenseIndex {
    dim: usize,
    rows: Vec<Row>,
    /// `[rows, dim]`, row-major, each row of unit length (or zero).
    vectors: Vec<f32>,
    policy: VectorPolicy,
    /// The HNSW graph over the rows, when the policy wants one.
    graph: Option<Arc<Graph>>,
    /// The directory this index was read from or written to: a change reads the graph back
    /// from there to insert into it.
    source: Option<PathBuf>,
}

impl PartialEq for DenseIndex {
    /// The same rows and vectors, and a graph in both or neither.
    fn eq(&self, other: &Self) -> bool {
        self.dim == other.dim
            && self.rows == other.rows
            && self.vectors == other.vectors
            && self.graph.is_some() == other.graph.is_some()
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// `v / max(|v|, 1e-12)`: torch's `F.normalize`, which sentence-transformers' Normalize module
/// applies (a zero vector stays zero).
pub fn normalize_clamped(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

impl DenseIndex {
    pub fn empty(dim: usize) -> Self {
        DenseIndex {
            dim,
            rows: Vec::new(),
            vectors: Vec::new(),
            policy: VectorPolicy::default(),
            graph: None,
            source: None,
        }
    }

    /// The policy the next change follows.
    pub fn with_policy(mut self, policy: VectorPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> &VectorPolicy {
        &self.policy
    }

    /// The HNSW graph, when this index has one.
    pub fn graph(&self) -> Option<&Graph> {
        self.graph.as_deref()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Reads the dense directory `dir`, expecting vectors of `dim` dimensions.
    pub fn open(dir: &Path, dim: usize) -> Result<Self> {
        let corrupt = |message: String| RagError::CorruptVectors {
            path: dir.into(),
            message,
        };
        let rows_path = dir.join(ROWS_FILE);
        let bytes = std::fs::read(&rows_path).map_err(|e| RagError::io(&rows_path, e))?;
        let file: RowsFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("{ROWS_FILE}: {e}")))?;
        if file.dim != dim {
            return Err(corrupt(format!(
                "{ROWS_FILE}: expected dimension {dim} (the manifest's), found {}",
                file.dim
            )));
        }
        let vectors_path = dir.join(VECTORS_FILE);
        let raw = std::fs::read(&vectors_path).map_err(|e| RagError::io(&vectors_path, e))?;
        let expected = file.rows.len() * dim * 4;
        if raw.len() != expected {
            return Err(corrupt(format!(
                "{VECTORS_FILE}: expected {expected} bytes ({} rows x {dim} f32), found {}",
                file.rows.len(),
                raw.len()
            )));
        }
        let vectors = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let graph = if hnsw::has_graph(dir) {
            Some(Arc::new(Graph::open(dir, dim, file.rows.len())?))
        } else {
            None
        };
        Ok(DenseIndex {
            dim,
            rows: file.rows,
            vectors,
            policy: VectorPolicy::default(),
            graph,
            source: Some(dir.to_path_buf()),
        })
    }

    /// Writes this index as the directory `dir`, all or nothing; the next change reads the
    /// graph back from there.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        let staged = hone_io::StagedDir::new(dir)?;
        self.write_into(staged.path())?;
        staged.commit()?;
        self.source = Some(dir.to_path_buf());
        Ok(())
    }

    /// Writes the files into the existing directory `dir` (a staged build's subdirectory).
    pub(crate) fn write_into(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| RagError::io(dir, e))?;
        let mut raw = Vec::with_capacity(self.vectors.len() * 4);
        for x in &self.vectors {
            raw.extend_from_slice(&x.to_le_bytes());
        }
        hone_io::write_file(&dir.join(VECTORS_FILE), &raw)?;
        let rows = RowsFile {
            dim: self.dim,
            rows: self.rows.clone(),
        };
        let json = serde_json::to_vec(&rows).expect("rows serialise");
        hone_io::write_file(&dir.join(ROWS_FILE), &json)?;
        if let Some(graph) = &self.graph {
            graph.write_into(dir)?;
        }
        Ok(())
    }

    /// A copy without the rows of documents `remove`, then with `rows` (one vector each, of
    /// `dim` values, normalised here) appended.
    pub fn changed(&self, remove: &[String], rows: Vec<Row>, vectors: &[f32]) -> Result<Self> {
        if vectors.len() != rows.len() * self.dim {
            return Err(RagError::config(
                "vectors",
                format!(
                    "expected {} values ({} rows x {}), found {}",
                    rows.len() * self.dim,
                    rows.len(),
                    self.dim,
                    vectors.len()
                ),
            ));
        }
        let removed: std::collections::HashSet<&str> = remove.iter().map(String::as_str).collect();
        let mut out = DenseIndex::empty(self.dim).with_policy(self.policy);
        let mut new_row = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter().enumerate() {
            if removed.contains(row.doc_id.as_str()) {
                new_row.push(None);
            } else {
                new_row.push(Some(out.rows.len()));
                out.rows.push(row.clone());
                out.vectors.extend_from_slice(self.row(i));
            }
        }
        let first_new_row = out.rows.len();
        for (row, v) in rows.into_iter().zip(vectors.chunks_exact(self.dim)) {
            let start = out.vectors.len();
            out.vectors.extend_from_slice(v);
            normalize(&mut out.vectors[start..]);
            out.rows.push(row);
        }
        // An empty index keeps no graph (hnsw_rs cannot write an empty one); the next change
        // that brings rows builds it again.
        if !out.is_empty() && self.policy.wants_graph(out.len()) {
            let appended = &out.vectors[first_new_row * self.dim..];
            // Insert into a copy of the current graph read back from its directory; rebuild
            // when there is none or too much of it is stale.
            let updated = match (&self.graph, &self.source) {
                (Some(graph), Some(source)) if graph.params() == &self.policy.hnsw => Graph::open(
                    source,
                    self.dim,
                    self.len(),
                )?
                .changed(&new_row, appended, first_new_row)?,
                _ => None,
            };
            let graph = match updated {
                Some(graph) => graph,
                None => Graph::build(self.policy.hnsw, self.dim, &out.vectors)?,
            };
            out.graph = Some(Arc::new(graph));
        }
        Ok(out)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// The `k` rows most similar to `query` (normalised here): `(row index, cosine)`, best
    /// first; ties by row order.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        let q = self.unit_query(query)?;
        match &self.graph {
            Some(graph) => {
                let mut scores: Vec<(usize, f32)> = graph
                    .search(&q, k)
                    .into_iter()
                    .map(|row| (row, dot(self.row(row), &q)))
                    .collect();
                scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                scores.truncate(k);
                Ok(scores)
            }
            None => Ok(self.search_exact_unit(&q, k)),
        }
    }

    /// [`Self::search`] over every row, even when the index has a graph (the reference the
    /// benchmark measures the graph's recall against).
    pub fn search_exact(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        let q = self.unit_query(query)?;
        Ok(self.search_exact_unit(&q, k))
    }

    /// `query` scaled to unit length, checked to have this index's dimension.
    fn unit_query(&self, query: &[f32]) -> Result<Vec<f32>> {
        if query.len() != self.dim {
            return Err(RagError::config(
                "query",
                format!(
                    "expected a vector of {} values, found {}",
                    self.dim,
                    query.len()
                ),
            ));
        }
        let mut q = query.to_vec();
        normalize(&mut q);
        Ok(q)
    }

    fn search_exact_unit(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        let mut scores: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim.max(1))
            .map(|v| dot(v, q))
            .enumerate()
            .collect();
        let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = k.min(scores.len());
        if k == 0 {
            return Vec::new();
        }
        if k < scores.len() {
            scores.select_nth_unstable_by(k - 1, order);
            scores.truncate(k);
        }
        scores.sort_by(order);
        scores
    }
}

/// Dot product in eight independent lanes (vectorises without `-ffast-math`).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Removes `dir/dense-*` directories other than `keep`.
pub(crate) fn remove_stale(dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("dense-") && !keep.contains(&name) {
            let path: PathBuf = entry.path();
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an old dense directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, doc: &str) -> Row {
        Row {
            id: id.into(),
            doc_id: doc.into(),
        }
    }

    #[test]
    fn exact_search_ranks_by_cosine_and_changes_drop_whole_documents() {
        let index = DenseIndex::empty(3)
            .changed(
                &[],
                vec![row("a#0", "a"), row("a#1", "a"), row("b#0", "b")],
                &[1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0],
            )
            .unwrap();
        let hits = index.search(&[3.0, 1.0, 0.0], 3).unwrap();
        let ids: Vec<usize> = hits.iter().map(|h| h.0).collect();
        // cosines: (1,0,0) 3/sqrt(10) = 0.949, (1,1,0) 4/sqrt(20) = 0.894, (0,2,0) 1/sqrt(10).
        assert_eq!(ids, [0, 2, 1]);
        let want = [
            3.0 / 10.0f32.sqrt(),
            4.0 / 20.0f32.sqrt(),
            1.0 / 10.0f32.sqrt(),
        ];
        for (hit, want) in hits.iter().zip(want) {
            assert!((hit.1 - want).abs() < 1e-6, "{} vs {want}", hit.1);
        }
        let without_a = index.changed(&["a".into()], Vec::new(), &[]).unwrap();
        assert_eq!(without_a.rows(), &[row("b#0", "b")]);
        assert!(index.search(&[1.0, 0.0], 1).is_err());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(dense_dir_name(1));
        let mut index = index;
        index.write(&dir).unwrap();
        assert_eq!(DenseIndex::open(&dir, 3).unwrap(), index);
        assert!(matches!(
            DenseIndex::open(&dir, 4),
            Err(RagError::CorruptVectors { .. })
        ));
    }
}
