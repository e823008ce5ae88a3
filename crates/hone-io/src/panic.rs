//! The text of a panic caught by `catch_unwind` or returned by `JoinHandle::join`.

use std::any::Any;

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`), or a
/// placeholder for a payload of another type.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_of_str_string_and_other_payloads() {
        let literal: Box<dyn Any + Send> = Box::new("plain");
        let formatted: Box<dyn Any + Send> = Box::new(format!("step {}", 3));
        let other: Box<dyn Any + Send> = Box::new(7_u32);
        assert_eq!(panic_message(&*literal), "plain");
        assert_eq!(panic_message(&*formatted), "step 3");
        assert_eq!(panic_message(&*other), "a panic without a message");
    }
}
