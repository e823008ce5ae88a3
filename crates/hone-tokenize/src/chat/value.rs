//! Conversion of JSON values and messages into template values.
//!
//! Objects keep their key order (minijinja's `preserve_order`, serde_json's `preserve_order`),
//! as Python dicts do, so `tojson` and `.items()` print keys in the order they were given.

use minijinja::Value;
use serde_json::Value as Json;

use hone_data::Message;

/// A JSON value as a template value.
pub(crate) fn json_to_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(map) => Value::from_pairs(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))),
        ),
    }
}

/// A message as the dict transformers hands the template: `role`, `content` (the original
/// JSON value when the message kept one in `extra`), then the other extra keys.
pub(crate) fn message_to_value(message: &Message) -> Value {
    let content = match message.extra.get("content") {
        Some(original) => json_to_value(original),
        None => Value::from(message.content.as_str()),
    };
    let head = [
        ("role", Value::from(message.role.as_str())),
        ("content", content),
    ];
    let extra = message
        .extra
        .iter()
        .filter(|(k, _)| k.as_str() != "role" && k.as_str() != "content")
        .map(|(k, v)| (k.as_str(), json_to_value(v)));
    Value::from_pairs(head.into_iter().chain(extra))
}

/// The `messages` list.
pub(crate) fn messages_to_value(messages: &[Message]) -> Value {
    Value::from(messages.iter().map(message_to_value).collect::<Vec<_>>())
}
