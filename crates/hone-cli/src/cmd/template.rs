//! `hone template render`: prints exactly what a chat template renders, for users debugging a
//! template (as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` prints it).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use hone_tokenize::{ChatTemplate, ExtraContext, Message, SpecialTokens};
use serde_json::Value;

use crate::args::{TemplateCommand, TemplateRenderArgs};

pub fn run(command: TemplateCommand) -> Result<()> {
    match command {
        TemplateCommand::Render(args) => render(args),
    }
}

/// The messages of a JSON file and the template variables it carries: either a list of
/// messages, or an object with `messages` whose other keys are template variables.
fn read_messages(path: &Path) -> Result<(Vec<Message>, ExtraContext)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let (messages, extra) = match value {
        Value::Array(_) => (value, ExtraContext::new()),
        Value::Object(mut object) => match object.shift_remove("messages") {
            Some(messages) => (messages, object),
            None => bail!(
                "{}: an object needs a `messages` list (or give the list itself)",
                path.display()
            ),
        },
        _ => bail!(
            "{}: expected a list of messages or an object with `messages`",
            path.display()
        ),
    };
    let messages: Vec<Message> = serde_json::from_value(messages)
        .with_context(|| format!("{}: `messages`", path.display()))?;
    Ok((messages, extra))
}

/// `KEY=VALUE` pairs; a VALUE that parses as JSON is that JSON value, else a string.
fn parse_vars(vars: &[String], extra: &mut ExtraContext) -> Result<()> {
    for var in vars {
        let Some((key, value)) = var.split_once('=') else {
            bail!("--var `{var}`: expected KEY=VALUE");
        };
        if key.is_empty() {
            bail!("--var `{var}`: the key is empty");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        extra.insert(key.to_string(), value);
    }
    Ok(())
}

fn render(args: TemplateRenderArgs) -> Result<()> {
    let name = args.name.as_deref();
    let template = match (&args.model, &args.tokenizer_config, args.template) {
        (Some(dir), _, _) => ChatTemplate::from_model_dir(dir, name)
            .with_context(|| format!("chat template of {}", dir.display()))?,
        (None, Some(file), _) => ChatTemplate::from_tokenizer_config_file(file, name)
            .with_context(|| format!("chat template of {}", file.display()))?,
        (None, None, Some(builtin)) => ChatTemplate::builtin(builtin, SpecialTokens::default())?,
        (None, None, None) => bail!("give --model, --tokenizer-config or --template"),
    };
    let (messages, mut extra) = read_messages(&args.messages)?;
    parse_vars(&args.vars, &mut extra)?;
    let text = template.render(&messages, args.add_generation_prompt, &extra)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_are_json_when_they_parse_and_strings_otherwise() {
        let mut extra = ExtraContext::new();
        let vars = [
            "date_string=26 Jul 2024".to_string(),
            "enable_thinking=false".to_string(),
            "tools=[{\"name\": \"f\"}]".to_string(),
        ];
        parse_vars(&vars, &mut extra).unwrap();
        assert_eq!(extra["date_string"], Value::String("26 Jul 2024".into()));
        assert_eq!(extra["enable_thinking"], Value::Bool(false));
        assert_eq!(extra["tools"][0]["name"], "f");
        assert!(parse_vars(&["novalue".to_string()], &mut extra).is_err());
        assert!(parse_vars(&["=x".to_string()], &mut extra).is_err());
    }
}
