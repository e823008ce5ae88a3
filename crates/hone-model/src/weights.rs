//! Reading tensors from Hugging Face safetensors checkpoints: one `model.safetensors` or shards
//! listed by `model.safetensors.index.json`. Files are memory-mapped; F32, F16 and BF16 tensors are
//! converted to f32 on request. Every error names the tensor and the file.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// A read-only view of the tensors of one checkpoint, possibly spread over several files.
pub struct WeightStore {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl WeightStore {
    /// Opens the weights of a Hugging Face model directory: `model.safetensors`, or the shards
    /// named by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        if !index_path.is_file() {
            return Err(ModelError::MissingFile { path: single });
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidJson {
                path: index_path.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::InvalidConfig {
                path: index_path.clone(),
                key: "weight_map".into(),
                message: "expected an object mapping tensor names to shard files".into(),
            })?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::InvalidConfig {
                path: index_path.clone(),
                key: format!("weight_map.{name}"),
                message: "expected a file name".into(),
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                return Err(ModelError::InvalidConfig {
                    path: index_path.clone(),
                    key: format!("weight_map.{name}"),
                    message: format!("`{file}` is not a plain file name"),
                });
            }
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let store = Self::open_files(&paths)?;
        for (name, file) in map {
            let expected = dir.join(file.as_str().unwrap_or_default());
            match store.index.get(name) {
                Some(&i) if store.shards[i].path == expected => {}
                _ => {
                    return Err(ModelError::MissingTensor {
                        name: name.clone(),
                        files: format!(
                            "{} (listed by {})",
                            expected.display(),
                            index_path.display()
                        ),
                    })
                }
            }
        }
        Ok(store)
    }

    /// Opens the given safetensors files. A tensor name present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is opened read-only and the map is only read; a checkpoint
            // modified while hone runs is outside what any loader can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::CorruptSafetensors {
                    path: path.clone(),
                    message: format!("{e:?}"),
                })?;
            let shard_index = shards.len();
            for name in metadata.tensors().keys() {
                if let Some(&other) = index.get(name) {
                    let other: &Shard = &shards[other];
                    return Err(ModelError::CorruptSafetensors {
                        path: path.clone(),
                        message: format!(
                            "tensor `{name}` is also stored in {}",
                            other.path.display()
                        ),
                    });
                }
                index.insert(name.clone(), shard_index);
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self { shards, index })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn files_list(&self) -> String {
        self.shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let shard = self.shard(name)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| self.missing(name))?;
        Ok(info.shape.clone())
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            files: self.files_list(),
        }
    }

    fn shard(&self, name: &str) -> Result<&Shard> {
        let &i = self.index.get(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.shards[i])
    }

    /// Reads tensor `name` as f32, checking that its shape is `expected`.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let shard = self.shard(name)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| self.missing(name))?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        decode_f32(bytes, info.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })
    }

    /// [`WeightStore::load_f32`], refusing a tensor that holds NaN or an infinity (naming the
    /// tensor, the file and the first bad value). For adapters: a non-finite LoRA factor turns
    /// every output of the model into NaN.
    pub fn load_f32_finite(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let values = self.load_f32(name, expected)?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                name: name.to_string(),
                path: self.shard(name)?.path.clone(),
                index,
                value: values[index],
                count: values.iter().filter(|v| !v.is_finite()).count(),
            });
        }
        Ok(values)
    }

    /// Reads an integer tensor (I64 or I32) with its shape.
    pub fn load_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let shard = self.shard(name)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| self.missing(name))?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let values = match info.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    path: shard.path.clone(),
                    dtype: format!("{other:?} (expected I64 or I32)"),
                })
            }
        };
        Ok((values, info.shape.clone()))
    }
}

/// Converts little-endian F32/F16/BF16 bytes to f32; `None` for other dtypes.
fn decode_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
