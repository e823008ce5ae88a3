//! The GGUF writer and quantizers against gguf-py: rewriting a file gguf-py wrote gives its
//! bytes back, and `quantize` gives the bytes of `gguf.quants.quantize` on the inputs of
//! `fixtures/gguf/quantize/refs.gguf` (`scripts/gguf_quantize_refs.py`).

use std::path::{Path, PathBuf};

use hone_model::gguf::quantize::quantize;
use hone_model::gguf::write::{write, TensorSpec};
use hone_model::gguf::{GgmlType, GgufError, GgufFile, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

/// Writes `file`'s metadata and tensors again with hone's writer.
fn rewrite(file: &GgufFile) -> Vec<u8> {
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape(),
            ty: t.ggml_type,
        })
        .collect();
    let mut out = Vec::new();
    write::<GgufError>(
        Path::new("rewrite.gguf"),
        &mut out,
        file.metadata(),
        &specs,
        |_, t| Ok(file.tensor_bytes(&t.name)?.to_vec()),
    )
    .unwrap();
    out
}

#[test]
fn rewriting_files_gguf_py_wrote_gives_their_bytes() {
    // types.gguf has metadata of every value type (arrays of strings and of integers among
    // them) and a tensor of every type hone reads.
    for name in ["types.gguf", "quantize/refs.gguf", "llama_gqa_quant.gguf"] {
        let path = fixture(name);
        let file = GgufFile::open(&path).unwrap();
        let original = std::fs::read(&path).unwrap();
        let again = rewrite(&file);
        assert_eq!(again.len(), original.len(), "{name}: length");
        let first_difference = again.iter().zip(&original).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{name}: first differing byte");
    }
}

#[test]
fn quantized_bytes_equal_gguf_py_quantize() {
    let file = GgufFile::open(&fixture("quantize/refs.gguf")).unwrap();
    let (input, shape) = file.tensor_f32("input").unwrap();
    assert_eq!(shape[1], 512);
    let mut checked = 0;
    for t in file.tensors().iter().filter(|t| t.name.starts_with("q.")) {
        let want = file.tensor_bytes(&t.name).unwrap();
        let got = quantize(t.ggml_type, &input).unwrap();
        assert_eq!(got.len(), want.len(), "{}: length", t.name);
        let bb = t.ggml_type.block_bytes();
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            let block = i / bb;
            panic!(
                "{}: block {block} (values {}..{}) differs at byte {}: hone {:?}, gguf-py {:?}",
                t.name,
                block * t.ggml_type.block_size(),
                (block + 1) * t.ggml_type.block_size(),
                i % bb,
                &got[block * bb..(block + 1) * bb],
                &want[block * bb..(block + 1) * bb],
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1");
}

/// The K-quants, which gguf-py cannot quantize, against what they must leave: an error within
/// a fraction of the format's step, and no worse than the 32-wide format of the same bits.
#[test]
fn k_quants_leave_less_error_than_the_plain_formats_of_their_bits() {
    let file = GgufFile::open(&fixture("quantize/refs.gguf")).unwrap();
    let (input, _) = file.tensor_f32("input").unwrap();
    // The seeded normal rows at unit scale (the first row) and 0.02 (weights' scale).
    for row in [0usize, 1] {
        let x = &input[row * 512..(row + 1) * 512];
        let rms = |ty: GgmlType| {
            let bytes = quantize(ty, x).unwrap();
            let mut back = vec![0f32; x.len()];
            hone_model::gguf::quant::dequantize(ty, &bytes, &mut back);
            let se: f64 = x
                .iter()
                .zip(&back)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            (se / x.len() as f64).sqrt()
        };
        let sigma = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 512.0).sqrt();
        for (k, plain, ratio) in [
            (GgmlType::Q4K, GgmlType::Q4_1, 0.12),
            (GgmlType::Q5K, GgmlType::Q5_1, 0.06),
            (GgmlType::Q6K, GgmlType::Q8_0, 0.03),
        ] {
            let (ek, ep) = (rms(k), rms(plain));
            assert!(ek < ratio * sigma, "{k}: rms error {ek} vs sigma {sigma}");
            if plain != GgmlType::Q8_0 {
                assert!(ek <= ep * 1.05, "{k}: rms error {ek}, {plain}: {ep}");
            }
        }
    }
}

#[test]
fn the_writer_refuses_what_a_reader_could_not_read() {
    let path = Path::new("bad.gguf");
    let spec = |name: &str, shape: Vec<usize>, ty| TensorSpec {
        name: name.into(),
        shape,
        ty,
    };
    let run = |meta: Vec<(String, Value)>, tensors: Vec<TensorSpec>| {
        let mut out = Vec::new();
        write::<GgufError>(path, &mut out, &meta, &tensors, |_, t| {
            Ok(vec![0u8; t.byte_len()])
        })
        .unwrap_err()
        .to_string()
    };
    let e = run(
        vec![],
        vec![spec("blk.0.ffn_down.weight", vec![4, 48], GgmlType::Q8_0)],
    );
    assert!(
        e.contains("blk.0.ffn_down.weight") && e.contains("whole blocks"),
        "{e}"
    );
    let e = run(
        vec![],
        vec![
            spec("a", vec![4], GgmlType::F32),
            spec("a", vec![4], GgmlType::F32),
        ],
    );
    assert!(e.contains("tensor a") && e.contains("twice"), "{e}");
    let e = run(
        vec![("k".into(), Value::U32(1)), ("k".into(), Value::U32(2))],
        vec![],
    );
    assert!(e.contains("key k") && e.contains("twice"), "{e}");
    let e = run(
        vec![(
            "mixed".into(),
            Value::Array(vec![Value::U32(1), Value::String("x".into())]),
        )],
        vec![],
    );
    assert!(e.contains("mixed") && e.contains("one type"), "{e}");
    let mut out = Vec::new();
    let e = write::<GgufError>(
        path,
        &mut out,
        &[],
        &[spec("short", vec![2, 32], GgmlType::Q4_0)],
        |_, _| Ok(vec![0u8; 10]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("short") && e.contains("expected 36"), "{e}");
}
