//! The combination rules on tiny tensors whose expected results are worked out by hand in the
//! comments (from PEFT's definitions in `merge_utils.py` and `add_weighted_adapter`), and the
//! small pure helpers of the HF export (sizes, shard plan, name order).

use std::path::PathBuf;

use hone_merge::export::{natural_cmp, plan_shards, shard_file_name};
use hone_merge::methods::{
    dare_linear, dare_ties, magnitude_prune, magnitude_prune_merge, random_prune, task_arithmetic,
    ties,
};
use hone_merge::svd::quantile;
use hone_merge::{
    combine_factors, parse_size, Factors, LowRank, MajoritySign, MergeError, Method, ModuleRule,
    ModuleShape,
};

fn close(found: &[f32], expected: &[f64]) {
    assert_eq!(found.len(), expected.len(), "{found:?} vs {expected:?}");
    for (f, e) in found.iter().zip(expected) {
        assert!((*f as f64 - e).abs() < 1e-6, "{found:?} vs {expected:?}");
    }
}

const T1: [f32; 4] = [1.0, -2.0, 0.5, 3.0];
const T2: [f32; 4] = [-2.0, -1.0, 1.0, -1.0];

#[test]
fn task_arithmetic_is_the_weighted_sum() {
    // 2·t1 − t2 = [2 + 2, −4 + 1, 1 − 1, 6 + 1].
    let out = task_arithmetic(&[&T1, &T2], &[2.0, -1.0]);
    close(&out, &[4.0, -3.0, 0.0, 7.0]);
}

#[test]
fn magnitude_prune_keeps_the_largest_and_breaks_ties_by_position() {
    let t = [0.1, -3.0, 2.0, -0.5, 2.0, 1.0, 0.0, -4.0];
    // k = floor(0.25·8) = 2: |−4| (7), |−3| (1).
    close(
        &magnitude_prune(&t, 0.25),
        &[0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, -4.0],
    );
    // k = 3: then the first of the two 2s (index 2).
    close(
        &magnitude_prune(&t, 0.375),
        &[0.0, -3.0, 2.0, 0.0, 0.0, 0.0, 0.0, -4.0],
    );
    // k = 4: both 2s.
    close(
        &magnitude_prune(&t, 0.5),
        &[0.0, -3.0, 2.0, 0.0, 2.0, 0.0, 0.0, -4.0],
    );
    // k = floor(0.1·8) = 0: nothing kept; density 1: everything.
    close(&magnitude_prune(&t, 0.1), &[0.0; 8]);
    close(&magnitude_prune(&t, 1.0), &t.map(f64::from));
}

#[test]
fn ties_elects_signs_and_averages_the_agreeing_weighted_values() {
    // density 1 (no pruning), weights [1, 2], majority by total:
    //  0: 1 + (−2) = −1 → −; only t2 agrees: (2·−2)/1 = −4
    //  1: −3 → −; both: (1·−2 + 2·−1)/2 = −2
    //  2: 1.5 → +; both: (1·0.5 + 2·1)/2 = 1.25
    //  3: 2 → +; only t1: 3
    close(
        &ties(&[&T1, &T2], &[1.0, 2.0], 1.0, MajoritySign::Total),
        &[-4.0, -2.0, 1.25, 3.0],
    );
    // By frequency, element 0 has one + and one − → sum 0 → +: only t1: 1.
    close(
        &ties(&[&T1, &T2], &[1.0, 2.0], 1.0, MajoritySign::Frequency),
        &[1.0, -2.0, 1.25, 3.0],
    );
    // density 0.5 (k = 2): t1 → [0, −2, 0, 3], t2 → [−2, −1, 0, 0] (|−1| ties: index 1 first).
    //  0: −2 → −: t2: −4;  1: −3 → −: (−2 − 2)/2 = −2;  2: no value agrees with + → 0;  3: 3.
    close(
        &ties(&[&T1, &T2], &[1.0, 2.0], 0.5, MajoritySign::Total),
        &[-4.0, -2.0, 0.0, 3.0],
    );
}

#[test]
fn magnitude_prune_merge_prunes_then_sums() {
    // pruned as above: 1·[0, −2, 0, 3] + 2·[−2, −1, 0, 0].
    close(
        &magnitude_prune_merge(&[&T1, &T2], &[1.0, 2.0], 0.5),
        &[-4.0, -4.0, 0.0, 3.0],
    );
}

#[test]
fn dare_at_density_one_is_task_arithmetic_and_ties() {
    let seeds = [1, 2];
    // 1·t1 + 2·t2.
    close(
        &dare_linear(&[&T1, &T2], &[1.0, 2.0], 1.0, &seeds),
        &[-3.0, -4.0, 2.5, 1.0],
    );
    close(
        &dare_ties(&[&T1, &T2], &[1.0, 2.0], 1.0, MajoritySign::Total, &seeds),
        &[-4.0, -2.0, 1.25, 3.0],
    );
}

#[test]
fn random_prune_keeps_about_density_and_rescales_reproducibly() {
    let ones = vec![1f32; 20_000];
    let pruned = random_prune(&ones, 0.3, true, 7);
    let kept = pruned.iter().filter(|&&x| x != 0.0).count();
    assert!(
        (5_600..6_400).contains(&kept),
        "kept {kept} of 20000 at density 0.3"
    );
    assert!(pruned
        .iter()
        .all(|&x| x == 0.0 || (x - 1.0 / 0.3).abs() < 1e-6));
    assert_eq!(
        pruned,
        random_prune(&ones, 0.3, true, 7),
        "same seed, same mask"
    );
    assert_ne!(
        pruned,
        random_prune(&ones, 0.3, true, 8),
        "another seed, another mask"
    );
    let plain = random_prune(&ones, 0.3, false, 7);
    assert!(plain
        .iter()
        .zip(&pruned)
        .all(|(p, r)| (*p == 0.0) == (*r == 0.0) && (*p == 0.0 || *p == 1.0)));
}

#[test]
fn dare_merges_what_random_pruning_kept() {
    let t1: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    let t2: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 64) as f32 - 33.0) / 5.0)
        .collect();
    let (w, d, seeds) = ([0.5f32, -1.5f32], 0.5, [11u64, 12u64]);
    let p1 = random_prune(&t1, d, true, seeds[0]);
    let p2 = random_prune(&t2, d, true, seeds[1]);
    assert!(p1.contains(&0.0) && p1.iter().any(|&x| x != 0.0));
    let linear = dare_linear(&[&t1, &t2], &w, d, &seeds);
    let tied = dare_ties(&[&t1, &t2], &w, d, MajoritySign::Total, &seeds);
    for j in 0..64 {
        let expected = w[0] * p1[j] + w[1] * p2[j];
        assert!((linear[j] - expected).abs() < 1e-5);
        // TIES by hand: majority sign of p1 + p2; mean of the weighted agreeing values.
        let majority = if p1[j] + p2[j] >= 0.0 { 1.0 } else { -1.0 };
        let agree: Vec<f32> = [(p1[j], w[0]), (p2[j], w[1])]
            .iter()
            .filter(|(p, _)| *p != 0.0 && p.signum() == majority)
            .map(|(p, w)| p * w)
            .collect();
        let expected = agree.iter().sum::<f32>() / (agree.len().max(1) as f32);
        assert!(
            (tied[j] - expected).abs() < 1e-5,
            "{j}: {} vs {expected}",
            tied[j]
        );
    }
}

/// Two adapters of one 2×2 module:
/// adapter 1: r = 1, A = [[1, 2]], B = [[1], [0]], scale 2;
/// adapter 2: r = 1, A = [[3, −1]], B = [[0], [1]], scale 0.5. Weights [1, −2] → w·s = [2, −1].
fn two_adapters() -> Vec<(PathBuf, Option<Factors>)> {
    let shape = ModuleShape {
        rank: 1,
        in_features: 2,
        out_features: 2,
    };
    vec![
        (
            PathBuf::from("one"),
            Some(Factors {
                a: vec![1.0, 2.0],
                b: vec![1.0, 0.0],
                scale: 2.0,
                shape,
            }),
        ),
        (
            PathBuf::from("two"),
            Some(Factors {
                a: vec![3.0, -1.0],
                b: vec![0.0, 1.0],
                scale: 0.5,
                shape,
            }),
        ),
    ]
}

fn rule(method: Method, density: f64) -> ModuleRule {
    ModuleRule {
        method,
        density,
        majority_sign: MajoritySign::Total,
        svd_rank: 1,
        svd_clamp: None,
    }
}

fn combine(method: Method, density: f64) -> LowRank {
    combine_factors(
        "m",
        &two_adapters(),
        &[1.0, -2.0],
        &rule(method, density),
        &|i, _| i as u64,
    )
    .unwrap()
}

#[test]
fn cat_concatenates_ranks_and_sums_the_weighted_deltas() {
    let c = combine(Method::Cat, 1.0);
    assert_eq!(c.shape.rank, 2);
    // A' = [w1 s1 A1; w2 s2 A2] = [[2, 4], [−3, 1]], B' = [B1 | B2] = I.
    close(&c.a, &[2.0, 4.0, -3.0, 1.0]);
    close(&c.b, &[1.0, 0.0, 0.0, 1.0]);
    // W + B'A' = ones + 2·B1A1 − B2A2 = [[3, 5], [−2, 2]].
    let mut w = vec![1.0; 4];
    c.add_to(&mut w);
    close(&w, &[3.0, 5.0, -2.0, 2.0]);
}

#[test]
fn linear_weights_a_with_signed_roots_and_b_with_roots() {
    let c = combine(Method::Linear, 1.0);
    let r2 = 2f64.sqrt();
    // A' = √2·[1, 2] − 1·[3, −1];  B' = √2·[1, 0] + 1·[0, 1].
    close(&c.a, &[r2 - 3.0, 2.0 * r2 + 1.0]);
    close(&c.b, &[r2, 1.0]);
    let mut w = vec![0.0; 4];
    c.add_to(&mut w);
    // B'A' = [[√2(√2−3), √2(2√2+1)], [√2−3, 2√2+1]]: cross terms included, as in PEFT.
    close(&w, &[2.0 - 3.0 * r2, 4.0 + r2, r2 - 3.0, 2.0 * r2 + 1.0]);
}

#[test]
fn ties_on_factors_uses_the_same_root_weights() {
    let c = combine(Method::Ties, 1.0);
    let r2 = 2f64.sqrt();
    // A parts [1, 2], [3, −1] with weights [√2, −1]: element 0 sum 4 → +, both agree:
    // (√2·1 − 1·3)/2; element 1 sum 1 → +, only A1: √2·2.
    close(&c.a, &[(r2 - 3.0) / 2.0, 2.0 * r2]);
    // B parts [1, 0], [0, 1] with weights [√2, 1]: each element has one agreeing value.
    close(&c.b, &[r2, 1.0]);
}

#[test]
fn equal_rank_methods_refuse_different_ranks_on_a_module() {
    let mut factors = two_adapters();
    if let Some(f) = factors[1].1.as_mut() {
        f.shape.rank = 2;
        f.a = vec![3.0, -1.0, 0.0, 0.0];
        f.b = vec![0.0, 0.0, 1.0, 0.0];
    }
    let err = combine_factors(
        "m",
        &factors,
        &[1.0, 1.0],
        &rule(Method::Linear, 1.0),
        &|_, _| 0,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            MergeError::ModuleRankMismatch {
                first_rank: 1,
                other_rank: 2,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("one") && message.contains("two") && message.contains("`m`"),
        "{message}"
    );
    let cat = combine_factors(
        "m",
        &factors,
        &[1.0, 1.0],
        &rule(Method::Cat, 1.0),
        &|_, _| 0,
    )
    .unwrap();
    assert_eq!(cat.shape.rank, 3);
}

#[test]
fn only_the_adapters_targeting_a_module_contribute() {
    let mut factors = two_adapters();
    factors[1].1 = None;
    let c = combine_factors(
        "m",
        &factors,
        &[1.0, -2.0],
        &rule(Method::Cat, 1.0),
        &|_, _| 0,
    )
    .unwrap();
    assert_eq!(c.shape.rank, 1);
    close(&c.a, &[2.0, 4.0]);
}

#[test]
fn padding_adds_zero_rank_without_changing_the_delta() {
    let c = combine(Method::Cat, 1.0);
    let p = c.padded(4);
    assert_eq!((p.a.len(), p.b.len()), (8, 8));
    // B' rows [1, 0 | 0, 0] and [0, 1 | 0, 0].
    close(&p.b, &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    let (mut w1, mut w2) = (vec![0.0; 4], vec![0.0; 4]);
    c.add_to(&mut w1);
    p.add_to(&mut w2);
    assert_eq!(w1, w2);
}

#[test]
fn quantile_interpolates_like_torch() {
    let mut v = [4.0, 1.0, 3.0, 2.0];
    // Positions q·3 in [1, 2, 3, 4]: 0 → 1; 1.5 → 2.5; 2.7 → 3.7; 3 → 4.
    for (q, expected) in [(0.0, 1.0), (0.5, 2.5), (0.9, 3.7), (1.0, 4.0)] {
        let found = quantile(&mut v, q).unwrap();
        assert!((found - expected).abs() < 1e-12, "q {q}: {found}");
    }
    assert_eq!(quantile(&mut [], 0.5), None);
}

/// Two rank-1 adapters of a 3×4 module: `s_1 B_1 A_1 = 2 e1 e1ᵀ` and `s_2 B_2 A_2 = e2 e3ᵀ`; with
/// weights [1, −0.5] the combined delta is `2 e1 e1ᵀ − 0.5 e2 e3ᵀ`: singular values 2 and 0.5.
fn orthogonal_adapters() -> Vec<(PathBuf, Option<Factors>)> {
    let shape = ModuleShape {
        rank: 1,
        in_features: 4,
        out_features: 3,
    };
    let one = Factors {
        a: vec![1.0, 0.0, 0.0, 0.0],
        b: vec![1.0, 0.0, 0.0],
        scale: 2.0,
        shape,
    };
    let two = Factors {
        a: vec![0.0, 0.0, 1.0, 0.0],
        b: vec![0.0, 1.0, 0.0],
        scale: 1.0,
        shape,
    };
    vec![("one".into(), Some(one)), ("two".into(), Some(two))]
}

fn svd_combine(method: Method, rank: usize, clamp: Option<f64>) -> LowRank {
    let rule = ModuleRule {
        svd_rank: rank,
        svd_clamp: clamp,
        ..rule(method, 1.0)
    };
    combine_factors("m", &orthogonal_adapters(), &[1.0, -0.5], &rule, &|_, _| 0).unwrap()
}

#[test]
fn svd_methods_keep_the_largest_singular_triplets_with_fixed_signs() {
    // svd decomposes the rank-2 product; magnitude_prune_svd and dare_linear_svd at density 1
    // form the dense delta. All give B = U·S, A = Vᵀ with U's largest entry positive:
    // σ1 = 2: u = e1, v = e1; σ2 = 0.5: u = e2, v = −e3.
    for method in [
        Method::Svd,
        Method::MagnitudePruneSvd,
        Method::DareLinearSvd,
    ] {
        let c = svd_combine(method, 1, None);
        assert_eq!(c.shape.rank, 1);
        close(&c.b, &[2.0, 0.0, 0.0]);
        close(&c.a, &[1.0, 0.0, 0.0, 0.0]);
        let c = svd_combine(method, 2, None);
        close(&c.b, &[2.0, 0.0, 0.0, 0.5, 0.0, 0.0]);
        close(&c.a, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
        // Rank 5 > min(3, 4): three triplets (the last with σ = 0), zero-padded to rank 5.
        let c = svd_combine(method, 5, None);
        assert_eq!((c.a.len(), c.b.len()), (20, 15), "{method}");
        let mut w = vec![0.0; 12];
        c.add_to(&mut w);
        close(
            &w,
            &[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
    }
}

#[test]
fn svd_clamp_clamps_both_factors_at_the_quantile_of_their_entries() {
    // Rank 2: B = [[2, 0], [0, 0.5], [0, 0]], A = [[1, 0, 0, 0], [0, 0, −1, 0]]; the 14 entries
    // sorted are −1, ten 0s, 0.5, 1, 2. q = 0.9: position 11.7 → 0.5 + 0.7·(1 − 0.5) = 0.85, so
    // every entry is clamped to [−0.85, 0.85].
    let c = svd_combine(Method::Svd, 2, Some(0.9));
    close(&c.b, &[0.85, 0.0, 0.0, 0.5, 0.0, 0.0]);
    close(&c.a, &[0.85, 0.0, 0.0, 0.0, 0.0, 0.0, -0.85, 0.0]);
}

#[test]
fn svd_methods_combine_adapters_of_different_ranks() {
    // two' has rank 2 with a zero second column of B: the same delta as two.
    let mut factors = orthogonal_adapters();
    if let Some(f) = factors[1].1.as_mut() {
        f.shape.rank = 2;
        f.a = vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        f.b = vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    }
    let rule = ModuleRule {
        svd_rank: 2,
        ..rule(Method::TiesSvd, 1.0)
    };
    let c = combine_factors("m", &factors, &[1.0, -0.5], &rule, &|_, _| 0).unwrap();
    // TIES at density 1 on disjoint deltas: each element has one non-zero value, kept as is.
    close(&c.b, &[2.0, 0.0, 0.0, 0.5, 0.0, 0.0]);
    close(&c.a, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
}

#[test]
fn sizes_parse_like_transformers_max_shard_size() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("100KB").unwrap(), 100_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("1.5mb").unwrap(), 1_500_000);
    assert_eq!(parse_size("1234").unwrap(), 1234);
    for bad in ["", "GB", "5XB", "0", "-1MB"] {
        let err = parse_size(bad).unwrap_err();
        assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
    }
}

#[test]
fn shards_are_filled_in_order_and_big_tensors_stand_alone() {
    assert_eq!(plan_shards(&[40, 40, 40, 10], 100), vec![0..2, 2..4]);
    assert_eq!(plan_shards(&[150, 10, 10], 100), vec![0..1, 1..3]);
    assert_eq!(plan_shards(&[10, 150, 10], 100), vec![0..1, 1..2, 2..3]);
    assert_eq!(plan_shards(&[10, 10], 100), vec![0..2]);
    assert_eq!(shard_file_name(0, 1), "model.safetensors");
    assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
}

#[test]
fn layer_numbers_sort_numerically() {
    let mut names = vec![
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "lm_head.weight",
        "model.layers.2.input_layernorm.weight",
    ];
    names.sort_by(|a, b| natural_cmp(a, b));
    assert_eq!(
        names,
        [
            "lm_head.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.layers.10.mlp.up_proj.weight",
        ]
    );
}
