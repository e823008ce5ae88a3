//! Chat templates render exactly as Hugging Face transformers' `apply_chat_template`
//! (golden fixtures), and the built-in templates have the conventional layouts.

mod common;

use common::{describe_mismatch, load_cases, load_template, Case, FOLDERS};
use hone_tokenize::{
    BuiltinTemplate, ChatTemplate, ExtraContext, Message, SpecialTokens, TemplateError,
};

/// Checks one case; `Err` carries a readable description of the failure.
fn check_case(template: &ChatTemplate, case: &Case) -> Result<(), String> {
    let result = template.render(
        &case.messages,
        case.add_generation_prompt,
        &case.extra_context,
    );
    match (&case.expected, &case.expected_error, result) {
        (Some(expected), _, Ok(actual)) if &actual == expected => Ok(()),
        (Some(expected), _, Ok(actual)) => Err(describe_mismatch(expected, &actual)),
        (Some(_), _, Err(e)) => Err(format!("expected a rendering, got error: {e}")),
        (None, Some(message), Err(TemplateError::Raised { message: got, .. })) => {
            // transformers raised jinja2's TemplateError from raise_exception(message).
            let kind = case
                .expected_error_type
                .as_deref()
                .unwrap_or("TemplateError");
            if kind != "TemplateError" {
                return Err(format!("unsupported expected_error_type {kind:?}"));
            }
            if &got == message {
                Ok(())
            } else {
                Err(format!(
                    "expected raise_exception({message:?}), got ({got:?})"
                ))
            }
        }
        (None, Some(message), Err(e)) => Err(format!(
            "expected raise_exception({message:?}), got another error: {e}"
        )),
        (None, Some(message), Ok(actual)) => Err(format!(
            "expected raise_exception({message:?}), but it rendered {actual:?}"
        )),
        (None, None, _) => Err("case has neither `expected` nor `expected_error`".into()),
    }
}

/// Renders every case of a folder; panics listing each failing case.
fn check_folder(folder: &str) -> usize {
    let template = load_template(folder);
    let cases = load_cases(folder);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            check_case(&template, case)
                .err()
                .map(|why| format!("FAILED {folder}/{}: {why}", case.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn chatml_cases_match_transformers() {
    assert_eq!(check_folder("chatml"), 12);
}

#[test]
fn gemma_2_cases_match_transformers() {
    assert_eq!(check_folder("gemma-2-it"), 12);
}

#[test]
fn llama_3_2_cases_match_transformers() {
    assert_eq!(check_folder("llama-3.2-instruct"), 12);
}

#[test]
fn mistral_nemo_cases_match_transformers() {
    assert_eq!(check_folder("mistral-nemo-instruct-2407"), 12);
}

#[test]
fn smollm2_style_cases_match_transformers() {
    assert_eq!(check_folder("smollm2-style-chatml-default-system"), 12);
}

#[test]
fn every_fixture_folder_is_checked_and_there_are_sixty_cases() {
    let mut on_disk: Vec<String> = std::fs::read_dir(common::fixtures_dir())
        .expect("fixtures dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, FOLDERS, "a fixture folder has no test");
    let total: usize = FOLDERS.iter().map(|f| load_cases(f).len()).sum();
    let errors: usize = FOLDERS
        .iter()
        .flat_map(|f| load_cases(f))
        .filter(|c| c.expected_error.is_some())
        .count();
    assert_eq!((total, errors), (60, 4));
}

/// Cases rendered by jinja2 in transformers' configuration (see that folder's README).
#[test]
fn jinja2_reference_cases_match() {
    let dir = common::fixtures_dir().join("../jinja2_reference");
    let cases = common::load_cases_from(dir.join("cases.json"));
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let source = case.template.clone().unwrap_or_default();
            let template = match ChatTemplate::new(&case.name, source, case.special_tokens.clone())
            {
                Ok(t) => t.with_fixed_now(chrono_date(2024, 7, 26)),
                Err(e) => return Some(format!("FAILED {}: does not compile: {e}", case.name)),
            };
            check_case(&template, case)
                .err()
                .map(|why| format!("FAILED {}: {why}", case.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(cases.len(), 28);
}

#[test]
fn llama_3_2_without_date_string_prints_strftime_now() {
    let t = load_template("llama-3.2-instruct").with_fixed_now(chrono_date(2025, 1, 2));
    let got = t
        .render(&[Message::user("Hi")], true, &ExtraContext::new())
        .unwrap();
    assert!(got.contains("Today Date: 02 Jan 2025\n\n"), "{got:?}");
}

fn chrono_date(y: i32, m: u32, d: u32) -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(y, m, d)
        .and_then(|d| d.and_hms_opt(12, 0, 0))
        .expect("valid date")
}

#[test]
fn llama_3_2_renders_tools_and_tool_calls() {
    let t = load_template("llama-3.2-instruct");
    let mut extra = ExtraContext::new();
    extra.insert("date_string".into(), "26 Jul 2024".into());
    extra.insert(
        "tools".into(),
        serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    );
    let call = serde_json::json!([{"function": {"name": "f", "arguments": {"x": "é"}}}]);
    let msgs = [
        Message::user("Go"),
        Message::assistant("").with_field("tool_calls", call),
    ];
    let got = t.render(&msgs, false, &extra).unwrap();
    let tool_json = "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"f\",\n        \"parameters\": {}\n    }\n}";
    assert!(got.contains(tool_json), "{got}");
    assert!(
        got.ends_with(
            "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"f\", \"parameters\": {\"x\": \"é\"}}<|eot_id|>"
        ),
        "{got}"
    );
}

#[test]
fn named_template_lists_pick_default_unless_named() {
    let json = r#"{"chat_template": [
        {"name": "default", "template": "D{{ eos_token }}"},
        {"name": "tool_use", "template": "T{{ tools|length }}"}],
        "eos_token": {"content": "</s>", "special": true}}"#;
    let render = |name| {
        let t = ChatTemplate::from_tokenizer_config_str(json, "cfg", name).unwrap();
        let mut extra = ExtraContext::new();
        extra.insert("tools".into(), serde_json::json!([1, 2]));
        t.render(&[], false, &extra).unwrap()
    };
    assert_eq!(render(None), "D</s>");
    assert_eq!(render(Some("tool_use")), "T2");
    let err = ChatTemplate::from_tokenizer_config_str(json, "cfg", Some("rag")).unwrap_err();
    assert!(
        matches!(err, TemplateError::UnknownTemplateName { .. }),
        "{err}"
    );
}

#[test]
fn missing_template_is_a_clear_error() {
    let err = ChatTemplate::from_tokenizer_config_str(r#"{"eos_token": "</s>"}"#, "cfg", None)
        .unwrap_err();
    assert!(
        matches!(err, TemplateError::MissingTemplate { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chatml"), "{err}");
}

#[test]
fn model_dir_prefers_chat_template_jinja_and_reads_tokens_from_config() {
    let dir = std::env::temp_dir().join(format!("hone-tokenize-modeldir-{}", std::process::id()));
    let extra_dir = dir.join("additional_chat_templates");
    std::fs::create_dir_all(&extra_dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "from-config", "bos_token": "<s>"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ bos_token }}from-jinja\n",
    )
    .unwrap();
    std::fs::write(extra_dir.join("tool_use.jinja"), "tools").unwrap();
    let render = |source: &str| {
        let source = source.parse().unwrap();
        ChatTemplate::load(&source, &dir)
            .unwrap()
            .render(&[], false, &ExtraContext::new())
            .unwrap()
    };
    // jinja2 drops the single trailing newline of a template, as transformers does.
    assert_eq!(render("model"), "<s>from-jinja");
    assert_eq!(render("model:tool_use"), "tools");
    let err = ChatTemplate::load(&"model:rag".parse().unwrap(), &dir).unwrap_err();
    assert!(err.to_string().contains("tool_use"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---- built-in templates ----------------------------------------------------------------

fn conversation() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("Hi"),
        Message::assistant("Hello!"),
        Message::user("Bye"),
    ]
}

fn builtin(which: BuiltinTemplate, tokens: SpecialTokens) -> ChatTemplate {
    ChatTemplate::builtin(which, tokens).expect("built-in templates compile")
}

#[test]
fn builtin_chatml_layout() {
    let t = builtin(BuiltinTemplate::Chatml, SpecialTokens::default());
    let none = ExtraContext::new();
    let body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n";
    assert_eq!(t.render(&conversation(), false, &none).unwrap(), body);
    assert_eq!(
        t.render(&conversation(), true, &none).unwrap(),
        format!("{body}<|im_start|>assistant\n")
    );
    assert_eq!(t.special_tokens().eos_token.as_deref(), Some("<|im_end|>"));
}

#[test]
fn builtin_llama3_layout() {
    let t = builtin(BuiltinTemplate::Llama3, SpecialTokens::default());
    let none = ExtraContext::new();
    let body = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>";
    assert_eq!(t.render(&conversation(), false, &none).unwrap(), body);
    assert_eq!(
        t.render(&conversation(), true, &none).unwrap(),
        format!("{body}<|start_header_id|>assistant<|end_header_id|>\n\n")
    );
}

#[test]
fn builtin_alpaca_layout_uses_the_models_eos() {
    let tokens = SpecialTokens {
        eos_token: Some("</s>".into()),
        ..SpecialTokens::default()
    };
    let t = builtin(BuiltinTemplate::Alpaca, tokens);
    let none = ExtraContext::new();
    let single = [Message::user("Name a colour."), Message::assistant("Blue.")];
    assert_eq!(
        t.render(&single, false, &none).unwrap(),
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>"
    );
    assert_eq!(
        t.render(&single[..1], true, &none).unwrap(),
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    );
    assert_eq!(
        t.render(&conversation(), true, &none).unwrap(),
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n\
         ### Instruction:\nBye\n\n### Response:\n"
    );
    let err = t
        .render(&[Message::new("tool", "42")], false, &none)
        .unwrap_err();
    assert!(matches!(err, TemplateError::Raised { .. }), "{err}");
}

#[test]
fn builtin_templates_give_exact_assistant_spans() {
    let eos = SpecialTokens {
        eos_token: Some("</s>".into()),
        ..SpecialTokens::default()
    };
    let expected = [
        (BuiltinTemplate::Chatml, "Hello!<|im_end|>"),
        (BuiltinTemplate::Llama3, "Hello!<|eot_id|>"),
        (BuiltinTemplate::Alpaca, "Hello!</s>"),
    ];
    let mut msgs = conversation();
    msgs.push(Message::assistant("Bye."));
    for (which, first) in expected {
        let t = builtin(which, eos.clone());
        let r = t
            .render_with_assistant_spans(&msgs, &ExtraContext::new())
            .unwrap();
        let texts: Vec<&str> = r.assistant_spans.iter().map(|s| r.span_text(s)).collect();
        let second = first.replace("Hello!", "Bye.");
        assert_eq!(texts, [first, second.as_str()], "{which}");
        assert_eq!(r.assistant_spans[0].message_index, 2);
    }
}
