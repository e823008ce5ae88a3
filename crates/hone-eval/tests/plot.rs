//! Training-curve plots from a small metrics.jsonl.

use hone_eval::{plot_run, read_metrics, EvalError, METRICS_FILE};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

fn metrics_text() -> String {
    let mut text = String::new();
    for step in 1..=40u32 {
        let loss = 3.0 * (-(step as f64) / 15.0).exp() + 1.0;
        let lr = 1e-3 * (step as f64 / 5.0).min(1.0);
        text.push_str(&format!(
            "{{\"step\":{step},\"train/loss\":{loss},\"train/lr\":{lr},\"train/grad_norm\":1.5,\"note\":\"x\"}}\n"
        ));
        if step % 10 == 0 {
            text.push_str(&format!(
                "{{\"step\":{step},\"eval/loss\":{},\"eval/ppl\":{}}}\n",
                loss + 0.1,
                (loss + 0.1).exp()
            ));
        }
    }
    text
}

#[test]
fn loss_and_learning_rate_plots_are_valid_pngs() {
    let run = tempfile::tempdir().unwrap();
    std::fs::write(run.path().join(METRICS_FILE), metrics_text()).unwrap();
    let log = read_metrics(&run.path().join(METRICS_FILE)).unwrap();
    assert_eq!(log.series["train/loss"].len(), 40);
    assert_eq!(log.series["eval/loss"].len(), 4);
    assert!(
        !log.series.contains_key("note"),
        "non-numeric values are not series"
    );

    let out = tempfile::tempdir().unwrap();
    let files = plot_run(run.path(), out.path()).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["loss.png", "lr.png"]);
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{}", file.display());
        assert!(
            bytes.len() > 10_000,
            "{} has only {} bytes",
            file.display(),
            bytes.len()
        );
    }
    let entries = std::fs::read_dir(out.path()).unwrap().count();
    assert_eq!(entries, 2, "no temporary files left behind");
}

#[test]
fn bad_metrics_lines_are_named_by_line_and_key() {
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join(METRICS_FILE);
    std::fs::write(
        &path,
        "{\"step\":1,\"train/loss\":2.0}\n{\"train/loss\":1.0}\n",
    )
    .unwrap();
    let err = read_metrics(&path).unwrap_err();
    assert!(matches!(err, EvalError::Record { line: 2, .. }), "{err}");
    assert!(err.to_string().contains("`step`"), "{err}");

    std::fs::write(&path, "{\"step\":1,\"train/lr\":0.1}\n").unwrap();
    let err = plot_run(run.path(), run.path()).unwrap_err();
    assert!(err.to_string().contains("train/loss"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = plot_run(empty.path(), empty.path()).unwrap_err();
    assert!(err.to_string().contains(METRICS_FILE), "{err}");
}
