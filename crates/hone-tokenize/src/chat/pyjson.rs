//! Python's `json.dumps` and `repr(float)` over template values.
//!
//! transformers replaces Jinja's `tojson` filter by
//! `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`,
//! so `tojson` output must follow CPython's `json` encoder: `", "`/`": "` separators without
//! indent, `","`/`": "` with it, `[]`/`{}` for empty containers even when indenting, `\uXXXX`
//! escapes in lower-case hex, floats as `repr(float)`, `NaN`/`Infinity`, and no HTML escaping.

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Options of `json.dumps` that the filter exposes.
#[derive(Debug, Clone, Default)]
pub(crate) struct DumpOptions {
    /// Escape every non-ASCII character (`ensure_ascii=True`).
    pub ensure_ascii: bool,
    /// `None`: one line; `Some(s)`: newline plus `s` per level.
    pub indent: Option<String>,
    /// Between items; `None` picks Python's default for the indent mode.
    pub item_separator: Option<String>,
    /// Between key and value; `None` means `": "`.
    pub key_separator: Option<String>,
    /// Sort object keys.
    pub sort_keys: bool,
}

/// Python `repr(x)` for a float (also `str(x)`): shortest round-trip digits, scientific
/// notation when the exponent is below -4 or at least 16.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16", "0e0".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let n_int = exponent + 1;
        let (int_part, frac_part) = if n_int <= 0 {
            let zeros = "0".repeat((-n_int) as usize);
            ("0".to_string(), format!("{zeros}{digits}"))
        } else {
            let n_int = n_int as usize;
            if digits.len() <= n_int {
                let pad = "0".repeat(n_int - digits.len());
                (format!("{digits}{pad}"), "0".to_string())
            } else {
                (digits[..n_int].to_string(), digits[n_int..].to_string())
            }
        };
        format!("{sign}{int_part}.{frac_part}")
    } else {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

fn py_json_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        py_float_repr(x)
    }
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "tojson: object of type {} is not JSON serializable",
            value.kind()
        ),
    )
}

/// Writes `s` as a JSON string literal with CPython's escaping rules.
pub(crate) fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Renders a value as `json.dumps` would.
pub(crate) fn dumps(value: &Value, opts: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    Encoder {
        opts,
        out: &mut out,
    }
    .encode(value, 0)?;
    Ok(out)
}

struct Encoder<'a> {
    opts: &'a DumpOptions,
    out: &'a mut String,
}

impl Encoder<'_> {
    fn item_separator(&self) -> &str {
        match (&self.opts.item_separator, &self.opts.indent) {
            (Some(sep), _) => sep,
            (None, Some(_)) => ",",
            (None, None) => ", ",
        }
    }

    fn key_separator(&self) -> &str {
        self.opts.key_separator.as_deref().unwrap_or(": ")
    }

    /// Newline and indentation for `level`, or nothing on one line.
    fn newline(&mut self, level: usize) {
        if let Some(indent) = &self.opts.indent {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str(indent);
            }
        }
    }

    fn encode(&mut self, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.encode_number(value)?,
            ValueKind::String => {
                let s = value.as_str().unwrap_or_default();
                write_json_string(self.out, s, self.opts.ensure_ascii);
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.encode_list(&items, level)?;
            }
            ValueKind::Map => self.encode_map(value, level)?,
            _ => return Err(not_serializable(value)),
        }
        Ok(())
    }

    fn encode_number(&mut self, value: &Value) -> Result<(), Error> {
        if value.is_integer() {
            // Integers (i64, u64, i128, u128) print their decimal digits.
            let _ = write!(self.out, "{value}");
        } else {
            let x = f64::try_from(value.clone())?;
            self.out.push_str(&py_json_float(x));
        }
        Ok(())
    }

    fn encode_list(&mut self, items: &[Value], level: usize) -> Result<(), Error> {
        if items.is_empty() {
            self.out.push_str("[]");
            return Ok(());
        }
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                let sep = self.item_separator().to_string();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            self.encode(item, level + 1)?;
        }
        self.newline(level);
        self.out.push(']');
        Ok(())
    }

    fn key_string(&self, key: &Value) -> Result<String, Error> {
        Ok(match key.kind() {
            ValueKind::String => key.as_str().unwrap_or_default().to_string(),
            ValueKind::None => "null".into(),
            ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
            ValueKind::Number if key.is_integer() => key.to_string(),
            ValueKind::Number => py_json_float(f64::try_from(key.clone())?),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "tojson: keys must be str, int, float, bool or None, not {}",
                        key.kind()
                    ),
                ))
            }
        })
    }

    fn encode_map(&mut self, map: &Value, level: usize) -> Result<(), Error> {
        let mut entries = Vec::new();
        for key in map.try_iter()? {
            let value = map.get_item(&key)?;
            entries.push((self.key_string(&key)?, value));
        }
        if entries.is_empty() {
            self.out.push_str("{}");
            return Ok(());
        }
        if self.opts.sort_keys {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        }
        self.out.push('{');
        for (i, (key, value)) in entries.iter().enumerate() {
            if i > 0 {
                let sep = self.item_separator().to_string();
                self.out.push_str(&sep);
            }
            self.newline(level + 1);
            write_json_string(self.out, key, self.opts.ensure_ascii);
            let sep = self.key_separator().to_string();
            self.out.push_str(&sep);
            self.encode(value, level + 1)?;
        }
        self.newline(level);
        self.out.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (123.456, "123.456"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (1e100, "1e+100"),
            (-2.5, "-2.5"),
            (12345678.9, "12345678.9"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "repr({x:?})");
        }
    }

    fn sample() -> Value {
        Value::from_pairs([
            ("name", Value::from("get_weather")),
            (
                "parameters",
                Value::from_pairs([
                    ("city", Value::from("Zürich <b>&'")),
                    ("days", Value::from(3)),
                    ("tags", Value::from(Vec::<Value>::new())),
                    ("x", Value::from(vec![Value::from(1.5), Value::from(())])),
                ]),
            ),
        ])
    }

    #[test]
    fn compact_dumps_uses_python_separators_and_no_html_escape() {
        let got = dumps(&sample(), &DumpOptions::default()).unwrap();
        assert_eq!(
            got,
            r#"{"name": "get_weather", "parameters": {"city": "Zürich <b>&'", "days": 3, "tags": [], "x": [1.5, null]}}"#
        );
    }

    #[test]
    fn indented_dumps_matches_python() {
        let opts = DumpOptions {
            indent: Some("  ".into()),
            ..DumpOptions::default()
        };
        let got = dumps(&sample(), &opts).unwrap();
        let want = "{\n  \"name\": \"get_weather\",\n  \"parameters\": {\n    \"city\": \"Zürich <b>&'\",\n    \"days\": 3,\n    \"tags\": [],\n    \"x\": [\n      1.5,\n      null\n    ]\n  }\n}";
        assert_eq!(got, want);
    }

    #[test]
    fn ensure_ascii_escapes_with_surrogate_pairs() {
        let mut out = String::new();
        write_json_string(&mut out, "é🙂\u{7f}\u{1}\n\"", true);
        assert_eq!(out, r#""\u00e9\ud83d\ude42\u007f\u0001\n\"""#);
        let mut out = String::new();
        write_json_string(&mut out, "é🙂\u{7f}", false);
        assert_eq!(out, "\"é🙂\u{7f}\"");
    }
}
