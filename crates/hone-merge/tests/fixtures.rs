//! Merging and combining the PEFT fixtures (`fixtures/peft`): merged weights and logits against
//! PEFT's `merge_and_unload` and against hone's own base + adapter, sharded and half-precision
//! output, combined adapters that load back (errors are in `errors.rs`).

use hone_model::Input;
use std::path::Path;

use burn::prelude::*;
use hone_merge::{combine_adapters, merge, parse_size, Combination, CombineOptions, Method};
use hone_model::{load_model_dir, Cpu, LoadOptions, WeightStore};

mod common;

use common::*;

fn reference(dir: &Path, which: &str) -> Vec<f32> {
    let store =
        WeightStore::open_files(&[dir.join(format!("refs/logits_{which}.safetensors"))]).unwrap();
    store.load_f32("logits", &[2, 32, 512]).unwrap()
}

/// hone's logits for the fixture inputs with `model` (+ `adapter`), f32 on the CPU.
fn logits(model: &Path, adapter: Option<&Path>, inputs_of: &Path) -> Vec<f32> {
    let device = Default::default();
    let mut loaded = load_model_dir::<Cpu>(model, &device, LoadOptions::default()).unwrap();
    if let Some(adapter) = adapter {
        loaded.model.load_adapter(adapter).unwrap();
    }
    let store = WeightStore::open_files(&[inputs_of.join("refs/inputs.safetensors")]).unwrap();
    let (ids, shape) = store.load_i64("input_ids").unwrap();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device);
    loaded
        .model
        .forward(Input::new(ids))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn merged_fixtures_match_peft_and_hone_with_the_adapter() {
    for name in FIXTURES {
        let dir = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let report = merge(&options(&dir, &[&dir.join("adapter")], &out)).unwrap();
        assert_eq!(report.method, Method::Linear);
        assert_eq!(
            report.merged_modules, 14,
            "{name}: 7 projections x 2 layers"
        );
        assert_eq!(report.dtype, hone_model::FloatDtype::F32);
        assert_eq!(entries(&out), MERGED_FILES);
        assert_eq!(read_json(&out.join("config.json"))["dtype"], "float32");

        // Tensor by tensor against PEFT's merge_and_unload + save_pretrained (same names: a tied
        // model has no lm_head.weight).
        assert_tensors_match(&out, &dir.join("merged"), 1e-6, name);

        let merged = logits(&out, None, &dir);
        let d_ref = max_diff(&merged, &reference(&dir, "merged"));
        let d_hone = max_diff(&merged, &logits(&dir, Some(&dir.join("adapter")), &dir));
        eprintln!(
            "{name}: merged logits vs PEFT merged {d_ref:e}, vs hone base+adapter {d_hone:e}"
        );
        assert!(d_ref <= 1e-4, "{name}: {d_ref}");
        assert!(d_hone <= 1e-5, "{name}: {d_hone}");
    }
}

#[test]
fn sharded_output_has_a_correct_index_and_loads_to_the_same_logits() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    merge(&options(&dir, &[&dir.join("adapter")], &single)).unwrap();
    let sharded = tmp.path().join("sharded");
    let mut opts = options(&dir, &[&dir.join("adapter")], &sharded);
    opts.max_shard_size = parse_size("100KB").unwrap();
    let report = merge(&opts).unwrap();
    let count = report.shards.len();
    assert!(
        count >= 4,
        "expected several shards, got {:?}",
        report.shards
    );
    assert!(!sharded.join("model.safetensors").exists());

    let index = read_json(&sharded.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut total = 0u64;
    let mut seen = 0;
    for (i, shard) in report.shards.iter().enumerate() {
        assert_eq!(
            shard.file,
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        );
        let bytes = std::fs::read(sharded.join(&shard.file)).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(metadata.metadata().as_ref().unwrap()["format"], "pt");
        let tensors = metadata.tensors();
        assert!(shard.bytes <= 100_000 || tensors.len() == 1, "{shard:?}");
        for (tensor, info) in tensors {
            assert_eq!(map[&tensor], shard.file.as_str(), "`{tensor}`");
            total += (info.data_offsets.1 - info.data_offsets.0) as u64;
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        map.len(),
        "the index lists exactly the stored tensors"
    );
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    assert_eq!(total, report.total_size);
    assert_eq!(
        total,
        data_bytes(&dir.join("model.safetensors")),
        "all of the base's tensors, in f32"
    );

    let d = max_diff(&logits(&sharded, None, &dir), &logits(&single, None, &dir));
    assert_eq!(d, 0.0, "same weights, same logits");
}

/// Bytes of tensor data in a safetensors file (its size less the 8-byte length and the header).
fn data_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes.len() as u64 - 8 - header_len(&bytes)
}

#[test]
fn half_precision_outputs_load_and_stay_close_to_f32() {
    let dir = fixture("qwen2_tied");
    let tmp = tempfile::tempdir().unwrap();
    let f32_out = tmp.path().join("f32");
    merge(&options(&dir, &[&dir.join("adapter")], &f32_out)).unwrap();
    let reference = logits(&f32_out, None, &dir);
    for (dtype, st_dtype, name, bound) in [
        (
            hone_model::FloatDtype::Bf16,
            safetensors::Dtype::BF16,
            "bfloat16",
            1e-2,
        ),
        (
            hone_model::FloatDtype::F16,
            safetensors::Dtype::F16,
            "float16",
            1e-3,
        ),
    ] {
        let out = tmp.path().join(name);
        let mut opts = options(&dir, &[&dir.join("adapter")], &out);
        opts.dtype = Some(dtype);
        merge(&opts).unwrap();
        assert_eq!(read_json(&out.join("config.json"))["dtype"], name);
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensors().iter().all(|(_, t)| t.dtype() == st_dtype));
        assert_eq!(
            bytes.len() as u64 - 8 - header_len(&bytes),
            data_bytes(&dir.join("model.safetensors")) / 2
        );
        let d = max_diff(&logits(&out, None, &dir), &reference);
        eprintln!("{name} output: logits differ from the f32 merge by at most {d:e}");
        assert!(d > 0.0 && d < bound, "{name}: {d}");
    }
}

fn header_len(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

#[test]
fn combinations_of_an_adapter_with_itself_reduce_to_the_adapter() {
    // cat: (0.25 + 0.75)·s·BA; linear: (2·√(0.25·s))² BA = s·BA; ties at density 1: the mean of
    // two equal values, √s·A and √s·B; cat with weights −1, 1: no change at all.
    let dir = fixture("llama_gqa");
    let adapter = dir.join("adapter");
    let with_adapter = logits(&dir, Some(&adapter), &dir);
    let base = reference(&dir, "base");
    let tmp = tempfile::tempdir().unwrap();
    for (i, (combo, expected, label)) in [
        (
            combination(Method::Cat, &[0.25, 0.75], None),
            &with_adapter,
            "cat",
        ),
        (
            combination(Method::Linear, &[0.25, 0.25], None),
            &with_adapter,
            "linear",
        ),
        (
            combination(Method::Ties, &[1.0, 1.0], Some(1.0)),
            &with_adapter,
            "ties",
        ),
        (
            combination(Method::Cat, &[-1.0, 1.0], None),
            &base,
            "cat -1, 1",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("m{i}"));
        let mut opts = options(&dir, &[&adapter, &adapter], &out);
        opts.combination = combo;
        merge(&opts).unwrap();
        let d = max_diff(&logits(&out, None, &dir), expected);
        assert!(d < 1e-5, "{label}: {d}");
    }
}

#[test]
fn combined_adapters_load_in_hone_and_equal_the_merge_of_the_same_combination() {
    let dir = fixture("qwen2_tied");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    // An adapter made different from the fixture's: the fixture's with weight −0.5 merged in.
    let other = tmp.path().join("other");
    combine_adapters(&CombineOptions {
        adapters: vec![adapter.clone()],
        combination: combination(Method::Linear, &[-0.5], None),
        out: other.clone(),
        force: false,
    })
    .unwrap();
    let config = read_json(&other.join("adapter_config.json"));
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some(8), Some(8.0))
    );
    assert_eq!(
        config["target_modules"],
        read_json(&adapter.join("adapter_config.json"))["target_modules"]
    );

    for (method, density, rank) in [
        (Method::Cat, None, 16),
        (Method::DareTies, Some(0.5), 8),
        (Method::Ties, Some(0.3), 8),
    ] {
        let combo = Combination {
            seed: 3,
            ..combination(method, &[1.0, 0.7], density)
        };
        let combined = tmp.path().join(format!("combined-{method}"));
        let report = combine_adapters(&CombineOptions {
            adapters: vec![adapter.clone(), other.clone()],
            combination: combo.clone(),
            out: combined.clone(),
            force: false,
        })
        .unwrap();
        assert_eq!(
            (report.method, report.rank, report.modules),
            (method, rank, 14)
        );
        let merged = tmp.path().join(format!("merged-{method}"));
        let mut opts = options(&dir, &[&adapter, &other], &merged);
        opts.combination = combo;
        merge(&opts).unwrap();
        let via_adapter = logits(&dir, Some(&combined), &dir);
        let d = max_diff(&via_adapter, &logits(&merged, None, &dir));
        assert!(d < 1e-5, "{method}: merged vs base + combined adapter: {d}");
        if method == Method::Cat {
            // s·BA − 0.5·0.7·s·BA.
            let d = max_diff(&via_adapter, &reference(&dir, "adapter"));
            assert!(
                d > 1e-2,
                "the combination must change the adapter's effect ({d})"
            );
        }
    }
}

#[test]
fn dare_is_reproducible_with_a_seed() {
    let dir = fixture("llama_gqa");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed: u64, name: &str| {
        let out = tmp.path().join(name);
        combine_adapters(&CombineOptions {
            adapters: vec![adapter.clone(), adapter.clone()],
            combination: Combination {
                seed,
                ..combination(Method::DareLinear, &[0.5, 0.5], Some(0.5))
            },
            out: out.clone(),
            force: false,
        })
        .unwrap();
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let (a, b, c) = (run(1, "a"), run(1, "b"), run(2, "c"));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn adapters_with_different_targets_combine_into_an_explicit_module_list() {
    let dir = fixture("llama_gqa");
    let adapter = dir.join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    // Only the q_proj tensors of the fixture adapter, scaled by 3 so it differs.
    let q_only = tmp.path().join("q_only");
    let mut config = fixture_config();
    config["target_modules"] = serde_json::json!(["q_proj"]);
    let tensors: Vec<_> = fixture_tensors(|_, _, values| values.iter_mut().for_each(|v| *v *= 3.0))
        .into_iter()
        .filter(|(n, _, _)| n.contains(".q_proj."))
        .collect();
    write_adapter(&q_only, &config, &tensors);
    let combined = tmp.path().join("combined");
    let combo = combination(Method::Linear, &[0.6, 0.4], None);
    combine_adapters(&CombineOptions {
        adapters: vec![adapter.clone(), q_only.clone()],
        combination: combo.clone(),
        out: combined.clone(),
        force: false,
    })
    .unwrap();
    let targets = read_json(&combined.join("adapter_config.json"))["target_modules"].clone();
    let targets: Vec<&str> = targets
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets.len(), 14);
    assert!(
        targets.contains(&"model.layers.1.self_attn.q_proj"),
        "{targets:?}"
    );
    assert!(
        targets.iter().all(|t| t.starts_with("model.layers.")),
        "{targets:?}"
    );
    let merged = tmp.path().join("merged");
    let mut opts = options(&dir, &[&adapter, &q_only], &merged);
    opts.combination = combo;
    merge(&opts).unwrap();
    let d = max_diff(
        &logits(&dir, Some(&combined), &dir),
        &logits(&merged, None, &dir),
    );
    assert!(d < 1e-5, "{d}");
}
