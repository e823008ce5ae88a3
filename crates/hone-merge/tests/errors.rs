//! The errors a user can run into when merging or combining adapters: adapters for another base,
//! unequal ranks, bad arguments, an existing output, a failed write. Each names what is wrong and
//! leaves nothing behind.

mod common;

use common::*;
use hone_merge::{
    combine_adapters, merge, Combination, CombineOptions, MergeError, MergeOptions, Method,
    SvdOptions,
};
use hone_model::WeightStore;

const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

#[test]
fn adapters_for_another_base_are_refused_naming_the_tensor() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    // lora_A of layer 0's q_proj is [8, 32] where the base's q_proj takes 64 inputs.
    let narrow = tmp.path().join("narrow");
    write_adapter(
        &narrow,
        &fixture_config(),
        &fixture_tensors(|n, shape, values| {
            if n == format!("{Q0}.lora_A.weight") {
                *shape = vec![8, 32];
                values.truncate(8 * 32);
            }
        }),
    );
    let out = tmp.path().join("out");
    let err = merge(&options(&dir, &[&narrow], &out)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, MergeError::ShapeMismatch { .. }), "{message}");
    assert!(
        message.contains(&format!("{Q0}.lora_A.weight"))
            && message.contains("[8, 64]")
            && message.contains("[8, 32]"),
        "{message}"
    );

    // A module the base does not have (layer 5 of a 2-layer model).
    let deep = tmp.path().join("deep");
    let mut tensors = fixture_tensors(|_, _, _| {});
    for t in &mut tensors {
        t.0 = t.0.replace("layers.1.", "layers.5.");
    }
    write_adapter(&deep, &fixture_config(), &tensors);
    let err = merge(&options(&dir, &[&deep], &out)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, MergeError::NotInBase { .. }), "{message}");
    assert!(
        message.contains("model.layers.5.") && message.contains("has no 2-D tensor"),
        "{message}"
    );
    assert!(!out.exists());
}

#[test]
fn equal_rank_methods_name_the_adapters_and_their_ranks() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("rank4");
    let mut config = fixture_config();
    config["r"] = 4.into();
    let tensors = fixture_tensors(|n, shape, values| {
        if n.ends_with("lora_A.weight") {
            shape[0] = 4;
            values.truncate(4 * shape[1]);
        } else {
            let r = shape[1];
            *values = values.chunks(r).flat_map(|row| row[..4].to_vec()).collect();
            shape[1] = 4;
        }
    });
    write_adapter(&small, &config, &tensors);
    let adapter = dir.join("adapter");
    for method in [Method::Linear, Method::Ties, Method::DareLinear] {
        let density = method.uses_density().then_some(0.5);
        let err = combine_adapters(&CombineOptions {
            adapters: vec![adapter.clone(), small.clone()],
            combination: combination(method, &[1.0, 1.0], density),
            out: tmp.path().join("out"),
            force: false,
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(
                err,
                MergeError::RankMismatch {
                    first_rank: 8,
                    other_rank: 4,
                    ..
                }
            ),
            "{message}"
        );
        assert!(
            message.contains("rank4") && message.contains("r=8") && message.contains("r=4"),
            "{message}"
        );
    }
    // cat accepts them: rank 8 + 4, and the result merges like the sum of both deltas.
    let out = tmp.path().join("cat");
    let report = combine_adapters(&CombineOptions {
        adapters: vec![adapter.clone(), small.clone()],
        combination: combination(Method::Cat, &[1.0, 1.0], None),
        out: out.clone(),
        force: false,
    })
    .unwrap();
    assert_eq!(report.rank, 12);
    let store = WeightStore::open_files(&[out.join("adapter_model.safetensors")]).unwrap();
    assert_eq!(
        store.shape(&format!("{Q0}.lora_A.weight")).unwrap(),
        [12, 64]
    );
    assert_eq!(
        store.shape(&format!("{Q0}.lora_B.weight")).unwrap(),
        [64, 12]
    );
    let (settings, _) = hone_model::adapter::read_adapter_config(&out).unwrap();
    assert_eq!((settings.r, settings.alpha), (12, 12.0));
    // So do the SVD methods, at the largest rank unless told otherwise.
    for (rank, expected) in [(None, 8), (Some(5), 5)] {
        let report = combine_adapters(&CombineOptions {
            adapters: vec![adapter.clone(), small.clone()],
            combination: Combination {
                svd: SvdOptions { rank, clamp: None },
                ..combination(Method::MagnitudePruneSvd, &[1.0, 1.0], Some(0.5))
            },
            out: tmp.path().join(format!("svd-{expected}")),
            force: false,
        })
        .unwrap();
        assert_eq!(report.rank, expected);
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_is_written() {
    let dir = fixture("llama_gqa");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut opts = options(&dir, &[&adapter, &adapter], &out);
    opts.combination = combination(Method::Cat, &[1.0], None);
    let err = merge(&opts).unwrap_err();
    assert!(
        matches!(
            err,
            MergeError::WeightsCount {
                weights: 1,
                adapters: 2
            }
        ),
        "{err}"
    );
    opts.combination = combination(Method::Ties, &[1.0, 1.0], None);
    let err = merge(&opts).unwrap_err();
    assert!(
        err.to_string().contains("density") && err.to_string().contains("ties"),
        "{err}"
    );
    opts.combination = combination(Method::Ties, &[1.0, 1.0], Some(1.5));
    assert!(matches!(
        merge(&opts).unwrap_err(),
        MergeError::Density { .. }
    ));
    opts.combination = combination(Method::TiesSvd, &[1.0, 1.0], None);
    assert!(matches!(
        merge(&opts).unwrap_err(),
        MergeError::Density { .. }
    ));
    opts.combination = combination(Method::Svd, &[1.0, 1.0], Some(0.5));
    assert!(matches!(
        merge(&opts).unwrap_err(),
        MergeError::Density { .. }
    ));
    for (method, rank, clamp, needle) in [
        (Method::Linear, Some(4), None, "only used by svd"),
        (Method::Cat, None, Some(0.9), "only used by svd"),
        (Method::Svd, Some(0), None, "at least 1"),
        (Method::Svd, None, Some(1.5), "quantile in [0, 1]"),
        (Method::Svd, None, Some(f64::NAN), "quantile in [0, 1]"),
    ] {
        opts.combination = Combination {
            svd: SvdOptions { rank, clamp },
            ..combination(method, &[1.0, 1.0], None)
        };
        let err = merge(&opts).unwrap_err();
        assert!(
            matches!(err, MergeError::SvdSetting { .. }) && err.to_string().contains(needle),
            "{method}: {err}"
        );
    }
    opts.combination = combination(Method::Linear, &[1.0, f64::NAN], None);
    assert!(matches!(
        merge(&opts).unwrap_err(),
        MergeError::InvalidWeight { index: 1, .. }
    ));
    // The output is the base itself.
    let err = merge(&MergeOptions {
        force: true,
        ..options(&dir, &[&adapter], &dir)
    })
    .unwrap_err();
    assert!(matches!(err, MergeError::OutputIsInput { .. }), "{err}");
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn an_existing_output_is_kept_without_force_and_replaced_with_it() {
    let dir = fixture("qwen2_tied");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = merge(&options(&dir, &[&dir.join("adapter")], &out)).unwrap_err();
    assert!(
        matches!(err, MergeError::OutputExists { .. }) && err.to_string().contains("--force"),
        "{err}"
    );
    assert_eq!(entries(&out), ["keep.txt"]);
    assert_eq!(entries(tmp.path()), ["out"]);
    merge(&MergeOptions {
        force: true,
        ..options(&dir, &[&dir.join("adapter")], &out)
    })
    .unwrap();
    assert!(out.join("model.safetensors").is_file() && !out.join("keep.txt").exists());
    assert_eq!(
        entries(tmp.path()),
        ["out"],
        "no temporary or replaced directory left"
    );
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let dir = fixture("qwen2_tied");
    let tmp = tempfile::tempdir().unwrap();
    // The output's parent is a regular file: creating the directory fails (for root too).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let err = merge(&options(
        &dir,
        &[&dir.join("adapter")],
        &blocker.join("out"),
    ))
    .unwrap_err();
    assert!(matches!(err, MergeError::Io { .. }), "{err}");
    assert!(err.to_string().contains("file"), "{err}");
    assert_eq!(entries(tmp.path()), ["file"]);
}

/// Copies the files (not subdirectories) of `from` into a new directory `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Regression: `--out RUN --adapter RUN/adapter --force` deleted the training run, and an
/// `--out` that is a parent of `--model` deleted the base model.
#[test]
fn an_output_that_contains_an_input_is_refused_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("models/base");
    copy_dir(&fixture("llama_gqa"), &base);
    let run = tmp.path().join("run");
    let adapter = run.join("adapter");
    copy_dir(&fixture("llama_gqa").join("adapter"), &adapter);

    for (out, what, input) in [
        (run.clone(), "adapter", &adapter),
        (tmp.path().join("models"), "base model", &base),
        // Spelled with `..`: compared as canonical paths.
        (run.join("adapter/.."), "adapter", &adapter),
    ] {
        let err = merge(&MergeOptions {
            force: true,
            ..options(&base, &[&adapter], &out)
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, MergeError::OutputIsInput { .. })
                && message.contains(&format!("the {what} {}", input.display()))
                && message.contains("even with --force")
                && !message.contains("the an "),
            "{message}"
        );
    }
    let err = combine_adapters(&CombineOptions {
        adapters: vec![adapter.clone()],
        combination: Combination::default(),
        out: run.clone(),
        force: true,
    })
    .unwrap_err();
    assert!(matches!(err, MergeError::OutputIsInput { .. }), "{err}");
    // Everything is still there.
    assert_eq!(
        entries(&adapter),
        entries(&fixture("llama_gqa").join("adapter"))
    );
    assert!(base.join("model.safetensors").is_file() && base.join("config.json").is_file());

    // An output beside the inputs is fine.
    merge(&options(&base, &[&adapter], &run.join("merged"))).unwrap();
    assert!(run.join("merged/model.safetensors").is_file());
}

/// A NaN in an adapter would turn the merged weights into NaN: refused, naming the tensor.
#[test]
fn an_adapter_holding_nan_is_refused_naming_the_tensor() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("nan");
    let key = format!("{Q0}.lora_B.weight");
    write_adapter(
        &bad,
        &fixture_config(),
        &fixture_tensors(|n, _, values| {
            if n == key {
                values[3] = f32::NAN;
            }
        }),
    );
    let out = tmp.path().join("out");
    let err = merge(&options(&dir, &[&bad], &out)).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&key) && message.contains("not finite"),
        "{message}"
    );
    assert!(!out.exists());
}
