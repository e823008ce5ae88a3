//! The server's settings, validated before any work: where the model comes from, which adapters
//! to preload and where to find more, whether adapters may be loaded at run time, the listening
//! address, the API key, the limits that bound memory and waiting (batch size, queue, prompt
//! length, body size, adapter count) and the timeouts that bound slow clients and shutdown.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use burn::tensor::DType;
use hone_model::gguf::matmul::Activations;
use hone_model::{DeviceSpec, ModelConfig};
use hone_tokenize::TemplateSource;

use crate::error::{Result, ServeError};
use crate::rag::RagSettings;

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
    /// Prompt tokens prefilled in one step while requests are decoding, in the same forward
    /// pass as their tokens (whole prompts when nothing else runs).
    pub prefill_chunk: usize,
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
            prefill_chunk: 256,
            max_queue: 256,
            max_prompt_tokens: None,
            max_body_bytes: 4 << 20,
            max_adapters: 32,
            max_stop_strings: 16,
        }
    }
}

/// Bounds on how long a client may take and how long shutdown may wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// From the connection (or the end of the previous request) to a complete request head;
    /// beyond it the connection is closed (slowloris, idle keep-alive connections).
    pub header_read: Duration,
    /// From the request head to the whole body; beyond it, 408.
    pub body_read: Duration,
    /// After the shutdown signal, how long running requests may go on before the server stops
    /// anyway.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(30),
            shutdown: Duration::from_secs(30),
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
    /// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are enabled (vLLM's
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`). Their `lora_path` must lie inside `adapters_dir`,
    /// which is then required.
    pub allow_runtime_lora: bool,
    pub host: IpAddr,
    /// 0 lets the OS choose.
    pub port: u16,
    /// Bearer key required on `/v1/*` when set (surrounding whitespace is ignored).
    pub api_key: Option<String>,
    pub device: DeviceSpec,
    pub dtype: DType,
    /// How a GGUF model's quantized weights multiply activations (`--q8-activations`,
    /// `--bf16-activations`).
    pub activations: Activations,
    /// Chat template (`None`: the model's own, if it has one).
    pub chat_template: Option<TemplateSource>,
    /// A retrieval index for chat requests (`--rag DIR`; see [`crate::rag`]).
    pub rag: Option<RagSettings>,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

impl ServeConfig {
    /// Defaults: loopback, port 8080, CPU, f32, no key, default limits.
    pub fn new(model: ModelSource) -> Self {
        Self {
            model,
            served_model_name: None,
            adapters: Vec::new(),
            adapters_dir: None,
            allow_runtime_lora: false,
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            api_key: None,
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            activations: Activations::F32,
            chat_template: None,
            rag: None,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        }
    }

    /// The API key as compared with the client's (trimmed, as the client's is).
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref().map(str::trim)
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
        if l.prefill_chunk == 0 {
            return bad("prefill_chunk", "must be at least 1 token".into());
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
            if !dir.is_dir() && !hone_model::loader::is_gguf(dir) {
                return bad(
                    "model",
                    format!("{} is not a model directory or GGUF file", dir.display()),
                );
            }
        }
        if self.api_key().is_some_and(str::is_empty) {
            return bad("api_key", "is empty (or only whitespace)".into());
        }
        for (key, value) in [
            ("header_timeout", self.timeouts.header_read),
            ("body_timeout", self.timeouts.body_read),
        ] {
            if value.is_zero() {
                return bad(key, "must be more than 0 seconds".into());
            }
        }
        let base = self.base_name();
        validate_name(&base).map_err(|m| ServeError::Config {
            key: "served_model_name",
            message: m,
        })?;
        let mut seen = std::collections::HashSet::new();
        for (name, path) in &self.adapters {
            validate_adapter_name(name).map_err(|m| ServeError::Config {
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
        } else if self.allow_runtime_lora {
            return bad(
                "allow_runtime_lora",
                "runtime adapter loading needs --adapters-dir: load requests may only name \
                 adapters inside it"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Longest adapter name.
pub const MAX_ADAPTER_NAME: usize = 64;

/// An adapter name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`, not starting with `.`.
/// Names are model ids in requests and URLs and select folders of the adapters directory, so
/// invisible or look-alike characters (zero-width spaces, Cyrillic letters) and paths are
/// refused.
pub fn validate_adapter_name(name: &str) -> std::result::Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > MAX_ADAPTER_NAME
        || name.starts_with('.')
        || !name.chars().all(allowed)
    {
        return Err(format!(
            "adapter name {name:?} must be 1 to {MAX_ADAPTER_NAME} ASCII letters, digits, `.`, \
             `_` or `-`, not starting with `.`"
        ));
    }
    Ok(())
}

/// The base model's name: 1 to 128 characters, none of them whitespace or control
/// characters, and not a path (`/`, `\`, `.` or `..`).
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
            assert!(validate_adapter_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("math-v2.1_final").is_ok());
        assert!(validate_adapter_name("math-v2.1_final").is_ok());
    }

    #[test]
    fn adapter_names_with_invisible_or_look_alike_characters_are_refused() {
        for bad in [
            "math\u{200B}", // zero-width space
            "ma\u{200D}th", // zero-width joiner
            "\u{FEFF}math", // byte-order mark
            "m\u{0430}th",  // Cyrillic a
            "math\u{7}",    // bell
            "math\u{00A0}", // no-break space
            ".hidden",
            "a:b",
        ] {
            assert!(validate_adapter_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_adapter_name(&"a".repeat(MAX_ADAPTER_NAME)).is_ok());
        assert!(validate_adapter_name(&"a".repeat(MAX_ADAPTER_NAME + 1)).is_err());
        assert!(validate_adapter_name("v1.0").is_ok());
    }

    fn tiny_config() -> ServeConfig {
        let dir = std::env::temp_dir();
        ServeConfig::new(ModelSource::Dir(dir))
    }

    #[test]
    fn an_api_key_of_only_whitespace_is_refused_and_others_are_trimmed() {
        let mut config = tiny_config();
        config.api_key = Some(" \t\n".into());
        let err = config.validate().unwrap_err();
        assert!(
            matches!(err, ServeError::Config { key: "api_key", .. }),
            "{err}"
        );
        config.api_key = Some("  sekret\n".into());
        assert_eq!(config.api_key(), Some("sekret"));
        config.validate().unwrap();
    }

    #[test]
    fn runtime_adapter_loading_without_an_adapters_dir_is_refused() {
        let mut config = tiny_config();
        config.allow_runtime_lora = true;
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ServeError::Config {
                    key: "allow_runtime_lora",
                    ..
                }
            ),
            "{err}"
        );
        config.adapters_dir = Some(std::env::temp_dir());
        config.validate().unwrap();
    }
}
