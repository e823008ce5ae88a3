//! Writing GGUF files (version 3, the layout [`super`] reads): the header, the metadata in the
//! order given, the tensor directory, padding to the alignment, and the tensor data, each tensor
//! starting at a multiple of the alignment. Data is asked for one tensor at a time, so a model is
//! never held in memory whole. The caller chooses where the bytes go (hone-merge writes to a
//! temporary file that is renamed into place once complete).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::{GgmlType, GgufError, Value};

/// The GGUF version written.
pub const VERSION: u32 = 3;
/// The alignment written (GGUF's default; no `general.alignment` key is needed for it).
pub const ALIGNMENT: usize = 32;

/// One tensor to write: its name, row-major (PyTorch) shape and storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of data.
    pub fn byte_len(&self) -> usize {
        self.ty.byte_len(self.elements())
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of strings.
            let item_ty = items.first().map(value_type).unwrap_or(8);
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn padding(len: usize) -> usize {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// Checks what a reader would refuse: duplicate keys or tensor names, arrays mixing item types,
/// rows that are not whole blocks of the tensor's type.
fn check(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
) -> Result<(), GgufError> {
    let mut keys = HashSet::new();
    for (key, value) in metadata {
        let bad = |message: String| GgufError::Metadata {
            path: path.to_path_buf(),
            key: key.clone(),
            message,
        };
        if !keys.insert(key.as_str()) {
            return Err(bad("is given twice".into()));
        }
        if let Value::Array(items) = value {
            if let Some(first) = items.first() {
                if items.iter().any(|i| value_type(i) != value_type(first)) {
                    return Err(bad("an array's items must all have one type".into()));
                }
                if matches!(first, Value::Array(_)) {
                    return Err(bad("arrays of arrays are not written".into()));
                }
            }
        }
    }
    let mut names = HashSet::new();
    for t in tensors {
        let bad = |message: String| GgufError::Tensor {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            message,
        };
        if !names.insert(t.name.as_str()) {
            return Err(bad("is given twice".into()));
        }
        let row = t.shape.last().copied().unwrap_or(1);
        if t.shape.is_empty() || row % t.ty.block_size() != 0 {
            return Err(bad(format!(
                "shape {:?} cannot be stored as {}: rows must be whole blocks of {}",
                t.shape,
                t.ty,
                t.ty.block_size()
            )));
        }
    }
    Ok(())
}

/// Writes a GGUF file to `out` (`path` names it in errors): `metadata` in order, then `tensors`,
/// whose bytes `data(i, &tensors[i])` returns in order (exactly `tensors[i].byte_len()` bytes,
/// else an error naming the tensor). Returns the bytes written.
pub fn write<E: From<GgufError>>(
    path: &Path,
    out: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize, &TensorSpec) -> Result<Vec<u8>, E>,
) -> Result<u64, E> {
    check(path, metadata, tensors)?;
    let io = |cause: std::io::Error| GgufError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.byte_len() + padding(t.byte_len());
    }
    head.resize(head.len() + padding(head.len()), 0);
    out.write_all(&head).map_err(io)?;
    let mut written = head.len() as u64;
    let zeros = [0u8; ALIGNMENT];
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i, t)?;
        if bytes.len() != t.byte_len() {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                message: format!(
                    "{} bytes of data for shape {:?} in {}, expected {}",
                    bytes.len(),
                    t.shape,
                    t.ty,
                    t.byte_len()
                ),
            }
            .into());
        }
        out.write_all(&bytes).map_err(io)?;
        out.write_all(&zeros[..padding(bytes.len())]).map_err(io)?;
        written += (bytes.len() + padding(bytes.len())) as u64;
    }
    out.flush().map_err(io)?;
    Ok(written)
}
