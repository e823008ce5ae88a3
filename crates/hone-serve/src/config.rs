//! The server's settings, validated before any work: where the model comes from, which adapters
//! to preload and where to find more, the listening address, the API key, and the limits that
//! bound memory and waiting (batch size, queue, prompt length, body size, adapter count).

use std::net::IpAddr;
use std::path::PathBuf;

use burn::tensor::DType;
use hone_model::{DeviceSpec, ModelConfig};
use hone_tokenize::TemplateSource;

use crate::error::{Result, ServeError};

/// Where the served base model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face model directory (a merged model directory is one too).
    Dir(PathBuf),
    /// Random weights of `config` (benchmarks), with the tokenizer of `tokenizer_dir`. Token ids
    /// the tokenizer does not know decode to nothing.
    Random {
        config: Box<ModelConfig>,
        seed: u64,
        tokenizer_dir: PathBuf,
        name: String,
    },
}

/// Bounds on what requests may cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Requests decoded together.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; beyond it, 429.
    pub max_queue: usize,
    /// Prompt tokens per request (`None`: the model's context length).
    pub max_prompt_tokens: Option<usize>,
    /// Bytes of a request body; beyond it, 413.
    pub max_body_bytes: usize,
    /// Adapters loaded at once.
    pub max_adapters: usize,
    /// Stop strings per request.
    pub max_stop_strings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
            max_prompt_tokens: None,
            max_body_bytes: 4 << 20,
            max_adapters: 32,
            max_stop_strings: 16,
        }
    }
}

/// Everything `hone serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: ModelSource,
    /// Name of the base model in `/v1/models` and in requests (default: the directory's name).
    pub served_model_name: Option<String>,
    /// Adapters loaded at start: (name, PEFT directory).
    pub adapters: Vec<(String, PathBuf)>,
    /// A directory whose sub-directories are adapters, loaded by name on first use.
    pub adapters_dir: Option<PathBuf>,
    pub host: IpAddr,
    /// 0 lets the OS choose.
    pub port: u16,
    /// Bearer key required on `/v1/*` when set.
    pub api_key: Option<String>,
    pub device: DeviceSpec,
    pub dtype: DType,
    /// Chat template (`None`: the model's own, if it has one).
    pub chat_template: Option<TemplateSource>,
    pub limits: Limits,
}

impl ServeConfig {
    /// Defaults: loopback, port 8080, CPU, f32, no key, default limits.
    pub fn new(model: ModelSource) -> Self {
        Self {
            model,
            served_model_name: None,
            adapters: Vec::new(),
            adapters_dir: None,
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            api_key: None,
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            chat_template: None,
            limits: Limits::default(),
        }
    }

    /// The base model's public name.
    pub fn base_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        match &self.model {
            ModelSource::Dir(dir) => dir
                .canonicalize()
                .unwrap_or_else(|_| dir.clone())
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "base".into()),
            ModelSource::Random { name, .. } => name.clone(),
        }
    }

    /// Checks every setting a user can get wrong, naming it.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, message: String| Err(ServeError::Config { key, message });
        let l = &self.limits;
        if l.max_batch == 0 {
            return bad("max_batch", "must be at least 1".into());
        }
        if l.max_body_bytes < 64 {
            return bad(
                "max_body_bytes",
                format!("{} bytes cannot hold a request", l.max_body_bytes),
            );
        }
        if l.max_prompt_tokens == Some(0) {
            return bad("max_prompt_tokens", "must be at least 1".into());
        }
        if let ModelSource::Dir(dir) = &self.model {
            if !dir.is_dir() {
                return bad(
                    "model",
                    format!("{} is not a model directory", dir.display()),
                );
            }
        }
        if self.api_key.as_deref() == Some("") {
            return bad("api_key", "is empty".into());
        }
        let base = self.base_name();
        validate_name(&base).map_err(|m| ServeError::Config {
            key: "served_model_name",
            message: m,
        })?;
        let mut seen = std::collections::HashSet::new();
        for (name, path) in &self.adapters {
            validate_name(name).map_err(|m| ServeError::Config {
                key: "adapter",
                message: m,
            })?;
            if name == &base {
                return bad(
                    "adapter",
                    format!("adapter name `{name}` is the base model's name"),
                );
            }
            if !seen.insert(name) {
                return bad("adapter", format!("adapter name `{name}` given twice"));
            }
            if !path.is_dir() {
                return bad(
                    "adapter",
                    format!("{name}: {} is not a directory", path.display()),
                );
            }
        }
        if self.adapters.len() > l.max_adapters {
            return bad(
                "max_adapters",
                format!(
                    "{} adapters given, more than max_adapters = {}",
                    self.adapters.len(),
                    l.max_adapters
                ),
            );
        }
        if let Some(dir) = &self.adapters_dir {
            if !dir.is_dir() {
                return bad(
                    "adapters_dir",
                    format!("{} is not a directory", dir.display()),
                );
            }
        }
        Ok(())
    }
}

/// A model or adapter name: 1 to 128 characters, none of them whitespace or control
/// characters, and not a path (`/`, `\`, `.` or `..`), since names also select folders of the
/// adapters directory.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.chars().count() > 128 {
        return Err(format!("name `{name}` must have 1 to 128 characters"));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '\\')
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "name `{name}` may not contain whitespace, control characters or path separators"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_adapters_dir_are_refused() {
        for bad in ["", "..", ".", "a/b", "a\\b", "a b", "x\n"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("math-v2.1_final").is_ok());
    }
}
