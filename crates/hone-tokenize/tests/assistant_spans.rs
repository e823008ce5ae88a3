//! Loss-mask spans on the real templates of the golden fixtures: each assistant span covers
//! exactly the assistant content (as the template prints it) and its end-of-turn marker.

mod common;

use common::{load_cases, load_template};
use hone_tokenize::{token_mask_from_offsets, ExtraContext, Message, TemplateError};

/// How a template prints an assistant turn: what precedes the content, whether the content is
/// stripped, and the marker that closes the turn.
struct Layout {
    folder: &'static str,
    header: &'static str,
    strips_content: bool,
    end_marker: &'static str,
}

const LAYOUTS: [Layout; 5] = [
    Layout {
        folder: "chatml",
        header: "<|im_start|>assistant\n",
        strips_content: true,
        end_marker: "<|im_end|>",
    },
    Layout {
        folder: "gemma-2-it",
        header: "<start_of_turn>model\n",
        strips_content: true,
        end_marker: "<end_of_turn>",
    },
    Layout {
        folder: "llama-3.2-instruct",
        header: "<|start_header_id|>assistant<|end_header_id|>\n\n",
        strips_content: true,
        end_marker: "<|eot_id|>",
    },
    Layout {
        folder: "mistral-nemo-instruct-2407",
        header: "[/INST]",
        strips_content: false,
        end_marker: "</s>",
    },
    Layout {
        folder: "smollm2-style-chatml-default-system",
        header: "<|im_start|>assistant\n",
        strips_content: false,
        end_marker: "<|im_end|>",
    },
];

/// Mistral's template moves the system prompt into the last user turn, so a conversation with
/// a system message and a later user turn cannot be split into stable prefixes.
fn mistral_moves_system_prompt(folder: &str, messages: &[Message]) -> bool {
    folder.starts_with("mistral")
        && messages.first().is_some_and(|m| m.role == "system")
        && messages.iter().filter(|m| m.role == "user").count() > 1
}

#[test]
fn spans_cover_assistant_content_and_end_of_turn_marker() {
    let mut checked = 0;
    for layout in &LAYOUTS {
        let template = load_template(layout.folder);
        for case in load_cases(layout.folder) {
            let Some(expected) = &case.expected else {
                continue;
            };
            if case.add_generation_prompt || !case.messages.iter().any(Message::is_assistant) {
                continue;
            }
            let label = format!("{}/{}", layout.folder, case.name);
            let result = template.render_with_assistant_spans(&case.messages, &case.extra_context);
            if mistral_moves_system_prompt(layout.folder, &case.messages) {
                assert!(
                    matches!(result, Err(TemplateError::NotPrefixStable { .. })),
                    "{label}: expected NotPrefixStable, got {result:?}"
                );
                continue;
            }
            let rendered = result.unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(&rendered.text, expected, "{label}: full rendering");
            let assistants: Vec<(usize, &Message)> = case
                .messages
                .iter()
                .enumerate()
                .filter(|(_, m)| m.is_assistant())
                .collect();
            assert_eq!(rendered.assistant_spans.len(), assistants.len(), "{label}");
            for (span, (index, message)) in rendered.assistant_spans.iter().zip(assistants) {
                assert_eq!(span.message_index, index, "{label}");
                let content = if layout.strips_content {
                    message.content.trim()
                } else {
                    message.content.as_str()
                };
                let want = format!("{content}{}", layout.end_marker);
                assert_eq!(
                    rendered.span_text(span),
                    want,
                    "{label}: span of message {index}"
                );
                assert!(
                    rendered.text[..span.start].ends_with(layout.header),
                    "{label}: span of message {index} must start right after {:?}",
                    layout.header
                );
                checked += 1;
            }
        }
    }
    // Conversations b, c, c2, d (agp=false) hold 1 + 2 + 2 + 1 assistant turns: 6 per
    // template, less b's one turn for Gemma (raises) and Mistral (system prompt moved).
    assert_eq!(checked, 5 * 6 - 2);
}

#[test]
fn mistral_with_system_prompt_is_reported_not_prefix_stable() {
    let template = load_template("mistral-nemo-instruct-2407");
    let msgs = [
        Message::system("Sys"),
        Message::user("Q1"),
        Message::assistant("A1"),
        Message::user("Q2"),
    ];
    let err = template
        .render_with_assistant_spans(&msgs, &ExtraContext::new())
        .unwrap_err();
    match &err {
        TemplateError::NotPrefixStable { message_index, .. } => assert_eq!(*message_index, 2),
        other => panic!("expected NotPrefixStable, got {other:?}"),
    }
    assert!(err.to_string().contains("mistral"), "{err}");
}

#[test]
fn template_errors_pass_through_span_rendering() {
    let template = load_template("gemma-2-it");
    let msgs = [
        Message::system("S"),
        Message::user("Q"),
        Message::assistant("A"),
    ];
    let err = template
        .render_with_assistant_spans(&msgs, &ExtraContext::new())
        .unwrap_err();
    assert!(
        matches!(&err, TemplateError::Raised { message, .. } if message == "System role not supported"),
        "{err:?}"
    );
}

#[test]
fn byte_offsets_turn_spans_into_a_token_mask() {
    let template = load_template("smollm2-style-chatml-default-system");
    let msgs = [Message::user("Hi"), Message::assistant("Yo")];
    let rendered = template
        .render_with_assistant_spans(&msgs, &ExtraContext::new())
        .unwrap();
    // A toy "tokenizer": special tokens and single characters, with byte offsets.
    let text = &rendered.text;
    let mut offsets = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let len = ["<|im_start|>", "<|im_end|>"]
            .iter()
            .find(|t| text[i..].starts_with(**t))
            .map(|t| t.len())
            .unwrap_or_else(|| text[i..].chars().next().map_or(1, char::len_utf8));
        offsets.push((i, i + len));
        i += len;
    }
    let mask = token_mask_from_offsets(&rendered.assistant_spans, &offsets);
    let trained: String = offsets
        .iter()
        .zip(&mask)
        .filter(|(_, m)| **m)
        .map(|((s, e), _)| &text[*s..*e])
        .collect();
    assert_eq!(trained, "Yo<|im_end|>");
}
