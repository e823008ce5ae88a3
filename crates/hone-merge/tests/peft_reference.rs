//! hone's adapter combinations against PEFT's own `add_weighted_adapter`
//! (`fixtures/peft_combine`, written by `scripts/peft_combine_reference.py`): the same three
//! adapters (ranks 8, 8, 4; scalings 2, 1, 2) combined by every deterministic method, compared
//! module by module as factors (element-wise methods) and as deltas `B A` (all methods; SVD
//! factors are only defined up to sign). DARE draws from torch's generator in PEFT, so the DARE
//! methods are checked by their properties.
//!
//! Tolerances. Element-wise methods do the same f32 operations as PEFT: 1e-6 (measured: 0, bit
//! for bit). SVD methods: PEFT decomposes in f32 (LAPACK), hone in f64; a rank-r truncation moves
//! by at most about `‖E‖ (1 + 2 σ_r / (σ_r − σ_{r+1}))` for a perturbation `E` of the decomposed
//! matrix. PEFT's backward error is a few f32 ulps of `σ_1` (≈ 1e-7 here, `σ_1` < 0.5) and the
//! worst module of the fixture has `σ_r ≈ 0.34`, `σ_r − σ_{r+1} ≈ 0.006` (meta.json), so the
//! bound is about 1e-5, the value asserted. Measured (printed with `--nocapture`): 8.6e-8 to
//! 1.0e-7 on `B A`, 6.6e-7 with a clamp (whose factors, not only their product, must agree).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hone_merge::{
    combine_adapters, merge, Adapter, Combination, CombineOptions, MajoritySign, Method, SvdOptions,
};
use hone_model::WeightStore;
use serde_json::Value;

mod common;

use common::*;

/// Element-wise methods: same f32 arithmetic as PEFT.
const EXACT: f64 = 1e-6;
/// SVD methods: f32 LAPACK vs f64 nalgebra (module docs).
const SVD: f64 = 1e-5;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft_combine")
}

/// The adapters of the fixture by PEFT adapter name.
fn adapter_dir(name: &str) -> PathBuf {
    match name {
        "one" => fixture("llama_gqa").join("adapter"),
        other => reference_dir().join(format!("adapter_{other}")),
    }
}

fn method(name: &str) -> Method {
    match name {
        "linear" => Method::Linear,
        "cat" => Method::Cat,
        "ties" => Method::Ties,
        "magnitude_prune" => Method::MagnitudePrune,
        "svd" => Method::Svd,
        "ties_svd" => Method::TiesSvd,
        "magnitude_prune_svd" => Method::MagnitudePruneSvd,
        other => panic!("no case for method {other}"),
    }
}

/// One `add_weighted_adapter` call of meta.json, as hone's options.
struct Case {
    name: String,
    adapters: Vec<PathBuf>,
    combination: Combination,
    /// r (= lora_alpha) of PEFT's result.
    rank: usize,
}

fn cases() -> Vec<Case> {
    let meta = read_json(&reference_dir().join("meta.json"));
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let f = |key: &str| c.get(key).and_then(Value::as_f64);
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                adapters: c["adapters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| adapter_dir(a.as_str().unwrap()))
                    .collect(),
                combination: Combination {
                    method: method(c["combination_type"].as_str().unwrap()),
                    weights: Some(
                        c["weights"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|w| w.as_f64().unwrap())
                            .collect(),
                    ),
                    density: f("density"),
                    majority_sign: match c.get("majority_sign_method").and_then(Value::as_str) {
                        Some("frequency") => MajoritySign::Frequency,
                        _ => MajoritySign::Total,
                    },
                    seed: 0,
                    svd: SvdOptions {
                        rank: c
                            .get("svd_rank")
                            .and_then(Value::as_u64)
                            .map(|r| r as usize),
                        clamp: f("svd_clamp"),
                    },
                },
                rank: c["r"].as_u64().unwrap() as usize,
            }
        })
        .collect()
}

fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

/// Every module's `(A, B, s · B A)` of an adapter directory, in f64.
type Modules = BTreeMap<String, (Vec<f64>, Vec<f64>, Vec<f64>)>;

fn modules(dir: &Path) -> Modules {
    let adapter = Adapter::open(dir).unwrap();
    adapter
        .modules()
        .keys()
        .map(|module| {
            let f = adapter.factors(module).unwrap().unwrap();
            let (r, n, m) = (f.shape.rank, f.shape.in_features, f.shape.out_features);
            let mut delta = vec![0f64; m * n];
            for o in 0..m {
                for k in 0..r {
                    let b = f.b[o * r + k] as f64 * f.scale;
                    for i in 0..n {
                        delta[o * n + i] += b * f.a[k * n + i] as f64;
                    }
                }
            }
            let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            (module.clone(), (widen(&f.a), widen(&f.b), delta))
        })
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Largest difference over all modules of the factors (`None` when not compared) and deltas.
fn compare(ours: &Modules, peft: &Modules, factors: bool) -> (Option<f64>, f64) {
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    let (mut factor_diff, mut delta_diff) = (0f64, 0f64);
    for (module, (a, b, d)) in ours {
        let (pa, pb, pd) = &peft[module];
        if factors {
            factor_diff = factor_diff.max(max_diff(a, pa)).max(max_diff(b, pb));
        }
        delta_diff = delta_diff.max(max_diff(d, pd));
    }
    (factors.then_some(factor_diff), delta_diff)
}

/// hone's combination of `case`, written as an adapter under `tmp`.
fn combine(case: &Case, tmp: &Path) -> PathBuf {
    let out = tmp.join(&case.name);
    let report = combine_adapters(&CombineOptions {
        adapters: case.adapters.clone(),
        combination: case.combination.clone(),
        out: out.clone(),
        force: false,
    })
    .unwrap();
    assert_eq!(report.rank, case.rank, "{}: rank", case.name);
    out
}

#[test]
fn combined_adapters_match_peft_add_weighted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    for case in cases() {
        let ours = combine(&case, tmp.path());
        let peft_dir = reference_dir().join("combined").join(&case.name);
        let (config, peft_config) = (
            read_json(&ours.join("adapter_config.json")),
            read_json(&peft_dir.join("adapter_config.json")),
        );
        for key in ["r", "lora_alpha"] {
            assert_eq!(
                config[key].as_f64(),
                peft_config[key].as_f64(),
                "{}: {key}",
                case.name
            );
        }
        let svd = case.combination.method.is_svd();
        // PEFT's SVD factors have LAPACK's signs, except svd_clamp's (saved with hone's).
        let same_signs = !svd || case.combination.svd.clamp.is_some();
        let (factors, delta) = compare(&modules(&ours), &modules(&peft_dir), same_signs);
        eprintln!(
            "{}: max |Δ| vs PEFT: factors {}, delta B·A {delta:e}",
            case.name,
            factors.map_or("not compared (SVD signs)".into(), |d| format!("{d:e}"))
        );
        let bound = if svd { SVD } else { EXACT };
        assert!(
            factors.unwrap_or(0.0) <= bound,
            "{}: {factors:?}",
            case.name
        );
        assert!(delta <= bound, "{}: {delta}", case.name);
    }
}

#[test]
fn svd_merges_match_peft_deltas() {
    // `hone merge` with an SVD method adds what PEFT's combined adapter holds to each weight.
    let case = case("ties_svd");
    let base = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let adapters: Vec<&Path> = case.adapters.iter().map(PathBuf::as_path).collect();
    let mut opts = options(&base, &adapters, &out);
    opts.combination = case.combination.clone();
    let report = merge(&opts).unwrap();
    assert_eq!(
        (report.method, report.merged_modules),
        (Method::TiesSvd, 14)
    );
    let (before, after) = (
        WeightStore::open_dir(&base).unwrap(),
        WeightStore::open_dir(&out).unwrap(),
    );
    let peft = modules(&reference_dir().join("combined/ties_svd"));
    let mut worst = 0f64;
    for (module, (_, _, delta)) in &peft {
        let name = format!("{module}.weight");
        let shape = before.shape(&name).unwrap();
        let (w0, w1) = (
            before.load_f32(&name, &shape).unwrap(),
            after.load_f32(&name, &shape).unwrap(),
        );
        let added: Vec<f64> = w1.iter().zip(&w0).map(|(a, b)| (a - b) as f64).collect();
        worst = worst.max(max_diff(&added, delta));
    }
    eprintln!("ties_svd merge: max |(W' − W) − PEFT's B·A| = {worst:e}");
    assert!(worst <= SVD, "{worst}");
}

#[test]
fn svd_at_full_rank_reproduces_peft_cat_exactly() {
    // cat's B·A is Σ w_i s_i B_i A_i; svd of the same adapters keeping all 8 + 4 ranks loses
    // nothing, so it must give the same delta up to rounding.
    let cat = case("cat");
    let tmp = tempfile::tempdir().unwrap();
    let svd = Case {
        name: "svd_full".into(),
        rank: 12,
        combination: Combination {
            method: Method::Svd,
            svd: SvdOptions {
                rank: Some(12),
                clamp: None,
            },
            ..cat.combination.clone()
        },
        adapters: cat.adapters.clone(),
    };
    let ours = modules(&combine(&svd, tmp.path()));
    let (_, delta) = compare(
        &ours,
        &modules(&reference_dir().join("combined/cat")),
        false,
    );
    eprintln!("svd at rank 12 vs PEFT's cat: max |Δ B·A| = {delta:e}");
    assert!(delta <= EXACT, "{delta}");
}

/// `case` with another method and density, written under `tmp/name`.
fn variant(case: &Case, name: &str, method: Method, density: Option<f64>, seed: u64) -> Case {
    Case {
        name: name.into(),
        adapters: case.adapters.clone(),
        rank: case.rank,
        combination: Combination {
            method,
            density,
            seed,
            ..case.combination.clone()
        },
    }
}

#[test]
fn dare_svd_methods_at_density_one_are_their_deterministic_counterparts() {
    let tmp = tempfile::tempdir().unwrap();
    // dare_linear_svd keeps everything at density 1: PEFT's svd (and through the dense SVD,
    // where hone's svd decomposes the low-rank product).
    let svd = case("svd");
    let ours = combine(
        &variant(&svd, "dare_linear_svd", Method::DareLinearSvd, Some(1.0), 0),
        tmp.path(),
    );
    let (_, delta) = compare(
        &modules(&ours),
        &modules(&reference_dir().join("combined/svd")),
        false,
    );
    eprintln!("dare_linear_svd at density 1 vs PEFT's svd: max |Δ B·A| = {delta:e}");
    assert!(delta <= SVD, "{delta}");
    // dare_ties_svd at density 1 is ties_svd at density 1, bit for bit.
    let ties = case("ties_svd");
    let a = combine(
        &variant(&ties, "dare_ties_svd", Method::DareTiesSvd, Some(1.0), 0),
        tmp.path(),
    );
    let b = combine(
        &variant(&ties, "ties_svd_1", Method::TiesSvd, Some(1.0), 0),
        tmp.path(),
    );
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap()
    );
}

/// cos of the angle between two sets of deltas (flattened).
fn cosine(a: &Modules, b: &Modules) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (module, (_, _, x)) in a {
        for (x, y) in x.iter().zip(&b[module].2) {
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
    }
    ab / (aa * bb).sqrt()
}

#[test]
fn dare_svd_methods_are_seeded_low_rank_approximations_of_the_combination() {
    let tmp = tempfile::tempdir().unwrap();
    let svd = case("svd");
    let reference = modules(&reference_dir().join("combined/svd"));
    for (method, name) in [
        (Method::DareLinearSvd, "dare_linear_svd"),
        (Method::DareTiesSvd, "dare_ties_svd"),
    ] {
        let run = |seed: u64, tag: &str| {
            combine(
                &variant(&svd, &format!("{name}-{tag}"), method, Some(0.5), seed),
                tmp.path(),
            )
        };
        let (a, b, c) = (run(1, "a"), run(1, "b"), run(2, "c"));
        let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        assert_eq!(bytes(&a), bytes(&b), "{name}: same seed, same adapter");
        assert_ne!(
            bytes(&a),
            bytes(&c),
            "{name}: another seed, another adapter"
        );
        // Still mostly the same update (at rank 8, like PEFT's svd): DARE's pruning noise
        // spreads over all singular directions, the truncation keeps the strong ones.
        let ours = modules(&a);
        let cos = cosine(&ours, &reference);
        eprintln!("{name} at density 0.5: cosine to PEFT's svd delta {cos:.3}");
        assert!(cos > 0.5 && cos < 0.999, "{name}: {cos}");
    }
}
