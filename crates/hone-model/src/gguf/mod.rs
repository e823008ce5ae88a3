//! Reading GGUF files (llama.cpp's model format, versions 2 and 3): the header, the metadata
//! key/value pairs, the tensor directory, and memory-mapped tensor data, with the block formats
//! of [`quant`] turned into f32 on request.
//!
//! Layout (little-endian; ggml's `docs/gguf.md`): magic `GGUF`, `u32` version, `u64` tensor
//! count, `u64` metadata count, the metadata pairs (`string` key, `u32` value type, value), one
//! entry per tensor (`string` name, `u32` dimension count, `u64` dimensions innermost first, `u32`
//! ggml type, `u64` offset into the data section), then padding to `general.alignment` (default
//! 32) and the data section. Strings are a `u64` byte length and UTF-8 bytes.
//!
//! Dimensions are kept as GGUF writes them, innermost first: a PyTorch `[out, in]` weight is
//! `[in, out]` here; [`TensorInfo::shape`] gives the row-major (PyTorch) order.

pub mod hf;
pub mod int8;
mod kquant;
pub mod matmul;
mod matvec;
pub mod model;
mod panel;
pub mod quant;
pub mod quantize;
mod repack;
pub mod tokenizer;
pub mod vocab;
pub mod weight;
pub mod write;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use model::{gguf_tensor_name, model_config, permute_rows, resident_weight_bytes, GgufWeights};
pub use quant::GgmlType;
pub use weight::QuantWeight;

/// A problem with a GGUF file; every variant names the file and, where one is involved, the
/// metadata key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The I/O error is part of the message, not a `source`, so that error chains (the binary
    /// prints them) do not print it twice.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a GGUF file (expected the magic bytes \"GGUF\", found {found:?})")]
    NotGguf { path: PathBuf, found: Vec<u8> },
    #[error("{path}: GGUF version {version} is not supported (expected 2 or 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt GGUF header at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: metadata key {key}: {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: tensor {tensor}: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type that fits a `u64` (negative values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as an `i64` (a `u64` above `i64::MAX` does not fit).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float or integer value as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => write!(f, "[{} values]", a.len()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_i64().unwrap_or(0)),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them, innermost (contiguous) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset into the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row-major (PyTorch) shape: the GGUF dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Bytes of data.
    pub fn byte_len(&self) -> usize {
        self.ggml_type.byte_len(self.len())
    }
}

/// An open GGUF file: metadata, tensor directory and the memory-mapped data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, Value)>,
    by_key: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
    alignment: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Limits that keep a corrupt header from asking for absurd allocations before the bounds
/// checks catch it.
const MAX_DIMS: u32 = 8;
const MAX_ARRAY_DEPTH: usize = 4;

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "{what} needs {n} bytes, {} left in the file",
                    self.bytes.len().saturating_sub(self.pos)
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must also fit in what is left of the file at `min_bytes` per item.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let start = self.pos;
        let n = self.u64(what)?;
        let left = self.bytes.len().saturating_sub(self.pos) as u64;
        if min_bytes > 0 && n > left / min_bytes as u64 {
            self.pos = start;
            return Err(self.corrupt(format!(
                "{what} is {n}, more than the {left} bytes left in the file can hold"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(what, 1)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            self.pos = start;
            self.corrupt(format!("{what} is not valid UTF-8"))
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.corrupt(format!("{key}: bool byte {b} is neither 0 nor 1")));
                }
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!("{key}: arrays nested deeper than {depth}")));
                }
                let item_ty = self.u32(key)?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(self.corrupt(format!("{key}: unknown array item type {other}")))
                    }
                };
                let n = self.count(key, min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.corrupt(format!("{key}: unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and memory-maps `path`, reads the header, metadata and tensor directory, and checks
    /// that every tensor's data lies inside the file at an aligned offset.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |cause| GgufError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; hone never writes to a file it has opened for reading,
        // and a file changed underneath by another process is outside what any mmap reader
        // (llama.cpp included) can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            path,
            bytes: &mmap,
            pos: 0,
        };
        let magic = c.bytes.get(..4).unwrap_or(c.bytes);
        if magic != b"GGUF" {
            return Err(GgufError::NotGguf {
                path: path.to_path_buf(),
                found: magic.to_vec(),
            });
        }
        c.pos = 4;
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        // A tensor entry is at least 8 (name length) + 4 + 4 + 8 bytes; a metadata pair 8 + 4 + 1.
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut by_key = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            if by_key.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Metadata {
                    path: path.to_path_buf(),
                    key,
                    message: "appears twice".into(),
                });
            }
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    message: format!("{n_dims} dimensions (expected 1 to {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let ggml_type = GgmlType::from_id(type_id).map_err(|message| GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                message,
            })?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    message: "appears twice in the tensor directory".into(),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match by_key.get("general.alignment") {
            None => 32,
            Some(&i) => {
                let v = &metadata[i].1;
                match v.as_u64() {
                    Some(a) if a > 0 && a.is_power_of_two() && matches!(v, Value::U32(_)) => a,
                    _ => {
                        return Err(GgufError::Metadata {
                            path: path.to_path_buf(),
                            key: "general.alignment".into(),
                            message: format!(
                                "expected a uint32 power of two, found {} {v}",
                                v.type_name()
                            ),
                        })
                    }
                }
            }
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        for t in &tensors {
            let bad = |message: String| GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                message,
            };
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            let elements = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= usize::MAX as u64 / 4)
                .ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
            let block = t.ggml_type.block_size() as u64;
            if t.dims[0] % block != 0 {
                return Err(bad(format!(
                    "innermost dimension {} is not a multiple of {}'s block of {block}",
                    t.dims[0], t.ggml_type
                )));
            }
            let bytes = t.ggml_type.byte_len(elements as usize) as u64;
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(bad(format!(
                    "data [{}, +{bytes}) runs past the end of the file ({} data bytes): \
                     truncated file?",
                    t.offset,
                    file_len.saturating_sub(data_start)
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            by_key,
            tensors,
            by_name,
            data_start: data_start as usize,
            alignment,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The metadata pairs in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.by_key.get(key).map(|&i| &self.metadata[i].1)
    }

    fn metadata_error(&self, key: &str, message: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message,
        }
    }

    fn required<'s, T>(
        &'s self,
        key: &str,
        expected: &str,
        read: impl Fn(&'s Value) -> Option<T>,
    ) -> Result<T> {
        let v = self
            .get(key)
            .ok_or_else(|| self.metadata_error(key, format!("is missing (expected {expected})")))?;
        read(v).ok_or_else(|| {
            self.metadata_error(
                key,
                format!("expected {expected}, found {} {v}", v.type_name()),
            )
        })
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.required(key, "a string", Value::as_str)
    }

    /// A required non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.required(key, "a non-negative integer", Value::as_u64)
    }

    /// A required number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.required(key, "a number", Value::as_f64)
    }

    /// A required array.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        self.required(key, "an array", Value::as_array)
    }

    /// The tensor directory in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's directory entry.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            message: "is missing from the file".into(),
        })
    }

    /// A tensor's raw bytes in its ggml type (bounds were checked at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name)?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.mmap[start..start + t.byte_len()])
    }

    /// Gives the mapped file's pages that lie wholly inside tensor `name` back to the system (a
    /// loader calls it once it holds its own copy): the pages a read touched would otherwise
    /// stay resident beside the copies until the file is closed, which put the peak resident
    /// memory of loading at twice the weights (SmolLM2-135M Q4_1: 358 MB for a 98 MB file). A
    /// later read of the tensor maps its pages again from the file. Without `madvise` (not
    /// Unix) or where it fails, nothing happens.
    pub fn release_tensor_pages(&self, name: &str) {
        #[cfg(unix)]
        if let Some(t) = self.tensor_info(name) {
            const PAGE: usize = 4096;
            let start = self.data_start + t.offset as usize;
            let (first, end) = (
                start.next_multiple_of(PAGE),
                (start + t.byte_len()) / PAGE * PAGE,
            );
            if end > first {
                // SAFETY: the map is read-only and shared, so dropping pages loses nothing: the
                // next access reads them from the file again. Neighbouring tensors' bytes on the
                // boundary pages are left alone (only whole pages inside this tensor). A page
                // size above 4 KiB makes the unaligned call fail, which is ignored.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        end - first,
                    )
                };
            }
        }
    }

    /// A tensor converted to f32, with its row-major shape. The block formats are decoded as
    /// ggml (and gguf-py's `gguf.quants.dequantize`) do, bit for bit.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.info(name)?;
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.len()];
        quant::dequantize(t.ggml_type, bytes, &mut out);
        Ok((out, t.shape()))
    }
}
