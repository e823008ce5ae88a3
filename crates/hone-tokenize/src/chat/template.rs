//! [`ChatTemplate`]: a compiled chat template plus the special tokens it may reference.
//!
//! Rendering follows `transformers`' `apply_chat_template(tokenize=False)`: the template sees
//! `messages`, `tools` and `documents` (both `None` unless given), `add_generation_prompt`,
//! the special tokens (`bos_token`, ...) and any extra keyword variables, which override the
//! special tokens just as `{**special_tokens_map, **kwargs}` does in transformers.

use std::fmt;
use std::path::Path;

use chrono::NaiveDateTime;
use minijinja::{Environment, Value};

use super::builtin::{BuiltinTemplate, TemplateSource};
use super::config::SpecialTokens;
use super::config::{parse_tokenizer_config, read_text, select_template, ModelDirTemplates};
use super::env::{new_environment, rewrite_generation_tags, set_clock, Clock, RaisedException};
use super::error::TemplateError;
use super::value::{json_to_value, messages_to_value};
use hone_data::Message;

/// Extra template variables (`tools`, `documents`, `date_string`, `enable_thinking`, ...), as
/// the keyword arguments of `apply_chat_template`.
pub type ExtraContext = serde_json::Map<String, serde_json::Value>;

/// Key of the single template inside the environment.
const TEMPLATE_KEY: &str = "chat_template";
/// Variables set by the renderer itself; extra context may not redefine them.
const RESERVED_KEYS: [&str; 2] = ["messages", "add_generation_prompt"];

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    name: String,
    source: String,
    special_tokens: SpecialTokens,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `name` identifies it in errors (a path, `builtin:chatml`, ...).
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        special_tokens: SpecialTokens,
    ) -> Result<Self, TemplateError> {
        let name = name.into();
        let source = source.into();
        let mut env = new_environment(Clock::Local).map_err(|e| TemplateError::Render {
            template: name.clone(),
            line: None,
            message: e.to_string(),
        })?;
        let prepared = rewrite_generation_tags(&source).to_string();
        env.add_template_owned(TEMPLATE_KEY, prepared)
            .map_err(|e| TemplateError::Syntax {
                template: name.clone(),
                line: e.line(),
                message: engine_message(&e),
            })?;
        Ok(Self {
            name,
            source,
            special_tokens,
            env,
        })
    }

    /// The default (or `template_name`d) template of a `tokenizer_config.json` given as text;
    /// `origin` names it in errors.
    pub fn from_tokenizer_config_str(
        json: &str,
        origin: &str,
        template_name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let config = parse_tokenizer_config(json, origin)?;
        let found =
            select_template(&config.templates, template_name, origin)?.ok_or_else(|| {
                TemplateError::MissingTemplate {
                    origin: origin.to_string(),
                    searched: "its chat_template field".to_string(),
                }
            })?;
        Self::new(found.name, found.text, config.special)
    }

    /// Like [`Self::from_tokenizer_config_str`], reading the file.
    pub fn from_tokenizer_config_file(
        path: impl AsRef<Path>,
        template_name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let path = path.as_ref();
        let text = read_text(path)?;
        Self::from_tokenizer_config_str(&text, &path.display().to_string(), template_name)
    }

    /// The template of a Hugging Face model directory: `chat_template.jinja`, else the
    /// `chat_template` field of `tokenizer_config.json`, else `chat_template.json`; a
    /// `template_name` other than `default` is looked up in `additional_chat_templates/` and
    /// among the named templates of `tokenizer_config.json`.
    pub fn from_model_dir(
        dir: impl AsRef<Path>,
        template_name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let model = ModelDirTemplates::read(dir.as_ref())?;
        let found = model.find(template_name)?;
        Self::new(found.name, found.text, model.special_tokens())
    }

    /// A built-in template; `special_tokens` (usually the model's) take precedence over the
    /// format's own defaults.
    pub fn builtin(
        which: BuiltinTemplate,
        special_tokens: SpecialTokens,
    ) -> Result<Self, TemplateError> {
        let tokens = special_tokens.or(&which.default_special_tokens());
        Self::new(format!("builtin:{which}"), which.source(), tokens)
    }

    /// Resolves a config's [`TemplateSource`] against a model directory (whose
    /// `tokenizer_config.json` supplies special tokens for built-in templates too).
    pub fn load(
        source: &TemplateSource,
        model_dir: impl AsRef<Path>,
    ) -> Result<Self, TemplateError> {
        let dir = model_dir.as_ref();
        match source {
            TemplateSource::Model => Self::from_model_dir(dir, None),
            TemplateSource::ModelNamed(name) => Self::from_model_dir(dir, Some(name)),
            TemplateSource::Builtin(which) => {
                let tokens = ModelDirTemplates::read(dir)?.special_tokens();
                Self::builtin(*which, tokens)
            }
        }
    }

    /// Pins the time `strftime_now` reports (templates such as Llama 3.x print today's date
    /// unless `date_string` is given), making renders reproducible.
    pub fn with_fixed_now(mut self, now: NaiveDateTime) -> Self {
        set_clock(&mut self.env, Clock::Fixed(now));
        self
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template text as loaded.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens the template sees.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Renders a conversation, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=..., **extra)` does.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &ExtraContext,
    ) -> Result<String, TemplateError> {
        let ctx = self.context(messages, add_generation_prompt, extra)?;
        let template = self
            .env
            .get_template(TEMPLATE_KEY)
            .map_err(|e| self.render_error(e))?;
        template.render(ctx).map_err(|e| self.render_error(e))
    }

    /// Renders with `continue_final_message=True`: the text stops right after the content of
    /// the last message, so that generation continues it (transformers' truncation rule).
    pub fn render_continuing_final_message(
        &self,
        messages: &[Message],
        extra: &ExtraContext,
    ) -> Result<String, TemplateError> {
        let rendered = self.render(messages, false, extra)?;
        let Some(last) = messages.last() else {
            return Ok(rendered);
        };
        let content = last.content.as_str();
        let stripped = content.trim();
        let Some(at) = rendered.rfind(stripped) else {
            return Err(TemplateError::Render {
                template: self.name.clone(),
                line: None,
                message: "continue_final_message: the final message does not appear in the \
                          rendered chat"
                    .to_string(),
            });
        };
        let lstripped = content.trim_start();
        let end = if rendered.get(at..at + lstripped.len()) == Some(content) {
            at + lstripped.len()
        } else {
            at + stripped.len()
        };
        Ok(rendered[..end].to_string())
    }

    fn context(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &ExtraContext,
    ) -> Result<Value, TemplateError> {
        if let Some(key) = RESERVED_KEYS.iter().find(|k| extra.contains_key(**k)) {
            return Err(TemplateError::ReservedContextKey {
                key: key.to_string(),
            });
        }
        let mut pairs: Vec<(String, Value)> = self
            .special_tokens
            .context_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        pairs.push(("tools".into(), Value::from(())));
        pairs.push(("documents".into(), Value::from(())));
        pairs.extend(extra.iter().map(|(k, v)| (k.clone(), json_to_value(v))));
        pairs.push(("messages".into(), messages_to_value(messages)));
        pairs.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        Ok(Value::from_pairs(pairs))
    }

    fn render_error(&self, err: minijinja::Error) -> TemplateError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cause {
            if let Some(raised) = e.downcast_ref::<RaisedException>() {
                return TemplateError::Raised {
                    template: self.name.clone(),
                    message: raised.0.clone(),
                };
            }
            cause = e.source();
        }
        TemplateError::Render {
            template: self.name.clone(),
            line: err.line(),
            message: engine_message(&err),
        }
    }
}

/// The engine's description of an error without its "(in template:line)" suffix.
fn engine_message(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..SpecialTokens::default()
        }
    }

    #[test]
    fn templates_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<TemplateError>();
    }

    #[test]
    fn syntax_error_names_template_and_line() {
        let err = ChatTemplate::new("broken", "ok\n{% if %}", tokens()).unwrap_err();
        match &err {
            TemplateError::Syntax { template, line, .. } => {
                assert_eq!(template, "broken");
                assert_eq!(*line, Some(2));
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let t = ChatTemplate::new(
            "t",
            "{{ raise_exception('nope: ' ~ messages|length) }}",
            tokens(),
        )
        .unwrap();
        let err = t
            .render(&[Message::user("hi")], false, &ExtraContext::new())
            .unwrap_err();
        match err {
            TemplateError::Raised { template, message } => {
                assert_eq!(template, "t");
                assert_eq!(message, "nope: 1");
            }
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn render_error_is_not_mistaken_for_raise_exception() {
        let t = ChatTemplate::new("t", "{{ messages[5].content.x }}", tokens()).unwrap();
        let err = t
            .render(&[Message::user("hi")], false, &ExtraContext::new())
            .unwrap_err();
        assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
    }

    #[test]
    fn extra_context_overrides_tokens_and_reserved_keys_are_refused() {
        let src = "{{ bos_token }}|{{ tools is none }}|{{ foo|tojson }}|{{ pad_token is defined }}";
        let t = ChatTemplate::new("t", src, tokens()).unwrap();
        let mut extra = ExtraContext::new();
        extra.insert("bos_token".into(), "<B>".into());
        extra.insert("foo".into(), serde_json::json!({"b": 1, "a": 2}));
        assert_eq!(
            t.render(&[], false, &extra).unwrap(),
            r#"<B>|True|{"b": 1, "a": 2}|False"#
        );
        extra.insert("messages".into(), serde_json::json!([]));
        assert!(matches!(
            t.render(&[], false, &extra),
            Err(TemplateError::ReservedContextKey { .. })
        ));
    }

    #[test]
    fn extra_message_fields_reach_the_template_in_order() {
        let src = "{% for m in messages %}{% if m.tool_calls is defined %}\
                   {{ m.tool_calls[0].function.arguments|tojson }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new("t", src, tokens()).unwrap();
        let call =
            serde_json::json!([{"function": {"name": "f", "arguments": {"z": 1, "a": "x"}}}]);
        let msgs = [Message::assistant("").with_field("tool_calls", call)];
        assert_eq!(
            t.render(&msgs, false, &ExtraContext::new()).unwrap(),
            r#"{"z": 1, "a": "x"}"#
        );
    }

    #[test]
    fn continue_final_message_cuts_after_the_last_content() {
        let t = ChatTemplate::builtin(BuiltinTemplate::Chatml, SpecialTokens::default()).unwrap();
        let msgs = [Message::user("Hi"), Message::assistant("Sure, here ")];
        let got = t
            .render_continuing_final_message(&msgs, &ExtraContext::new())
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nSure, here "
        );
    }
}
