//! The GGUF reader against gguf-py: `fixtures/gguf/types.gguf` and the values gguf-py's
//! `gguf.quants.dequantize` decodes from it (`types.expected.safetensors`), both written by
//! `scripts/gguf_fixtures.py`; and the reader's errors on files built here byte by byte.

use hone_model::Input;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use hone_model::gguf::{GgmlType, GgufError, GgufFile, Value};
use hone_model::{load_model_dir, Cpu, LoadOptions, WeightStore};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

#[test]
fn every_tensor_type_decodes_bit_for_bit_as_gguf_py() {
    let file = GgufFile::open(&fixture("types.gguf")).unwrap();
    let bytes = std::fs::read(fixture("types.expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    let mut seen = Vec::new();
    for (name, view) in expected.tensors() {
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (got, shape) = file.tensor_f32(&name).unwrap();
        assert_eq!(shape, view.shape(), "{name}: shape");
        assert_eq!(got.len(), want.len(), "{name}: length");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name}[{i}]: hone {g}, gguf-py {w}"
            );
        }
        seen.push(file.tensor_info(&name).unwrap().ggml_type);
    }
    for ty in GgmlType::ALL {
        assert!(seen.contains(&ty), "the fixture has no {ty} tensor");
    }
}

/// Giving a tensor's pages back (what the loader does once it holds a copy) leaves every
/// tensor's bytes as they were, its own on a later read and its neighbours' on shared pages.
#[test]
fn released_tensor_pages_read_back_unchanged() {
    let file = GgufFile::open(&fixture("llama_gqa.gguf")).unwrap();
    let copies: Vec<(String, Vec<u8>)> = (file.tensors().iter())
        .map(|t| (t.name.clone(), file.tensor_bytes(&t.name).unwrap().to_vec()))
        .collect();
    // Some tensors span whole pages, so something is given back.
    assert!(copies.iter().any(|(_, b)| b.len() >= 2 * 4096));
    for (name, _) in copies.iter().step_by(2) {
        file.release_tensor_pages(name);
    }
    for (name, bytes) in &copies {
        assert!(file.tensor_bytes(name).unwrap() == &bytes[..], "{name}");
    }
}

#[test]
fn metadata_values_of_every_type_read_back() {
    let file = GgufFile::open(&fixture("types.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(file.get("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(file.get("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(file.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(file.get_u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(file.get("test.i32"), Some(&Value::I32(-2_000_000_000)));
    assert_eq!(
        file.get_u64("test.u64").unwrap(),
        18_000_000_000_000_000_000
    );
    assert_eq!(
        file.get("test.i64"),
        Some(&Value::I64(-9_000_000_000_000_000_000))
    );
    assert_eq!(file.get("test.f32"), Some(&Value::F32(0.1)));
    assert_eq!(file.get_f64("test.f64").unwrap(), 0.1);
    assert_eq!(file.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(file.get_str("test.string").unwrap(), "héllo\nworld");
    let strings: Vec<&str> = file
        .get_array("test.strings")
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strings, ["a", "", "ünï"]);
    let ints: Vec<i64> = file
        .get_array("test.ints")
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ints, [1, -2, 3]);
    // GGUF keeps dimensions innermost first; shape() is PyTorch's order.
    let t = file.tensor_info("t.q4_k").unwrap();
    assert_eq!(t.dims, [512, 3]);
    assert_eq!(t.shape(), [3, 512]);
}

#[test]
fn wrong_metadata_types_are_errors_naming_the_key() {
    let file = GgufFile::open(&fixture("types.gguf")).unwrap();
    let err = file.get_str("test.u32").unwrap_err().to_string();
    assert!(
        err.contains("test.u32") && err.contains("expected a string") && err.contains("uint32"),
        "{err}"
    );
    let err = file.get_u64("test.i8").unwrap_err().to_string();
    assert!(
        err.contains("test.i8") && err.contains("non-negative"),
        "{err}"
    );
    let err = file.get_u64("no.such.key").unwrap_err().to_string();
    assert!(
        err.contains("no.such.key") && err.contains("missing"),
        "{err}"
    );
    let err = file.tensor_f32("no.such.tensor").unwrap_err().to_string();
    assert!(err.contains("no.such.tensor"), "{err}");
}

/// A GGUF file built byte by byte: version, metadata pairs (raw type id + value bytes) and
/// tensors (name, dims, type id, offset), then `data` after 32-byte alignment.
struct Builder {
    version: u32,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: Vec<u8>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl Builder {
    fn new() -> Self {
        Self {
            version: 3,
            kv: vec![("general.architecture".into(), 8, gguf_string("llama"))],
            tensors: vec![("w".into(), vec![32, 2], 0, 0)],
            data: vec![0u8; 32 * 2 * 4],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend(gguf_string(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        for (name, dims, ty, offset) in &self.tensors {
            b.extend(gguf_string(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }

    fn open(&self, dir: &Path) -> Result<GgufFile, GgufError> {
        open_bytes(dir, &self.bytes())
    }
}

fn open_bytes(dir: &Path, bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path)
}

fn open_err(dir: &Path, bytes: &[u8]) -> String {
    open_bytes(dir, bytes).unwrap_err().to_string()
}

#[test]
fn a_hand_built_file_opens() {
    let dir = tempfile::tempdir().unwrap();
    let file = Builder::new().open(dir.path()).unwrap();
    let (values, shape) = file.tensor_f32("w").unwrap();
    assert_eq!(shape, [2, 32]);
    assert!(values.iter().all(|&v| v == 0.0));
}

#[test]
fn corrupt_files_are_errors_naming_the_file_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = Builder::new().bytes();

    let err = open_err(dir.path(), b"PK\x03\x04 not a gguf");
    assert!(
        err.contains("model.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );

    let mut v1 = Builder::new();
    v1.version = 1;
    let err = v1.open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("version 1") && err.contains("expected 2 or 3"),
        "{err}"
    );

    // Cut inside the header, and inside the tensor data.
    let err = open_err(dir.path(), &good[..40]);
    assert!(err.contains("truncated or corrupt"), "{err}");
    let err = open_err(dir.path(), &good[..good.len() - 8]);
    assert!(
        err.contains("tensor w") && err.contains("past the end"),
        "{err}"
    );

    // A tensor count no file could hold.
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open_err(dir.path(), &huge);
    assert!(err.contains("tensor count"), "{err}");
}

#[test]
fn unsupported_tensor_types_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Builder::new();
    b.tensors[0].2 = 10; // Q2_K
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tensor w") && err.contains("Q2_K is not supported") && err.contains("Q4_K"),
        "{err}"
    );
    b.tensors[0].2 = 999;
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("unknown ggml type id 999"), "{err}");
}

#[test]
fn misshapen_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Q8_0 blocks are 32 wide: an innermost dimension of 40 cannot be stored.
    let mut b = Builder::new();
    b.tensors[0] = ("w".into(), vec![40, 2], 8, 0);
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tensor w") && err.contains("block of 32"),
        "{err}"
    );
    // A misaligned offset.
    let mut b = Builder::new();
    b.tensors[0].3 = 4;
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("alignment"), "{err}");
    // A name given twice.
    let mut b = Builder::new();
    b.tensors.push(("w".into(), vec![32, 1], 0, 0));
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("appears twice"), "{err}");
    // Dimensions whose product overflows.
    let mut b = Builder::new();
    b.tensors[0].1 = vec![1 << 40, 1 << 40];
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("overflow"), "{err}");
}

#[test]
fn bad_metadata_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Builder::new();
    b.kv.push(("general.alignment".into(), 4, 24u32.to_le_bytes().to_vec()));
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("general.alignment") && err.contains("power of two"),
        "{err}"
    );
    let mut b = Builder::new();
    b.kv.push(("x.flag".into(), 7, vec![2]));
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("x.flag") && err.contains("bool"), "{err}");
    let mut b = Builder::new();
    b.kv.push(("x.odd".into(), 77, vec![]));
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("x.odd") && err.contains("unknown value type 77"),
        "{err}"
    );
    let mut b = Builder::new();
    b.kv.push(("x.bytes".into(), 8, {
        let mut v = 2u64.to_le_bytes().to_vec();
        v.extend_from_slice(&[0xff, 0xfe]);
        v
    }));
    let err = b.open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("x.bytes") && err.contains("UTF-8"), "{err}");
}

/// The real SmolLM2-135M-Instruct Q4_1 file from `scripts/fetch-models.sh`, when it is there:
/// the header the issue describes, and every tensor decodes to finite values. Reported as
/// SKIPPED (past the harness's capture) when the file has not been fetched.
#[test]
fn smollm2_q4_1_file_opens_and_decodes_when_fetched() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {} is absent (scripts/fetch-models.sh fetches it)",
            path.display()
        );
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let types: std::collections::BTreeSet<_> =
        file.tensors().iter().map(|t| t.ggml_type.name()).collect();
    assert_eq!(types, ["F32", "Q4_1", "Q8_0"].into_iter().collect());
    assert_eq!(
        file.tensor_info("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    for t in file.tensors() {
        let (v, shape) = file.tensor_f32(&t.name).unwrap();
        assert_eq!(v.len(), shape.iter().product::<usize>());
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
    }
}

fn peft_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/peft")
        .join(name)
}

/// The PEFT fixtures converted to F32 GGUF as llama.cpp converts them (tensor names, llama's
/// permuted q/k rows, the vocabulary in `tokenizer.ggml.*`), loaded through the same entry point
/// as a model directory: transformers' logits on the fixture's inputs, and transformers' ids on
/// its tokenization samples.
#[test]
fn gguf_conversions_of_the_peft_fixtures_match_transformers() {
    for name in ["llama_gqa", "qwen2_tied"] {
        let device = Default::default();
        let path = fixture(&format!("{name}.gguf"));
        let loaded = load_model_dir::<Cpu>(&path, &device, LoadOptions::default()).unwrap();
        assert!(
            loaded.report.unused.is_empty(),
            "{name}: unused {:?}",
            loaded.report.unused
        );
        let dir = peft_fixture(name);
        let store = WeightStore::open_files(&[dir.join("refs/inputs.safetensors")]).unwrap();
        let (ids, shape) = store.load_i64("input_ids").unwrap();
        let ids =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device);
        let logits: Vec<f32> = loaded
            .model
            .forward(Input::new(ids))
            .into_data()
            .to_vec()
            .unwrap();
        let refs = WeightStore::open_files(&[dir.join("refs/logits_base.safetensors")]).unwrap();
        let expected = refs
            .load_f32("logits", &refs.shape("logits").unwrap())
            .unwrap();
        assert_eq!(logits.len(), expected.len(), "{name}");
        let diff = logits
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "{name}: GGUF logits differ from transformers' by {diff}"
        );

        let text = std::fs::read_to_string(dir.join("refs/tokenization.json")).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in cases.as_array().unwrap() {
            let input = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                loaded.tokenizer.encode(input).unwrap(),
                expected,
                "{name}: ids of {input:?}"
            );
        }
    }
}

/// The un-permutation is what makes llama's attention right: the same file read with q/k rows as
/// stored gives other logits (so the test above can fail).
#[test]
fn llama_q_and_k_rows_are_permuted_in_gguf() {
    let file = GgufFile::open(&fixture("llama_gqa.gguf")).unwrap();
    let (stored, shape) = file.tensor_f32("blk.0.attn_q.weight").unwrap();
    let hf =
        WeightStore::open_files(&[peft_fixture("llama_gqa").join("model.safetensors")]).unwrap();
    let original = hf
        .load_f32("model.layers.0.self_attn.q_proj.weight", &shape)
        .unwrap();
    assert_ne!(stored, original, "llama.cpp's conversion permutes q rows");
    let config = hone_model::gguf::model_config(&file).unwrap();
    let weights = hone_model::gguf::GgufWeights::new(&file, &config).unwrap();
    let restored = hone_model::model::WeightSource::load_f32(
        &weights,
        "model.layers.0.self_attn.q_proj.weight",
        &shape,
    )
    .unwrap();
    assert_eq!(restored, original);
}

#[test]
fn gguf_metadata_gives_the_models_configuration() {
    let file = GgufFile::open(&fixture("llama_gqa.gguf")).unwrap();
    let from_gguf = hone_model::gguf::model_config(&file).unwrap();
    let from_json =
        hone_model::ModelConfig::from_file(&peft_fixture("llama_gqa").join("config.json")).unwrap();
    assert_eq!(from_gguf.hidden_size, from_json.hidden_size);
    assert_eq!(from_gguf.num_kv_heads, from_json.num_kv_heads);
    assert_eq!(from_gguf.head_dim, from_json.head_dim);
    // GGUF stores the epsilon as f32 (llama.cpp and transformers' GGUF loader use that value).
    assert_eq!(from_gguf.rms_norm_eps as f32, from_json.rms_norm_eps as f32);
    assert_eq!(from_gguf.rope_theta, from_json.rope_theta);
    assert_eq!(from_gguf.tie_word_embeddings, from_json.tie_word_embeddings);
    assert_eq!(
        from_gguf.max_position_embeddings,
        from_json.max_position_embeddings
    );
    let file = GgufFile::open(&fixture("qwen2_tied.gguf")).unwrap();
    let qwen = hone_model::gguf::model_config(&file).unwrap();
    assert!(qwen.tie_word_embeddings && qwen.qkv_bias);
}

/// Random bytes of `blocks` blocks of `ty` whose scale fields are finite f16s (and, for the
/// float types, finite values), seeded.
fn random_blocks(ty: GgmlType, elements: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f16 = |rng: &mut rand::rngs::StdRng| {
        half::f16::from_f32(rng.random_range(-0.05f32..0.05)).to_le_bytes()
    };
    match ty {
        GgmlType::F32 => (0..elements)
            .flat_map(|_| rng.random_range(-1f32..1.0).to_le_bytes())
            .collect(),
        GgmlType::F16 => (0..elements).flat_map(|_| f16(&mut rng)).collect(),
        GgmlType::BF16 => (0..elements)
            .flat_map(|_| half::bf16::from_f32(rng.random_range(-1f32..1.0)).to_le_bytes())
            .collect(),
        _ => {
            let (bs, bb) = (ty.block_size(), ty.block_bytes());
            let mut bytes: Vec<u8> = (0..elements / bs * bb).map(|_| rng.random()).collect();
            let scale_offsets: &[usize] = match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                GgmlType::Q6K => &[208],
                _ => &[0],
            };
            for block in bytes.chunks_exact_mut(bb) {
                for &o in scale_offsets {
                    block[o..o + 2].copy_from_slice(&f16(&mut rng));
                }
            }
            bytes
        }
    }
}

/// The quantized products equal `x · dequantize(W)ᵀ` (computed in f64 here) on both paths
/// (few rows: decoded in registers; many rows: tiles through gemm), for every type, and for the
/// 16-bit floats also at a width that is not a multiple of 8 (their tiles are converted and
/// transposed 8 × 8 at a time, the edges value by value).
#[test]
fn quantized_matmul_equals_the_product_with_dequantized_weights() {
    use hone_model::gguf::matmul::{matmul_quant, QuantMatrix, SMALL_M, TILE_ROWS};
    use hone_model::gguf::quant::dequantize;
    use rand::{Rng, SeedableRng};
    let shapes = GgmlType::ALL
        .into_iter()
        .map(|ty| (ty, 2 * TILE_ROWS + 13, 512))
        .chain([(GgmlType::F16, 37, 83), (GgmlType::BF16, 37, 83)]);
    for (t, (ty, rows, cols)) in shapes.enumerate() {
        let bytes = random_blocks(ty, rows * cols, t as u64);
        let mut w = vec![0f32; rows * cols];
        dequantize(ty, &bytes, &mut w);
        let matrix = QuantMatrix {
            ty,
            bytes: &bytes,
            rows,
            cols,
        };
        for m in [1, 3, SMALL_M, SMALL_M + 1, 37] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + m as u64);
            let x: Vec<f32> = (0..m * cols)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let y = matmul_quant(matrix, &x, m);
            for i in 0..m {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|k| x[i * cols + k] as f64 * w[r * cols + k] as f64)
                        .sum();
                    let scale: f64 = (0..cols)
                        .map(|k| (x[i * cols + k] as f64 * w[r * cols + k] as f64).abs())
                        .sum();
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale.max(1e-6),
                        "{ty} m={m} y[{i},{r}] = {got}, expected {want}"
                    );
                }
            }
        }
    }
}

/// Whether this CPU runs the 8-bit-activation kernels (AVX2 + FMA + F16C); elsewhere products
/// with `Activations::Q8` stay exact.
fn q8_kernels_run() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asserts `y [m, rows] = x [m, cols] · w [rows, cols]ᵀ`, computed in f64, within 1e-5 of the
/// sum of the terms' magnitudes; `what` names the case.
fn assert_product(y: &[f32], x: &[f32], w: &[f32], m: usize, [rows, cols]: [usize; 2], what: &str) {
    for i in 0..m {
        for r in 0..rows {
            let terms = (0..cols).map(|k| x[i * cols + k] as f64 * w[r * cols + k] as f64);
            let want: f64 = terms.clone().sum();
            let scale: f64 = terms.map(f64::abs).sum();
            let got = y[i * rows + r] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale.max(1e-6),
                "{what} m={m} y[{i},{r}] = {got}, expected {want}"
            );
        }
    }
}

/// The products with 8-bit activations (`Activations::Q8`: up to `SMALL_M` rows, decoding, and
/// more, prefill through packed eight-row groups) equal the f64 product of the dequantized
/// weights with the Q8_0 round trip of the inputs, for every block and K format, and the inputs
/// they multiply are the bytes of hone's Q8_0 quantizer (itself checked against gguf-py in
/// `gguf_quantize.rs`; 70 rows are quantized in parallel). Rows of `W` leave a partial group,
/// and the input rows partial blocks of four. Where the CPU has no AVX2 the path does not apply
/// and the product is the exact one.
#[test]
fn q8_activation_products_equal_the_product_with_q8_0_inputs() {
    use hone_model::gguf::int8::Q8Rows;
    use hone_model::gguf::matmul::{matmul_quant_with, Activations, QuantMatrix, TILE_ROWS};
    use hone_model::gguf::quant::dequantize;
    use hone_model::gguf::quantize::quantize;
    use rand::{Rng, SeedableRng};
    let covered = q8_kernels_run();
    let (rows, cols) = (2 * TILE_ROWS + 13, 512);
    // The block and K formats.
    let types = GgmlType::ALL.into_iter().filter(|ty| ty.is_quantized());
    assert_eq!(types.clone().count(), 8);
    for m in [1, 3, 5, 8, 9, 39, 70] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(300 + m as u64);
        // Rows of different magnitudes, an all-zero block and one dominated by a single value.
        let mut x: Vec<f32> = (0..m * cols)
            .map(|k| rng.random_range(-1f32..1.0) * (1 + k / cols) as f32)
            .collect();
        x[32..64].fill(0.0);
        x[64] = 40.0;
        let bytes = quantize(GgmlType::Q8_0, &x).unwrap();
        let xq = Q8Rows::quantize(&x, m, cols);
        for (b, block) in bytes.chunks_exact(34).enumerate() {
            assert_eq!(
                half::f16::from_f32(xq.d[b]).to_le_bytes(),
                block[..2],
                "m={m}: scale of block {b}"
            );
            let qs: Vec<u8> = xq.qs[b * 32..(b + 1) * 32]
                .iter()
                .map(|&q| q as u8)
                .collect();
            assert_eq!(qs, block[2..], "m={m}: values of block {b}");
        }
        let mut rounded = vec![0f32; m * cols];
        dequantize(GgmlType::Q8_0, &bytes, &mut rounded);
        let xs = if covered { &rounded } else { &x };
        for (t, ty) in types.clone().enumerate() {
            let wb = random_blocks(ty, rows * cols, 50 + t as u64);
            let mut w = vec![0f32; rows * cols];
            dequantize(ty, &wb, &mut w);
            let matrix = QuantMatrix {
                ty,
                bytes: &wb,
                rows,
                cols,
            };
            let y = matmul_quant_with(matrix, &x, m, Activations::Q8);
            assert_product(&y, xs, &w, m, [rows, cols], &ty.to_string());
        }
    }
}

/// Several products of one input run together (a layer's q/k/v when decoding: one parallel
/// loop, the input quantized once) give each weight the product it gets alone (itself checked
/// against f64 above), whatever the mix of formats, row counts and activations.
#[test]
fn products_run_together_equal_each_product_alone() {
    use hone_model::gguf::matmul::{
        matmul_quant_many, matmul_quant_with, Activations, QuantMatrix,
    };
    let cols = 512;
    let specs = [
        (GgmlType::Q4_0, 141, Activations::Q8),
        (GgmlType::Q8_0, 64, Activations::F32),
        (GgmlType::F16, 8, Activations::Q8),
        (GgmlType::Q6K, 27, Activations::Q8),
    ];
    let bytes: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, &(ty, rows, _))| random_blocks(ty, rows * cols, 70 + i as u64))
        .collect();
    let ws: Vec<(QuantMatrix<'_>, Activations)> = specs
        .iter()
        .zip(&bytes)
        .map(|(&(ty, rows, activations), bytes)| {
            let matrix = QuantMatrix {
                ty,
                bytes,
                rows,
                cols,
            };
            (matrix, activations)
        })
        .collect();
    for m in [1, 3, 8, 12] {
        let x: Vec<f32> = (0..m * cols)
            .map(|k| ((k * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let together = matmul_quant_many(&ws, &x, m);
        assert_eq!(together.len(), ws.len());
        for ((w, activations), y) in ws.iter().zip(&together) {
            let alone = matmul_quant_with(*w, &x, m, *activations);
            assert_eq!(y, &alone, "{} [{}, {cols}] m={m}", w.ty, w.rows);
        }
    }
}

/// A Q4_0, Q4_1, Q4_K or Q5_K weight given 8-bit activations keeps its rows regrouped by eight (one copy,
/// the file's size): its products, alone (decoding: 1 to 8 rows, in tasks of whole groups;
/// prefill: more) and run together with other weights, equal the f64 product of the dequantized
/// weights with the Q8_0 round trip of the inputs; and what reads rows (dequantizing, the input
/// gradient, going back to f32 activations) sees the file's rows.
#[test]
fn regrouped_weights_multiply_and_read_back_as_their_rows() {
    use hone_model::gguf::matmul::Activations;
    use hone_model::gguf::quant::dequantize;
    use hone_model::gguf::quantize::quantize;
    use hone_model::gguf::QuantWeight;
    let covered = q8_kernels_run();
    // More rows than one tile of the input gradient (256), and many tasks of the decoding loop;
    // whole 256-value blocks of the K formats.
    let (rows, cols) = (264, 768);
    for (t, ty) in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4K, GgmlType::Q5K]
        .into_iter()
        .enumerate()
    {
        let bytes = random_blocks(ty, rows * cols, 90 + t as u64);
        let mut w = vec![0f32; rows * cols];
        dequantize(ty, &bytes, &mut w);
        let exact = QuantWeight::new(ty, bytes.clone(), rows, cols).unwrap();
        let q8 = exact.clone().with_activations(Activations::Q8);
        let other = QuantWeight::new(
            GgmlType::Q8_0,
            random_blocks(GgmlType::Q8_0, 40 * cols, 7),
            40,
            cols,
        )
        .unwrap()
        .with_activations(Activations::Q8);
        assert_eq!(
            q8.byte_len(),
            bytes.len(),
            "{ty}: one copy of the file's size"
        );
        let decoded = q8.dequantize();
        let wrong = decoded
            .iter()
            .zip(&w)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            decoded.len() == w.len() && wrong.is_none(),
            "{ty}: dequantized value {wrong:?} differs"
        );
        for m in [1, 2, 5, 8, 9, 13] {
            // Two rows of one value (every input byte 127: the largest integer sums, which
            // 16-bit partial sums must not overflow), the others mixed.
            let x: Vec<f32> = (0..m * cols)
                .map(|k| match m {
                    2 => 1.0,
                    _ => (((k * 37) % 101) as f32 / 50.0 - 1.0) * (1 + k / cols) as f32,
                })
                .collect();
            let mut rounded = vec![0f32; m * cols];
            dequantize(
                GgmlType::Q8_0,
                &quantize(GgmlType::Q8_0, &x).unwrap(),
                &mut rounded,
            );
            let xs = if covered { &rounded } else { &x };
            let y = q8.matmul_nt(&x, m);
            assert_product(&y, xs, &w, m, [rows, cols], &ty.to_string());
            let together = QuantWeight::matmul_nt_many(&[&q8, &other, &q8], &x, m);
            assert_eq!(together[0], y, "{ty} m={m}: run together");
            assert_eq!(together[2], y, "{ty} m={m}: run together");
            assert_eq!(
                together[1],
                other.matmul_nt(&x, m),
                "{ty} m={m}: the other weight"
            );
            let g: Vec<f32> = (0..m * rows)
                .map(|k| ((k * 13) % 29) as f32 / 14.0 - 1.0)
                .collect();
            assert_eq!(
                q8.matmul_nn(&g, m),
                exact.matmul_nn(&g, m),
                "{ty} m={m}: input gradient"
            );
        }
        let back = q8.clone().with_activations(Activations::F32);
        let x: Vec<f32> = (0..3 * cols).map(|k| (k % 17) as f32 / 8.0 - 1.0).collect();
        assert_eq!(
            back.matmul_nt(&x, 3),
            exact.matmul_nt(&x, 3),
            "{ty}: back to f32 activations"
        );
    }
}

/// The dense f32 products of the generation path (few rows: each weight row streamed once;
/// many rows: transposed tiles through gemm) equal `x · Wᵀ` computed in f64, for widths that are
/// not multiples of the vector or tile sizes.
#[test]
fn dense_matmuls_equal_the_product() {
    use hone_model::gguf::matmul::{matmul_dense_few, matmul_dense_many, SMALL_M, TILE_ROWS};
    use rand::{Rng, SeedableRng};
    for (rows, cols) in [(2 * TILE_ROWS + 13, 512), (37, 83)] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        for m in [1, 3, SMALL_M, SMALL_M + 1, 37] {
            let x: Vec<f32> = (0..m * cols)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let y = if m <= SMALL_M {
                matmul_dense_few(&w, rows, cols, &x, m)
            } else {
                matmul_dense_many(&w, rows, cols, &x, m)
            };
            assert_product(&y, &x, &w, m, [rows, cols], &format!("[{rows}, {cols}]"));
        }
    }
}

/// Commands that take a model directory take a GGUF file through the same two calls: the path
/// resolves to itself (not to the folder holding it), and its configuration is the
/// directory's (`config.json`) for a file converted from that directory.
#[test]
fn a_gguf_path_is_a_model_for_resolve_and_model_config() {
    let gguf = fixture("llama_gqa.gguf");
    assert_eq!(hone_model::loader::resolve_model_dir(&gguf).unwrap(), gguf);
    let from_gguf = hone_model::loader::model_config(&gguf).unwrap();
    let dir = peft_fixture("llama_gqa");
    let from_dir = hone_model::loader::model_config(&dir).unwrap();
    assert_eq!(from_gguf.vocab_size, from_dir.vocab_size);
    assert_eq!(from_gguf.hidden_size, from_dir.hidden_size);
    assert_eq!(from_gguf.num_layers, from_dir.num_layers);
    assert_eq!(from_gguf.num_heads, from_dir.num_heads);
    assert_eq!(from_gguf.num_kv_heads, from_dir.num_kv_heads);
    assert_eq!(from_gguf.intermediate_size, from_dir.intermediate_size);
    // A file inside a model directory still stands for the directory.
    assert_eq!(
        hone_model::loader::resolve_model_dir(&dir.join("config.json")).unwrap(),
        dir
    );
}
