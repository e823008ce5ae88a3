//! The Jinja environment, configured the way transformers configures jinja2.
//!
//! transformers (`utils/chat_template_utils.py::_compile_jinja_template`) renders with
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])`, replaces the `tojson` filter by
//! `json.dumps(..., ensure_ascii=False)`, and adds the globals `raise_exception(message)` and
//! `strftime_now(format)`. Templates also call Python methods (`.strip()`, `.items()`, ...),
//! which `minijinja_contrib::pycompat` provides; `strip`/`trim` here use Python's notion of
//! whitespace. `{% generation %}` blocks (the `AssistantTracker` extension) render their body
//! unchanged, as in transformers when no assistant mask is requested.

use std::sync::Arc;

use chrono::format::{Item, StrftimeItems};
use chrono::NaiveDateTime;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};

use super::pyjson::{dumps, py_float_repr, DumpOptions};

/// Where `strftime_now` takes the time from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Clock {
    /// The local wall clock, as `datetime.now()` in transformers.
    #[default]
    Local,
    /// A fixed instant, for reproducible renders (e.g. cached tokenization).
    Fixed(NaiveDateTime),
}

/// The error carried as `source` of the engine error when a template calls `raise_exception`.
#[derive(Debug, Clone)]
pub(crate) struct RaisedException(pub String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A new environment with transformers' settings, `strftime_now` reading `clock`.
pub(crate) fn new_environment(clock: Clock) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    // jinja2's `from_string` never auto-escapes; do not guess from the template name.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_methods);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env.add_filter("trim", trim);
    set_clock(&mut env, clock);
    Ok(env)
}

/// (Re)defines `strftime_now` to read `clock`.
pub(crate) fn set_clock(env: &mut Environment<'static>, clock: Clock) {
    env.add_function("strftime_now", move |format: &str| {
        strftime_now(clock, format)
    });
}

fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = match message.as_str() {
        Some(s) => s.to_string(),
        None => message.to_string(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

fn strftime_now(clock: Clock, format: &str) -> Result<Value, Error> {
    let now = match clock {
        Clock::Local => chrono::Local::now().naive_local(),
        Clock::Fixed(t) => t,
    };
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        ));
    }
    let mut out = String::new();
    std::fmt::Write::write_fmt(
        &mut out,
        format_args!("{}", now.format_with_items(items.into_iter())),
    )
    .map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format with {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Python's `str.isspace()`: Unicode whitespace plus the ASCII separators 0x1C..=0x1F.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// jinja2's `trim` filter: `str(value).strip(chars)`.
fn trim(value: Value, chars: Option<String>) -> String {
    let s = match value.as_str() {
        Some(s) => s.to_string(),
        None => value.to_string(),
    };
    match chars {
        Some(chars) => s.trim_matches(|c| chars.contains(c)).to_string(),
        None => s.trim_matches(py_is_space).to_string(),
    }
}

/// Python methods on values; whitespace stripping with Python's whitespace set, the rest from
/// `minijinja_contrib::pycompat`.
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), true) = (value.as_str(), args.is_empty()) {
        match method {
            "strip" => return Ok(Value::from(s.trim_matches(py_is_space))),
            "lstrip" => return Ok(Value::from(s.trim_start_matches(py_is_space))),
            "rstrip" => return Ok(Value::from(s.trim_end_matches(py_is_space))),
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Prints values as Python's `str()` would; minijinja already does for `None` and booleans,
/// floats need Python's `repr` (`1e-05`, `1e+16`).
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> Result<(), Error> {
    if value.kind() == ValueKind::Number && !value.is_integer() {
        if let Ok(x) = f64::try_from(value.clone()) {
            return out
                .write_str(&py_float_repr(x))
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write output"));
        }
    }
    minijinja::escape_formatter(out, state, value)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    let args = args.into_values();
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    let arg = |i: usize, name: &str| -> Result<Option<Value>, Error> {
        match (positional.get(i), kwargs.get::<Option<Value>>(name)?) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson got multiple values for argument '{name}'"),
            )),
            (Some(v), None) => Ok(Some(v.clone())),
            (None, v) => Ok(v),
        }
    };
    let mut opts = DumpOptions::default();
    if let Some(v) = arg(0, "ensure_ascii")? {
        opts.ensure_ascii = v.is_true();
    }
    if let Some(v) = arg(1, "indent")? {
        opts.indent = indent_string(&v)?;
    }
    if let Some(v) = arg(2, "separators")? {
        if !v.is_none() {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => {
                    opts.item_separator = Some(item.to_string());
                    opts.key_separator = Some(key.to_string());
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be an (item_separator, key_separator) pair",
                    ))
                }
            }
        }
    }
    if let Some(v) = arg(3, "sort_keys")? {
        opts.sort_keys = v.is_true();
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(dumps(value, &opts)?))
}

/// `indent` as Python's json module reads it: an int (spaces) or a string; `None` = compact.
fn indent_string(v: &Value) -> Result<Option<String>, Error> {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => Ok(None),
        ValueKind::String => Ok(Some(v.as_str().unwrap_or_default().to_string())),
        ValueKind::Bool => Ok(Some(if v.is_true() { " " } else { "" }.to_string())),
        ValueKind::Number => {
            let n = i64::try_from(v.clone())?;
            Ok(Some(" ".repeat(n.max(0) as usize)))
        }
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "tojson: indent must be an int or a string, not {}",
                v.kind()
            ),
        )),
    }
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (transformers' `AssistantTracker`
/// extension) into `{% if true %}` / `{% endif %}`, keeping whitespace-control markers so that
/// trimming is unchanged.
pub(crate) fn rewrite_generation_tags(source: &str) -> Arc<str> {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        match parse_generation_tag(tag) {
            Some((len, open_mod, keyword, close_mod)) => {
                let body = if keyword == "generation" {
                    "if true"
                } else {
                    "endif"
                };
                out.push_str("{%");
                out.push_str(open_mod);
                out.push(' ');
                out.push_str(body);
                out.push(' ');
                out.push_str(close_mod);
                out.push_str("%}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    Arc::from(out)
}

/// Matches `{%[-+]? (end)?generation [-+]?%}` at the start of `tag`.
fn parse_generation_tag(tag: &str) -> Option<(usize, &str, &str, &str)> {
    let inner = tag.strip_prefix("{%")?;
    let (open_mod, inner) = match inner.chars().next() {
        Some(c @ ('-' | '+')) => (&inner[..c.len_utf8()], &inner[c.len_utf8()..]),
        _ => ("", inner),
    };
    let trimmed = inner.trim_start();
    let keyword = ["endgeneration", "generation"]
        .into_iter()
        .find(|k| trimmed.starts_with(k))?;
    let after = trimmed[keyword.len()..].trim_start();
    let (close_mod, after) = match after.chars().next() {
        Some('-' | '+') => (&after[..1], &after[1..]),
        _ => ("", after),
    };
    let after = after.strip_prefix("%}")?;
    // A keyword followed by an identifier character is some other tag (`generation_x`).
    let next = trimmed[keyword.len()..].chars().next();
    if next.is_some_and(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    Some((tag.len() - after.len(), open_mod, keyword, close_mod))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: Value) -> Result<String, Error> {
        let env = new_environment(Clock::Local)?;
        env.render_str(src, ctx)
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        let src = "a{%- generation -%}\n b {% endgeneration %}\nc{%generation%}{%endgeneration%}";
        assert_eq!(
            &*rewrite_generation_tags(src),
            "a{%- if true -%}\n b {% endif %}\nc{% if true %}{% endif %}"
        );
        assert_eq!(
            &*rewrite_generation_tags("{% generations %}"),
            "{% generations %}"
        );
    }

    #[test]
    fn python_values_print_like_python() {
        let got = render(
            "{{ none }} {{ true }} {{ 1e-05 }} {{ 2.0 }}",
            Value::from(()),
        )
        .unwrap();
        assert_eq!(got, "None True 1e-05 2.0");
    }

    #[test]
    fn tojson_accepts_python_keyword_arguments() {
        let ctx = Value::from_pairs([(
            "x",
            Value::from_pairs([("b", Value::from(1)), ("a", Value::from("é<"))]),
        )]);
        let got = render(
            "{{ x|tojson }}|{{ x|tojson(sort_keys=true, separators=(',', ':')) }}|{{ x|tojson(ensure_ascii=true) }}",
            ctx,
        )
        .unwrap();
        assert_eq!(
            got,
            r#"{"b": 1, "a": "é<"}|{"a":"é<","b":1}|{"b": 1, "a": "\u00e9<"}"#
        );
    }

    #[test]
    fn fixed_clock_pins_strftime_now() {
        let t = chrono::NaiveDate::from_ymd_opt(2024, 7, 26)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap();
        let env = new_environment(Clock::Fixed(t)).unwrap();
        let got = env
            .render_str("{{ strftime_now('%d %b %Y') }}", ())
            .unwrap();
        assert_eq!(got, "26 Jul 2024");
        assert!(env.render_str("{{ strftime_now('%Q') }}", ()).is_err());
    }

    #[test]
    fn strip_uses_python_whitespace() {
        let ctx = Value::from_pairs([("s", Value::from("\u{1f} a\u{a0}\n"))]);
        let got = render(
            "[{{ s.strip() }}][{{ s|trim }}][{{ 'xxaxx'.strip('x') }}]",
            ctx,
        )
        .unwrap();
        assert_eq!(got, "[a][a][a]");
    }
}
