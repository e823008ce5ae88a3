//! Built-in chat templates for models that ship none, and the config-level template choice.
//!
//! * `chatml`: `<|im_start|>{role}\n{content}<|im_end|>\n` per message (OpenAI ChatML as used by
//!   Qwen2 and SmolLM2), generation prompt `<|im_start|>assistant\n`.
//! * `llama3`: Meta's Llama-3-Instruct layout, `<|begin_of_text|>` then
//!   `<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>` per message,
//!   generation prompt `<|start_header_id|>assistant<|end_header_id|>\n\n`.
//! * `alpaca`: Stanford Alpaca's prompt (`Below is an instruction...`, `### Instruction:`,
//!   `### Response:`); a system message replaces the preamble, each response ends with the
//!   model's `eos_token`, and several exchanges follow one another separated by a blank line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::config::SpecialTokens;
use super::error::TemplateError;

const CHATML: &str = "\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}";

const LLAMA3: &str = "\
{{- '<|begin_of_text|>' }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}";

const ALPACA: &str = "\
{%- if messages and messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + '\\n\\n' }}
{%- set loop_messages = messages[1:] %}
{%- else %}
{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' }}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}
{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '### Response:\\n' + message['content'] }}{{ eos_token }}
{%- if not loop.last %}{{ '\\n\\n' }}{% endif %}
{%- else %}
{{- raise_exception('The alpaca template supports system (first), user and assistant messages, not ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '### Response:\\n' }}
{%- endif %}";

/// A chat template that hone ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinTemplate {
    /// ChatML (`<|im_start|>` / `<|im_end|>`).
    Chatml,
    /// Llama 3 Instruct (`<|start_header_id|>` / `<|eot_id|>`).
    Llama3,
    /// Stanford Alpaca (`### Instruction:` / `### Response:`).
    Alpaca,
}

impl BuiltinTemplate {
    /// All built-in templates.
    pub const ALL: [BuiltinTemplate; 3] = [Self::Chatml, Self::Llama3, Self::Alpaca];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chatml => "chatml",
            Self::Llama3 => "llama3",
            Self::Alpaca => "alpaca",
        }
    }

    /// The Jinja text of the template.
    pub fn source(self) -> &'static str {
        match self {
            Self::Chatml => CHATML,
            Self::Llama3 => LLAMA3,
            Self::Alpaca => ALPACA,
        }
    }

    /// Tokens the format itself defines; a model's own tokens take precedence.
    pub fn default_special_tokens(self) -> SpecialTokens {
        let token = |s: &str| Some(s.to_string());
        match self {
            Self::Chatml => SpecialTokens {
                eos_token: token("<|im_end|>"),
                ..SpecialTokens::default()
            },
            Self::Llama3 => SpecialTokens {
                bos_token: token("<|begin_of_text|>"),
                eos_token: token("<|eot_id|>"),
                ..SpecialTokens::default()
            },
            Self::Alpaca => SpecialTokens::default(),
        }
    }
}

impl fmt::Display for BuiltinTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BuiltinTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| TemplateError::UnknownSource(s.to_string()))
    }
}

/// Where a run's chat template comes from: a config value such as `"model"`,
/// `"model:tool_use"` or `"chatml"`.
///
/// Serialises as that string, and parses from it (`FromStr`), so it works in TOML configs and
/// as a clap argument (`value_parser = clap::value_parser!(TemplateSource)` via `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TemplateSource {
    /// The model's own default template (`chat_template.jinja` / `tokenizer_config.json`).
    #[default]
    Model,
    /// One of the model's named templates (e.g. `tool_use`).
    ModelNamed(String),
    /// A template shipped with hone.
    Builtin(BuiltinTemplate),
}

impl fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model => f.write_str("model"),
            Self::ModelNamed(name) => write!(f, "model:{name}"),
            Self::Builtin(b) => f.write_str(b.name()),
        }
    }
}

impl FromStr for TemplateSource {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "model" => Ok(Self::Model),
            _ => match s.strip_prefix("model:") {
                Some(name) if !name.is_empty() => Ok(Self::ModelNamed(name.to_string())),
                Some(_) => Err(TemplateError::UnknownSource(s.to_string())),
                None => s.parse().map(Self::Builtin),
            },
        }
    }
}

impl TryFrom<String> for TemplateSource {
    type Error = TemplateError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TemplateSource> for String {
    fn from(source: TemplateSource) -> String {
        source.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_source_round_trips_through_strings() {
        for text in ["model", "model:tool_use", "chatml", "llama3", "alpaca"] {
            let parsed: TemplateSource = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
            let json = serde_json::to_string(&parsed).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            let back: TemplateSource = serde_json::from_str(&json).unwrap();
            assert_eq!(back, parsed);
        }
        assert!("vicuna".parse::<TemplateSource>().is_err());
        assert!("model:".parse::<TemplateSource>().is_err());
        assert!(serde_json::from_str::<TemplateSource>("\"zephyr\"").is_err());
    }
}
