//! Tokenized rows cached on disk, keyed by a hash of everything that determines them.
//!
//! **Key** ([`CacheKey`]): XXH3-128 over, in order and each tagged: the row-format version and
//! this crate's version; every example (its JSON form); the tokenizer (its `tokenizer.json`
//! serialisation, so ids added in code count too) and the BOS/EOS/pad ids; the template text
//! and the special tokens it sees; and the [`TokenizeConfig`]. Changing any of them changes the
//! key; nothing else (paths, times) enters it. An example enters as the JSON form
//! [`Example`] serialises to, which states its kind (`{"text": ...}` for raw text), so raw
//! text read from an old curated file (`{"messages": [{"role": "text", ...}]}`) has the same
//! key as from a new one, and the cache entries made from either stay valid. XXH3-128 is not cryptographic; it guards
//! against accidental staleness, not against an adversary.
//!
//! **Layout**: `<cache dir>/<key hex>/manifest.json` plus `shard-00000.safetensors`, ... Each
//! shard is a safetensors file holding the concatenated rows as flat `I32` tensors
//! `input_ids`, `labels`, `position_ids`, `segment_ids` and `I64` `row_offsets`
//! (`rows + 1` entries; row `r` is `offsets[r]..offsets[r+1]`), readable from Python with
//! `safetensors.numpy.load_file`. The manifest holds the format version, the key, the config,
//! the report and the shard list.
//!
//! **Atomicity**: an entry is written into a fresh temporary directory beside the others
//! (hone-io's [`StagedDir`]), flushed, and renamed into place, so a reader sees a complete entry
//! or none. When two processes build the same key, the first rename wins and the second discards
//! its copy ([`StagedDir::commit_if_absent`]).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::chat::ChatTemplate;
use crate::config::TokenizeConfig;
use crate::dataset::TokenizedDataset;
use crate::encode::TokenizerSpec;
use crate::error::TokenizeError;
use crate::pack::TokenizeReport;
use crate::row::Row;
use hone_data::Example;
use hone_io::StagedDir;

/// Bumped whenever the rows produced for the same inputs change (masking, packing, format).
pub const ROW_FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "hone-tokenize-rows";
const MANIFEST: &str = "manifest.json";
/// Rows per shard file unless set otherwise.
pub const DEFAULT_ROWS_PER_SHARD: usize = 4096;

/// The hash naming one cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey(pub u128);

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// An `io::Write` that feeds a hasher (so JSON is hashed without building strings).
struct HashWriter(Xxh3);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl HashWriter {
    /// A tagged, length-prefixed field.
    fn field(&mut self, tag: &str, bytes: &[u8]) {
        self.0.update(tag.as_bytes());
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn json<T: Serialize>(&mut self, tag: &str, value: &T) -> Result<(), TokenizeError> {
        let bytes = serde_json::to_vec(value).map_err(|e| TokenizeError::Fingerprint {
            message: format!("cannot serialise {tag}: {e}"),
        })?;
        self.field(tag, &bytes);
        Ok(())
    }
}

impl CacheKey {
    /// The key of the rows that `examples` give with this tokenizer, template and config.
    pub fn compute(
        examples: &[Example],
        spec: &TokenizerSpec<'_>,
        template: Option<&ChatTemplate>,
        config: &TokenizeConfig,
    ) -> Result<CacheKey, TokenizeError> {
        let mut h = HashWriter(Xxh3::new());
        h.field("format", FORMAT_NAME.as_bytes());
        h.field("version", &ROW_FORMAT_VERSION.to_le_bytes());
        h.field("crate", env!("CARGO_PKG_VERSION").as_bytes());

        h.field("examples", &(examples.len() as u64).to_le_bytes());
        for example in examples {
            serde_json::to_writer(&mut h, example).map_err(|e| TokenizeError::Fingerprint {
                message: format!("cannot serialise an example: {e}"),
            })?;
            h.0.update(b"\n");
        }

        let tokenizer =
            spec.tokenizer
                .to_string(false)
                .map_err(|e| TokenizeError::Fingerprint {
                    message: e.to_string(),
                })?;
        h.field("tokenizer", tokenizer.as_bytes());
        h.json("special_ids", &(spec.bos_id, spec.eos_id, spec.pad_id))?;

        match template {
            Some(t) => {
                h.field("template", t.source().as_bytes());
                h.json("template_tokens", t.special_tokens())?;
            }
            None => h.field("template", b"\0none"),
        }
        h.json("config", config)?;
        Ok(CacheKey(h.0.digest128()))
    }
}

/// Whether [`ShardCache::get_or_build`] reused an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Loaded from this entry directory.
    Hit(PathBuf),
    /// Built and written to this entry directory.
    Built(PathBuf),
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardInfo {
    file: String,
    rows: usize,
    tokens: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    key: String,
    created_by: String,
    config: TokenizeConfig,
    report: TokenizeReport,
    shards: Vec<ShardInfo>,
}

/// A directory of cached tokenized data sets, one subdirectory per [`CacheKey`].
#[derive(Debug, Clone)]
pub struct ShardCache {
    dir: PathBuf,
    rows_per_shard: usize,
}

impl ShardCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            rows_per_shard: DEFAULT_ROWS_PER_SHARD,
        }
    }

    /// Sets how many rows go into one shard file (at least 1).
    pub fn with_rows_per_shard(mut self, rows: usize) -> Self {
        self.rows_per_shard = rows.max(1);
        self
    }

    /// The directory of one entry.
    pub fn entry_dir(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(key.to_string())
    }

    /// The cached data set of `key`, or `None` when there is no entry.
    pub fn load(&self, key: &CacheKey) -> Result<Option<TokenizedDataset>, TokenizeError> {
        let dir = self.entry_dir(key);
        let manifest_path = dir.join(MANIFEST);
        if !manifest_path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&manifest_path)
            .map_err(|e| TokenizeError::io("read", &manifest_path, e))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            TokenizeError::corrupt(&manifest_path, format!("invalid manifest: {e}"))
        })?;
        if manifest.format != FORMAT_NAME || manifest.version != ROW_FORMAT_VERSION {
            return Err(TokenizeError::corrupt(
                &manifest_path,
                format!(
                    "format {} v{}, expected {FORMAT_NAME} v{ROW_FORMAT_VERSION}",
                    manifest.format, manifest.version
                ),
            ));
        }
        if manifest.key != key.to_string() {
            return Err(TokenizeError::corrupt(
                &manifest_path,
                format!("holds key {}, expected {key}", manifest.key),
            ));
        }
        let mut rows = Vec::with_capacity(manifest.report.rows);
        for shard in &manifest.shards {
            let path = dir.join(&shard.file);
            let shard_rows = read_shard(&path)?;
            if shard_rows.len() != shard.rows {
                return Err(TokenizeError::corrupt(
                    &path,
                    format!(
                        "holds {} rows, the manifest says {}",
                        shard_rows.len(),
                        shard.rows
                    ),
                ));
            }
            rows.extend(shard_rows);
        }
        if rows.len() != manifest.report.rows {
            return Err(TokenizeError::corrupt(
                &manifest_path,
                format!(
                    "{} rows in shards, the report says {}",
                    rows.len(),
                    manifest.report.rows
                ),
            ));
        }
        Ok(Some(TokenizedDataset {
            rows,
            report: manifest.report,
        }))
    }

    /// Writes `data` as the entry of `key` (atomically, see the module docs); returns the
    /// entry directory. An entry that already exists is left as it is.
    pub fn store(
        &self,
        key: &CacheKey,
        config: &TokenizeConfig,
        data: &TokenizedDataset,
    ) -> Result<PathBuf, TokenizeError> {
        let target = self.entry_dir(key);
        fs::create_dir_all(&self.dir).map_err(|e| TokenizeError::io("create", &self.dir, e))?;
        if target.is_dir() && !target.join(MANIFEST).is_file() {
            // Left incomplete by hand or by a tool other than `store`: it can only be in the way.
            fs::remove_dir_all(&target).map_err(|e| TokenizeError::io("remove", &target, e))?;
        }
        let staged = StagedDir::new(&target).map_err(io_error("create"))?;
        self.write_entry(staged.path(), key, config, data)?;
        // Another writer that finished the same entry first keeps theirs.
        staged.commit_if_absent().map_err(io_error("rename"))?;
        Ok(target)
    }

    fn write_entry(
        &self,
        temp: &Path,
        key: &CacheKey,
        config: &TokenizeConfig,
        data: &TokenizedDataset,
    ) -> Result<(), TokenizeError> {
        let mut shards = Vec::new();
        for (i, chunk) in data.rows.chunks(self.rows_per_shard).enumerate() {
            let file = format!("shard-{i:05}.safetensors");
            write_shard(&temp.join(&file), chunk)?;
            shards.push(ShardInfo {
                file,
                rows: chunk.len(),
                tokens: chunk.iter().map(Row::len).sum(),
            });
        }
        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            version: ROW_FORMAT_VERSION,
            key: key.to_string(),
            created_by: format!("hone-tokenize {}", env!("CARGO_PKG_VERSION")),
            config: config.clone(),
            report: data.report.clone(),
            shards,
        };
        let path = temp.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| TokenizeError::io("write", &path, std::io::Error::other(e.to_string())))?;
        write_synced(&path, text.as_bytes())
    }

    /// The entry of `key` if it loads, else `build()` stored under `key`. An entry that fails
    /// to load (damaged by hand, written by another version) is logged, removed and rebuilt.
    pub fn get_or_build(
        &self,
        key: &CacheKey,
        config: &TokenizeConfig,
        build: impl FnOnce() -> Result<TokenizedDataset, TokenizeError>,
    ) -> Result<(TokenizedDataset, CacheStatus), TokenizeError> {
        let dir = self.entry_dir(key);
        match self.load(key) {
            Ok(Some(data)) => return Ok((data, CacheStatus::Hit(dir))),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("ignoring unreadable tokenized cache entry: {e}");
                fs::remove_dir_all(&dir).map_err(|e| TokenizeError::io("remove", &dir, e))?;
            }
        }
        let data = build()?;
        let dir = self.store(key, config, &data)?;
        Ok((data, CacheStatus::Built(dir)))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TokenizeError> {
    let io = |e| TokenizeError::io("write", path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    w.write_all(bytes).map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

fn i32_bytes(values: impl Iterator<Item = i32>) -> Vec<u8> {
    values.flat_map(i32::to_le_bytes).collect()
}

fn write_shard(path: &Path, rows: &[Row]) -> Result<(), TokenizeError> {
    let as_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let flat = |f: &dyn Fn(&Row) -> Vec<u8>| -> Vec<u8> { rows.iter().flat_map(f).collect() };
    let input_ids = flat(&|r| i32_bytes(r.input_ids.iter().map(|&v| as_i32(v))));
    let labels = flat(&|r| i32_bytes(r.labels.iter().copied()));
    let positions = flat(&|r| i32_bytes(r.position_ids.iter().map(|&v| as_i32(v))));
    let segments = flat(&|r| i32_bytes(r.segment_ids.iter().map(|&v| as_i32(v))));
    let mut offsets = Vec::with_capacity(8 * (rows.len() + 1));
    let mut at = 0i64;
    offsets.extend(at.to_le_bytes());
    for row in rows {
        at += row.len() as i64;
        offsets.extend(at.to_le_bytes());
    }
    let total = at as usize;
    let bad = |e: safetensors::SafeTensorError| TokenizeError::corrupt(path, e.to_string());
    let tensors = vec![
        (
            "input_ids",
            TensorView::new(Dtype::I32, vec![total], &input_ids).map_err(bad)?,
        ),
        (
            "labels",
            TensorView::new(Dtype::I32, vec![total], &labels).map_err(bad)?,
        ),
        (
            "position_ids",
            TensorView::new(Dtype::I32, vec![total], &positions).map_err(bad)?,
        ),
        (
            "segment_ids",
            TensorView::new(Dtype::I32, vec![total], &segments).map_err(bad)?,
        ),
        (
            "row_offsets",
            TensorView::new(Dtype::I64, vec![rows.len() + 1], &offsets).map_err(bad)?,
        ),
    ];
    let metadata = [("format".to_string(), FORMAT_NAME.to_string())].into();
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(bad)?;
    write_synced(path, &bytes)
}

fn read_i32(st: &SafeTensors<'_>, name: &str, path: &Path) -> Result<Vec<i32>, TokenizeError> {
    let view = st
        .tensor(name)
        .map_err(|e| TokenizeError::corrupt(path, format!("tensor `{name}`: {e}")))?;
    if view.dtype() != Dtype::I32 {
        return Err(TokenizeError::corrupt(
            path,
            format!("tensor `{name}`: expected I32, found {:?}", view.dtype()),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_shard(path: &Path) -> Result<Vec<Row>, TokenizeError> {
    let bytes = fs::read(path).map_err(|e| TokenizeError::io("read", path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| TokenizeError::corrupt(path, format!("not a safetensors file: {e}")))?;
    let unsigned = |v: Vec<i32>, name: &str| -> Result<Vec<u32>, TokenizeError> {
        v.into_iter()
            .map(|x| u32::try_from(x).ok())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| TokenizeError::corrupt(path, format!("negative value in `{name}`")))
    };
    let input_ids = unsigned(read_i32(&st, "input_ids", path)?, "input_ids")?;
    let labels = read_i32(&st, "labels", path)?;
    let positions = unsigned(read_i32(&st, "position_ids", path)?, "position_ids")?;
    let segments = unsigned(read_i32(&st, "segment_ids", path)?, "segment_ids")?;
    let offsets_view = st
        .tensor("row_offsets")
        .map_err(|e| TokenizeError::corrupt(path, format!("tensor `row_offsets`: {e}")))?;
    if offsets_view.dtype() != Dtype::I64 {
        return Err(TokenizeError::corrupt(
            path,
            "tensor `row_offsets` is not I64",
        ));
    }
    let offsets: Vec<usize> = offsets_view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .map(|x| usize::try_from(x).unwrap_or(usize::MAX))
        .collect();
    let n = input_ids.len();
    if labels.len() != n || positions.len() != n || segments.len() != n {
        return Err(TokenizeError::corrupt(
            path,
            "token tensors differ in length",
        ));
    }
    let well_formed = offsets.first() == Some(&0)
        && offsets.last() == Some(&n)
        && offsets.windows(2).all(|w| w[0] <= w[1]);
    if !well_formed {
        return Err(TokenizeError::corrupt(
            path,
            "row_offsets do not partition the tokens",
        ));
    }
    Ok(offsets
        .windows(2)
        .map(|w| Row {
            input_ids: input_ids[w[0]..w[1]].to_vec(),
            labels: labels[w[0]..w[1]].to_vec(),
            position_ids: positions[w[0]..w[1]].to_vec(),
            segment_ids: segments[w[0]..w[1]].to_vec(),
        })
        .collect())
}

/// Maps hone-io's error (which names its path) to this crate's, naming the `action`.
fn io_error(action: &'static str) -> impl Fn(hone_io::Error) -> TokenizeError {
    move |e| TokenizeError::io(action, e.path, e.source)
}
