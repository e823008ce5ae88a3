//! The approximate vector index: an HNSW graph (Malkov & Yashunin) over the dense rows, built and
//! searched by the `hnsw_rs` crate, persisted beside the vectors of its dense directory.
//!
//! ```text
//! DIR/dense-NNNNNN/hnsw.hnsw.graph   the graph (hnsw_rs's dump format)
//! DIR/dense-NNNNNN/hnsw.hnsw.data    the points it holds (hnsw_rs's dump format)
//! DIR/dense-NNNNNN/hnsw.json         parameters, the row of each graph point, both files'
//!                                    sizes and xxh3 hashes
//! ```
//!
//! Graph points are numbered in insertion order and never renumbered: `slots[point]` is the
//! row a point stands for, or `None` once its row was removed. A change inserts the new rows
//! into a copy of the graph read back from the current generation (no rebuild) and marks the
//! removed ones; searches skip marked points. When more than [`MAX_STALE_SHARE`] of the points
//! are marked, the graph is rebuilt from the live rows.
//!
//! hnsw_rs ends the process on some malformed dumps instead of returning an error, so a dump
//! is read only after both files' sizes and hashes match `hnsw.json`: a damaged graph is
//! reported as a corrupt index, naming the file.

use std::path::Path;

use hnsw_rs::prelude::{AnnT, Distance, Hnsw, HnswIo};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{RagError, Result};

/// The metadata file of a graph in a dense directory.
pub const GRAPH_META_FILE: &str = "hnsw.json";
/// hnsw_rs names its two files `<basename>.hnsw.graph` and `<basename>.hnsw.data`.
const BASENAME: &str = "hnsw";
const FORMAT: &str = "hone-hnsw";
/// The share of marked (removed) points above which a change rebuilds the graph.
pub const MAX_STALE_SHARE: f64 = 0.2;
/// Layers of the graph (hnsw_rs's limit is 16; 2^-16 of the points reach the top).
const MAX_LAYERS: usize = 16;

/// How the graph is built and searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Neighbours kept per point and layer (`M`; at most 256).
    pub m: usize,
    /// Candidate list length while inserting (`efConstruction`).
    pub ef_construction: usize,
    /// Candidate list length while searching (`ef`, raised to `k` when smaller).
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
        }
    }
}

impl HnswParams {
    pub fn validate(&self) -> Result<()> {
        if !(2..=256).contains(&self.m) {
            return Err(RagError::config("hnsw.m", "expected 2 to 256"));
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return Err(RagError::config(
                "hnsw.ef_construction/ef_search",
                "expected at least 1",
            ));
        }
        Ok(())
    }
}

/// `1 - cos` of two unit vectors, never below zero (rounding can make `u·u` exceed 1, and
/// anndists' `DistDot` asserts on that).
#[derive(Clone, Copy, Debug, Default)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - crate::dense::dot(a, b)).max(0.0)
    }
}

/// Size and hash of one dumped file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileSum {
    file: String,
    bytes: u64,
    xxh3: String,
}

impl FileSum {
    fn of(dir: &Path, file: &str) -> Result<FileSum> {
        let path = dir.join(file);
        let raw = std::fs::read(&path).map_err(|e| RagError::io(&path, e))?;
        Ok(FileSum {
            file: file.into(),
            bytes: raw.len() as u64,
            xxh3: format!("{:016x}", xxh3_64(&raw)),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct GraphMeta {
    format: String,
    params: HnswParams,
    dim: usize,
    /// The row of each graph point (`None`: removed).
    slots: Vec<Option<u32>>,
    graph: FileSum,
    data: FileSum,
}

/// An HNSW graph over the rows of a dense index.
pub struct Graph {
    hnsw: Hnsw<'static, f32, UnitCosine>,
    params: HnswParams,
    dim: usize,
    /// The row of each point, by point number (`None`: the row was removed).
    slots: Vec<Option<u32>>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("params", &self.params)
            .field("points", &self.slots.len())
            .field("live", &self.live())
            .finish()
    }
}

impl Graph {
    /// A graph of `rows` (`[n, dim]`, unit rows), row `i` as point `i`.
    pub fn build(params: HnswParams, dim: usize, vectors: &[f32]) -> Result<Graph> {
        params.validate()?;
        let n = vectors.len() / dim.max(1);
        let mut graph = Graph {
            hnsw: new_hnsw(&params, n),
            params,
            dim,
            slots: Vec::with_capacity(n),
        };
        graph.insert(vectors, 0)?;
        Ok(graph)
    }

    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// Points not removed.
    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Points, removed ones included.
    pub fn points(&self) -> usize {
        self.slots.len()
    }

    /// Inserts `vectors` (`[n, dim]`, unit rows) as rows `first_row..first_row + n`.
    fn insert(&mut self, vectors: &[f32], first_row: usize) -> Result<()> {
        let first_point = self.slots.len();
        let batch: Vec<(&[f32], usize)> = vectors
            .chunks_exact(self.dim.max(1))
            .enumerate()
            .map(|(i, v)| (v, first_point + i))
            .collect();
        for i in 0..batch.len() {
            let row = u32::try_from(first_row + i)
                .map_err(|_| RagError::config("rows", "more than 2^32 rows"))?;
            self.slots.push(Some(row));
        }
        if !batch.is_empty() {
            self.hnsw.parallel_insert_slice(&batch);
        }
        Ok(())
    }

    /// The graph after a change of its index: `new_row[old]` is where each old row went
    /// (`None`: removed), then `appended` (`[n, dim]`, unit rows) became rows
    /// `first_new_row..`. Inserts into this graph when few points are stale, else returns
    /// `None` (the caller rebuilds).
    pub fn changed(
        mut self,
        new_row: &[Option<usize>],
        appended: &[f32],
        first_new_row: usize,
    ) -> Result<Option<Graph>> {
        for slot in &mut self.slots {
            *slot = slot.and_then(|row| {
                new_row
                    .get(row as usize)
                    .copied()
                    .flatten()
                    .map(|r| r as u32)
            });
        }
        let stale = self.slots.iter().filter(|s| s.is_none()).count();
        let total = self.slots.len() + appended.len() / self.dim.max(1);
        if total > 0 && stale as f64 > MAX_STALE_SHARE * total as f64 {
            return Ok(None);
        }
        self.insert(appended, first_new_row)?;
        Ok(Some(self))
    }

    /// The rows of the (about) `k` points nearest to the unit vector `query`, nearest first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<usize> {
        let allowed = |point: &usize| self.slots.get(*point).is_some_and(|s| s.is_some());
        let ef = self.params.ef_search.max(k);
        self.hnsw
            .search_filter(query, k, ef, Some(&allowed))
            .into_iter()
            .filter_map(|n| self.slots.get(n.d_id).copied().flatten())
            .map(|row| row as usize)
            .collect()
    }

    /// Writes the graph into the existing directory `dir`.
    pub fn write_into(&self, dir: &Path) -> Result<()> {
        let written = self
            .hnsw
            .file_dump(dir, BASENAME)
            .map_err(|e| RagError::io(dir, std::io::Error::other(e.to_string())))?;
        if written != BASENAME {
            return Err(RagError::io(
                dir,
                std::io::Error::other(format!(
                    "hnsw_rs wrote the graph as `{written}`, expected `{BASENAME}` (files left over?)"
                )),
            ));
        }
        let meta = GraphMeta {
            format: FORMAT.into(),
            params: self.params,
            dim: self.dim,
            slots: self.slots.clone(),
            graph: FileSum::of(dir, &graph_file())?,
            data: FileSum::of(dir, &data_file())?,
        };
        let json = serde_json::to_vec(&meta).expect("graph metadata serialises");
        hone_io::write_file(&dir.join(GRAPH_META_FILE), &json)?;
        Ok(())
    }

    /// Reads the graph of the dense directory `dir`, for rows of `dim` values of which there
    /// are `rows`.
    pub fn open(dir: &Path, dim: usize, rows: usize) -> Result<Graph> {
        let meta_path = dir.join(GRAPH_META_FILE);
        let corrupt = |message: String| RagError::CorruptVectors {
            path: dir.into(),
            message,
        };
        let bytes = std::fs::read(&meta_path).map_err(|e| RagError::io(&meta_path, e))?;
        let meta: GraphMeta = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("{GRAPH_META_FILE}: {e}")))?;
        if meta.format != FORMAT {
            return Err(corrupt(format!(
                "{GRAPH_META_FILE}: expected \"format\": \"{FORMAT}\""
            )));
        }
        if meta.dim != dim {
            return Err(corrupt(format!(
                "{GRAPH_META_FILE}: expected dimension {dim}, found {}",
                meta.dim
            )));
        }
        if let Some(row) = meta.slots.iter().flatten().find(|r| **r as usize >= rows) {
            return Err(corrupt(format!(
                "{GRAPH_META_FILE}: a point stands for row {row}, the index has {rows} rows"
            )));
        }
        meta.params
            .validate()
            .map_err(|e| corrupt(format!("{GRAPH_META_FILE}: {e}")))?;
        for want in [&meta.graph, &meta.data] {
            let found = FileSum::of(dir, &want.file)?;
            if &found != want {
                return Err(corrupt(format!(
                    "{}: {} bytes with xxh3 {}, {GRAPH_META_FILE} recorded {} bytes with xxh3 {} \
                     (damaged or replaced; rebuild the index)",
                    want.file, found.bytes, found.xxh3, want.bytes, want.xxh3
                )));
            }
        }
        // hnsw_rs ties the graph's lifetime to its loader; the loader (paths and options, no
        // point data without mmap) is leaked so that the graph can outlive this call.
        let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, BASENAME)));
        let hnsw: Hnsw<'static, f32, UnitCosine> = io
            .load_hnsw::<f32, UnitCosine>()
            .map_err(|e| corrupt(format!("{}: {e}", graph_file())))?;
        if hnsw.get_nb_point() != meta.slots.len() {
            return Err(corrupt(format!(
                "{}: {} points, {GRAPH_META_FILE} lists {}",
                graph_file(),
                hnsw.get_nb_point(),
                meta.slots.len()
            )));
        }
        Ok(Graph {
            hnsw,
            params: meta.params,
            dim,
            slots: meta.slots,
        })
    }
}

fn new_hnsw(params: &HnswParams, capacity: usize) -> Hnsw<'static, f32, UnitCosine> {
    Hnsw::new(
        params.m,
        capacity.max(1),
        MAX_LAYERS,
        params.ef_construction,
        UnitCosine,
    )
}

fn graph_file() -> String {
    format!("{BASENAME}.hnsw.graph")
}

fn data_file() -> String {
    format!("{BASENAME}.hnsw.data")
}

/// Whether the dense directory `dir` holds a graph.
pub fn has_graph(dir: &Path) -> bool {
    dir.join(GRAPH_META_FILE).is_file()
}
