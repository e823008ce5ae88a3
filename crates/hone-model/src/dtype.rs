//! The float dtypes hone holds weights in: the one dtype choice of the workspace (house rule 15),
//! spelled `f32`, `bf16`, `f16` on the command line (`--dtype`) and in config files
//! (`dtype = "bf16"`), and `float32`, `bfloat16`, `float16` in Hugging Face's `config.json`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A float dtype for weights: what they are computed in after loading, or written in by a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl FloatDtype {
    /// Every dtype, in declaration order.
    pub const ALL: [FloatDtype; 3] = [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16];

    /// The name on the command line and in configs: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::F16 => "f16",
        }
    }

    /// The burn dtype.
    pub fn burn(self) -> burn::tensor::DType {
        match self {
            FloatDtype::F32 => burn::tensor::DType::F32,
            FloatDtype::Bf16 => burn::tensor::DType::BF16,
            FloatDtype::F16 => burn::tensor::DType::F16,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            FloatDtype::F32 => safetensors::Dtype::F32,
            FloatDtype::Bf16 => safetensors::Dtype::BF16,
            FloatDtype::F16 => safetensors::Dtype::F16,
        }
    }

    /// The name in `config.json` (`torch_dtype` / `dtype`).
    pub fn config_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::Bf16 => "bfloat16",
            FloatDtype::F16 => "float16",
        }
    }

    /// The dtype a `config.json` declares, if it is one of these.
    pub fn from_config_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.config_name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
        }
    }

    /// Little-endian bytes of `values` in this dtype (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDtype::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            FloatDtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn flag_config_and_hugging_face_spellings_agree() {
        for dtype in FloatDtype::ALL {
            let flag = dtype.to_possible_value().unwrap();
            assert_eq!(flag.get_name(), dtype.name());
            let toml = serde_json::to_value(dtype).unwrap();
            assert_eq!(toml, dtype.name());
            assert_eq!(
                FloatDtype::from_config_name(dtype.config_name()),
                Some(dtype)
            );
            assert_eq!(dtype.encode(&[1.0]).len(), dtype.size());
        }
    }
}
