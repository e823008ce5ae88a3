//! GGUF export: a model (a Hugging Face directory or a GGUF file, with LoRA adapters merged in
//! as [`crate::merge()`] merges them) as one GGUF v3 file that llama.cpp, Ollama and LM Studio
//! load, and an Ollama `Modelfile` beside it.
//!
//! * Metadata as llama.cpp's `convert_hf_to_gguf.py` writes it: `general.*`, the architecture's
//!   hyperparameters (`llama`, `qwen2`; u32 counts, f32 RoPE base and RMS epsilon), the
//!   tokenizer ([`hone_model::gguf::vocab`]: the vocabulary, merges or scores, special ids,
//!   `tokenizer.ggml.pre`, the chat template, an end-of-turn id). A GGUF base keeps its own
//!   `general.*`, `{arch}.*` and `tokenizer.*` keys.
//! * Tensors under llama.cpp's names, llama's q/k rows permuted for its interleaved RoPE.
//! * Storage types as llama.cpp chooses them ([`tensor_type`]): `f32`/`f16`/`bf16` as
//!   `convert_hf_to_gguf.py --outtype` (1-D tensors stay F32); the quantized types as
//!   `llama-quantize` without an importance matrix: the output projection (the token embedding
//!   of a tied model) in Q6_K unless the type is Q8_0, the K-quant mixes' extra bits for
//!   `attn_v` and `ffn_down` in the layers `use_more_bits` picks, and the fallbacks for rows that
//!   are not whole blocks.
//!
//! Tensors are merged, converted and written one at a time; the file is written to a temporary
//! path and renamed into place once complete.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hone_model::gguf::quantize::quantize;
use hone_model::gguf::vocab::{self, Special};
use hone_model::gguf::write::{self, TensorSpec};
use hone_model::gguf::{gguf_tensor_name, permute_rows, GgmlType, GgufError, GgufFile, Value};
use hone_model::rope::RopeScaling;
use hone_model::{Architecture, ModelConfig, ModelError};

use crate::combine::{AdapterSet, Combination};
use crate::error::{MergeError, Result};
use crate::export;
use crate::merge::{check_output_not_input, BaseMeta};

/// The file types `hone export gguf --type` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl ExportType {
    pub const ALL: [ExportType; 8] = [
        ExportType::F32,
        ExportType::F16,
        ExportType::BF16,
        ExportType::Q8_0,
        ExportType::Q4_0,
        ExportType::Q4KM,
        ExportType::Q5KM,
        ExportType::Q6K,
    ];

    /// The name on the command line (llama-quantize's, lower case).
    pub fn name(self) -> &'static str {
        match self {
            ExportType::F32 => "f32",
            ExportType::F16 => "f16",
            ExportType::BF16 => "bf16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4_0 => "q4_0",
            ExportType::Q4KM => "q4_k_m",
            ExportType::Q5KM => "q5_k_m",
            ExportType::Q6K => "q6_k",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let text = text.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == text)
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::BF16 => 32,
            ExportType::Q8_0 => 7,
            ExportType::Q4_0 => 2,
            ExportType::Q4KM => 15,
            ExportType::Q5KM => 17,
            ExportType::Q6K => 18,
        }
    }

    /// The type of the 2-D weights before llama.cpp's per-tensor choices.
    pub fn default_type(self) -> GgmlType {
        match self {
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::BF16 => GgmlType::BF16,
            ExportType::Q8_0 => GgmlType::Q8_0,
            ExportType::Q4_0 => GgmlType::Q4_0,
            ExportType::Q4KM => GgmlType::Q4K,
            ExportType::Q5KM => GgmlType::Q5K,
            ExportType::Q6K => GgmlType::Q6K,
        }
    }
}

impl std::fmt::Display for ExportType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer of a `blk.N.` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The storage type of tensor `name` (GGUF name, row-major `shape`) in an export of type `ty`,
/// for a model of `layers` layers whose output projection is the token embedding when `tied`.
pub fn tensor_type(
    ty: ExportType,
    name: &str,
    shape: &[usize],
    layers: usize,
    tied: bool,
) -> GgmlType {
    let quantizable =
        shape.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
    if !quantizable {
        return GgmlType::F32;
    }
    let default = ty.default_type();
    if !default.is_quantized() {
        return default;
    }
    let cols = *shape.last().unwrap_or(&0);
    let mut t = default;
    let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
    let layer = layer_of(name);
    if is_output {
        if !cols.is_multiple_of(default.block_size()) {
            t = GgmlType::Q8_0;
        } else if default != GgmlType::Q8_0 {
            t = GgmlType::Q6K;
        }
    } else if let Some(layer) = layer {
        let mixed = matches!(ty, ExportType::Q4KM | ExportType::Q5KM);
        let v_or_down = name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight");
        if mixed && v_or_down && use_more_bits(layer, layers) {
            t = GgmlType::Q6K;
        }
    }
    // Rows that are not whole blocks: llama-quantize's fallbacks, then F16.
    if !cols.is_multiple_of(t.block_size()) {
        t = match t {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            other => other,
        };
        if !cols.is_multiple_of(t.block_size()) {
            t = GgmlType::F16;
        }
    }
    t
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct GgufExportOptions {
    /// Hugging Face model directory or GGUF file of the base model.
    pub base: PathBuf,
    /// PEFT LoRA adapters merged in (none: the base alone).
    pub adapters: Vec<PathBuf>,
    pub combination: Combination,
    pub ty: ExportType,
    /// The `.gguf` file to write; the Ollama `Modelfile` goes beside it.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// `general.name` (default: the base's name).
    pub name: Option<String>,
    /// `tokenizer.ggml.pre` for a byte-level tokenizer hone does not recognise.
    pub tokenizer_pre: Option<String>,
    /// The chat template the adapters were trained with, when it is not the base's own
    /// (`hone export gguf --run`): written as `tokenizer.chat_template`, its end-of-turn token as
    /// `tokenizer.ggml.eot_token_id` (llama.cpp stops there) or, when the vocabulary has no such
    /// token, as a stop string of the Modelfile.
    pub template: Option<TemplateOverride>,
    /// Write the adapters alone in llama.cpp's LoRA adapter format (`llama-cli --lora`, Ollama's
    /// `ADAPTER`) instead of the merged model; types f32, f16, q8_0.
    pub lora_only: bool,
}

/// A chat template that replaces the base's in the export.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateOverride {
    /// The Jinja text.
    pub text: String,
    /// Where it came from, for the report (`builtin:chatml (run DIR)`).
    pub source: String,
    /// The text that ends an assistant turn (`<|im_end|>`), when the template has one other
    /// than EOS.
    pub end_of_turn: Option<String>,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExportReport {
    pub file: PathBuf,
    pub modelfile: PathBuf,
    pub ty: ExportType,
    pub bytes: u64,
    pub tensors: usize,
    /// Tensors per storage type (`Q6_K` -> 1, ...).
    pub tensor_types: BTreeMap<String, usize>,
    pub merged_modules: usize,
    /// The ids that end generation: EOS, then the end-of-turn token.
    pub eos_ids: Vec<u32>,
    /// Where the chat template came from (`tokenizer_config.json`, `chat_template.jinja`, the
    /// base GGUF's metadata, a run's template), if there is one.
    pub template_source: Option<String>,
    /// Texts that end a turn but are no single token of the vocabulary (Modelfile stops only).
    pub stop_strings: Vec<String>,
    pub seconds: f64,
}

/// llama.cpp's architecture name for hone's.
fn gguf_arch(config: &ModelConfig) -> &'static str {
    match config.architecture {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}

fn unsupported(path: &Path, what: &'static str, found: String, supported: &str) -> MergeError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        what,
        found,
        supported: supported.into(),
    }
    .into()
}

/// The `{arch}.*` hyperparameters of `config`, as `convert_hf_to_gguf.py` writes them.
fn arch_metadata(base: &Path, config: &ModelConfig, arch: &str) -> Result<Vec<(String, Value)>> {
    if let Some(window) = config.sliding_window.iter().flatten().next() {
        return Err(unsupported(
            base,
            "sliding-window attention in a GGUF export (llama.cpp's llama and qwen2 attend to \
             the whole context)",
            format!("sliding_window {window}"),
            "models without an active sliding window",
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta = vec![
        (key("block_count"), u32v(config.num_layers)),
        (key("context_length"), u32v(config.max_position_embeddings)),
        (key("embedding_length"), u32v(config.hidden_size)),
        (key("feed_forward_length"), u32v(config.intermediate_size)),
        (key("attention.head_count"), u32v(config.num_heads)),
        (key("attention.head_count_kv"), u32v(config.num_kv_heads)),
        (key("rope.freq_base"), Value::F32(config.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (key("attention.key_length"), u32v(config.head_dim)),
        (key("attention.value_length"), u32v(config.head_dim)),
        (key("vocab_size"), u32v(config.vocab_size)),
        (key("rope.dimension_count"), u32v(config.rotary_dim())),
    ];
    match &config.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            meta.push((key("rope.scaling.type"), Value::String("linear".into())));
            meta.push((key("rope.scaling.factor"), Value::F32(*factor as f32)));
        }
        // llama.cpp takes these as the rope_freqs.weight tensor (`rope_frequency_factors`).
        RopeScaling::Llama3 { .. } | RopeScaling::Factors(_) => {}
    }
    Ok(meta)
}

/// llama.cpp's `rope_freqs.weight` for a model whose RoPE scaling is Llama 3's (computed as
/// `convert_hf_to_gguf.py` computes it) or given as factors (a GGUF base's own), else `None`.
fn rope_frequency_factors(config: &ModelConfig) -> Option<Vec<f32>> {
    match &config.rope_scaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Some(hone_model::rope::llama3_frequency_factors(
            config.rotary_dim(),
            config.rope_theta,
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings,
        )),
        RopeScaling::Factors(factors) => Some(factors.clone()),
        _ => None,
    }
}

/// `general.*` keys for an export of `ty` named `name`.
fn general_metadata(arch: &str, name: &str, ty: ExportType) -> Vec<(String, Value)> {
    vec![
        (
            "general.architecture".into(),
            Value::String(arch.to_string()),
        ),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.to_string())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ]
}

/// Special token facts of the metadata of a GGUF base, for the report and the Modelfile.
struct TokenFacts {
    eos: Option<Special>,
    eot: Option<Special>,
    template: Option<String>,
    template_source: Option<String>,
    stop_strings: Vec<String>,
}

/// Puts `key = value` in `meta` (in place when present).
fn set_key(meta: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => meta.push((key.to_string(), value)),
    }
}

/// Applies a run's chat template to the metadata and the token facts.
fn apply_template(meta: &mut Vec<(String, Value)>, facts: &mut TokenFacts, t: &TemplateOverride) {
    set_key(
        meta,
        "tokenizer.chat_template",
        Value::String(t.text.clone()),
    );
    facts.template = Some(t.text.clone());
    facts.template_source = Some(t.source.clone());
    let Some(end) = &t.end_of_turn else {
        return;
    };
    let id = meta
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .and_then(|tokens| tokens.iter().position(|v| v.as_str() == Some(end.as_str())));
    match id {
        Some(id) if facts.eos.as_ref().is_none_or(|e| e.id != id as u32) => {
            set_key(meta, "tokenizer.ggml.eot_token_id", Value::U32(id as u32));
            facts.eot = Some(Special {
                text: end.clone(),
                id: id as u32,
            });
        }
        Some(_) => {}
        None => facts.stop_strings.push(end.clone()),
    }
}

fn gguf_token_facts(file: &GgufFile) -> Result<TokenFacts> {
    let spec = hone_model::gguf::tokenizer::tokenizer_spec(file)?;
    let special = |t: &Option<hone_model::gguf::tokenizer::SpecialToken>| {
        t.as_ref().map(|t| Special {
            text: t.text.clone(),
            id: t.id,
        })
    };
    let template = file
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(TokenFacts {
        eos: special(&spec.eos),
        eot: special(&spec.eot),
        template_source: template
            .as_ref()
            .map(|_| "the base GGUF's metadata".to_string()),
        template,
        stop_strings: Vec::new(),
    })
}

/// The metadata of the export: a Hugging Face base's converted, a GGUF base's copied (its
/// file type replaced).
fn metadata(
    options: &GgufExportOptions,
    base: &Path,
    meta: &BaseMeta,
    config: &ModelConfig,
) -> Result<(Vec<(String, Value)>, TokenFacts)> {
    let arch = gguf_arch(config);
    let default_name = || {
        base.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    };
    match meta {
        BaseMeta::Dir(_) => {
            let name = options.name.clone().unwrap_or_else(default_name);
            let mut out = general_metadata(arch, &name, options.ty);
            out.extend(arch_metadata(base, config, arch)?);
            let vocab =
                vocab::from_hf_dir(base, config.vocab_size, options.tokenizer_pre.as_deref())?;
            out.extend(vocab.metadata);
            Ok((
                out,
                TokenFacts {
                    eos: vocab.eos,
                    eot: vocab.eot,
                    template: vocab.template,
                    template_source: vocab.template_source,
                    stop_strings: Vec::new(),
                },
            ))
        }
        BaseMeta::Gguf(file) => {
            let mut out = Vec::new();
            for (key, value) in file.metadata() {
                let value = match key.as_str() {
                    "general.file_type" => Value::U32(options.ty.file_type()),
                    "general.name" => match &options.name {
                        Some(name) => Value::String(name.clone()),
                        None => value.clone(),
                    },
                    "general.alignment" => continue,
                    _ => value.clone(),
                };
                out.push((key.clone(), value));
            }
            for (key, value) in general_metadata(arch, &default_name(), options.ty) {
                if !out.iter().any(|(k, _)| *k == key) {
                    out.push((key, value));
                }
            }
            Ok((out, gguf_token_facts(file)?))
        }
    }
}

/// The resolved base of `options`, once the output is known not to be an input and not to
/// exist (unless forced).
fn resolve_base(options: &GgufExportOptions) -> Result<PathBuf> {
    let base = hone_model::loader::resolve_model_dir(&options.base)?;
    let mut inputs: Vec<(&Path, &'static str)> = vec![(base.as_path(), "base model")];
    inputs.extend(options.adapters.iter().map(|a| (a.as_path(), "adapter")));
    check_output_not_input(&options.out, &inputs)?;
    if options.out.exists() && !options.force {
        return Err(MergeError::OutputExists {
            path: options.out.clone(),
        });
    }
    Ok(base)
}

/// The base tensors an export writes (all but a tied model's `lm_head.weight`), in module
/// order, with their shapes.
fn written_tensors(
    store: &crate::merge::BaseWeights<'_>,
    config: &ModelConfig,
) -> Result<(Vec<String>, Vec<Vec<usize>>)> {
    let mut names = store.names();
    names.sort_by(|a, b| export::natural_cmp(a, b));
    if config.tie_word_embeddings {
        names.retain(|n| n != "lm_head.weight");
    }
    let shapes = names
        .iter()
        .map(|n| store.shape(n))
        .collect::<Result<Vec<_>>>()?;
    Ok((names, shapes))
}

/// The number of heads whose rows llama.cpp permutes in tensor `gguf_name` (llama's q and k).
fn permuted_heads(arch: &str, gguf_name: &str, config: &ModelConfig) -> Option<usize> {
    match (arch, gguf_name.split('.').nth(2)) {
        ("llama", Some("attn_q")) => Some(config.num_heads),
        ("llama", Some("attn_k")) => Some(config.num_kv_heads),
        _ => None,
    }
}

/// Tensors per storage type.
fn count_types(specs: &[TensorSpec]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for spec in specs {
        *counts.entry(spec.ty.name().to_string()).or_insert(0) += 1;
    }
    counts
}

/// Exports the model of `options` (see the module documentation), or with `lora_only` the
/// adapters alone ([`export_lora`]).
pub fn export_gguf(options: &GgufExportOptions) -> Result<GgufExportReport> {
    if options.lora_only {
        return export_lora(options);
    }
    let start = Instant::now();
    let base = &resolve_base(options)?;
    let meta = BaseMeta::open(base)?;
    let (config, store) = meta.weights(base)?;
    let arch = gguf_arch(&config);
    let set = if options.adapters.is_empty() {
        None
    } else {
        Some(AdapterSet::open(&options.adapters, &options.combination)?)
    };

    // Tensors: every base tensor under its GGUF name, minus lm_head of a tied model.
    let (names, shapes) = written_tensors(&store, &config)?;
    if let Some(set) = &set {
        crate::merge::check_modules_in_base(
            set,
            &store,
            base,
            &names,
            &shapes,
            config.tie_word_embeddings,
        )?;
    }
    let mut specs = Vec::with_capacity(names.len());
    for (name, shape) in names.iter().zip(&shapes) {
        let gguf_name = gguf_tensor_name(name).ok_or_else(|| {
            unsupported(
                base,
                "tensor in a GGUF export (one without a llama.cpp name)",
                name.clone(),
                "the token embedding, output norm and head, and the attention, norm and MLP \
                 tensors of each layer",
            )
        })?;
        let ty = tensor_type(
            options.ty,
            &gguf_name,
            shape,
            config.num_layers,
            config.tie_word_embeddings,
        );
        specs.push(TensorSpec {
            name: gguf_name,
            shape: shape.clone(),
            ty,
        });
    }
    // llama.cpp's order: the embedding, the layers, then the output norm and head.
    let rank = |n: &str| match n {
        "token_embd.weight" => 0,
        "output_norm.weight" => 2,
        "output.weight" => 3,
        _ => 1,
    };
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| rank(&specs[i].name));
    let mut specs: Vec<TensorSpec> = order.iter().map(|&i| specs[i].clone()).collect();
    let hf_names: Vec<&String> = order.iter().map(|&i| &names[i]).collect();
    // Llama 3 RoPE scaling as llama.cpp's divisors, after the base's tensors.
    let rope_freqs = rope_frequency_factors(&config);
    if let Some(factors) = &rope_freqs {
        specs.push(TensorSpec {
            name: hone_model::gguf::model::ROPE_FREQS.into(),
            shape: vec![factors.len()],
            ty: GgmlType::F32,
        });
    }

    let (mut metadata, mut facts) = metadata(options, base, &meta, &config)?;
    if let Some(t) = &options.template {
        apply_template(&mut metadata, &mut facts, t);
    }
    let staged = hone_io::StagedFile::new(&options.out)?;
    let mut writer = BufWriter::with_capacity(1 << 20, staged.file());
    let mut merged_modules = 0;
    let bytes =
        write::write::<MergeError>(&options.out, &mut writer, &metadata, &specs, |i, spec| {
            let Some(name) = hf_names.get(i).copied() else {
                let factors = rope_freqs.as_ref().expect("the one extra tensor");
                return Ok(quantize(GgmlType::F32, factors).expect("f32 always fits"));
            };
            let mut values = store.load_f32(name, &spec.shape)?;
            if let Some(set) = &set {
                if let Some(module) = name
                    .strip_suffix(".weight")
                    .filter(|m| set.modules().contains_key(*m))
                {
                    set.combined(module)?.add_to(&mut values);
                    merged_modules += 1;
                }
            }
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(GgufError::Tensor {
                    path: options.out.clone(),
                    tensor: name.clone(),
                    message: format!("value {bad} is {} after merging", values[bad]),
                }
                .into());
            }
            // BaseWeights gives llama's q/k in Hugging Face's order (a GGUF base's too).
            if let Some(heads) = permuted_heads(arch, &spec.name, &config) {
                let cols = if spec.shape.len() == 2 {
                    spec.shape[1]
                } else {
                    1
                };
                values = permute_rows(&values, spec.shape[0], cols, heads);
            }
            quantize_tensor(&options.out, spec, &values)
        })?;
    drop(writer);
    staged.commit()?;
    let modelfile = modelfile_path(&options.out);
    let text = modelfile_text(&options.out, &facts, None);
    hone_io::write_file(&modelfile, text.as_bytes())?;
    let tensor_types = count_types(&specs);
    let eos_ids = facts
        .eos
        .iter()
        .chain(facts.eot.iter())
        .map(|t| t.id)
        .collect();
    Ok(GgufExportReport {
        file: options.out.clone(),
        modelfile,
        ty: options.ty,
        bytes,
        tensors: specs.len(),
        tensor_types,
        merged_modules,
        eos_ids,
        template_source: facts.template_source,
        stop_strings: facts.stop_strings,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes the adapters of `options` as a llama.cpp LoRA adapter: `general.type = adapter`,
/// `adapter.type = lora`, `adapter.lora.alpha`, and per module `blk.N.<tensor>.weight.lora_a`
/// (`A`, `[rank, in]`) and `.lora_b` (`B`, `[out, rank]`, llama's q/k rows permuted as the base's),
/// which llama.cpp applies as `W + alpha/rank · B A`, as PEFT does. A single plain adapter is
/// written as stored with its `lora_alpha` (what `convert_lora_to_gguf.py` writes); rsLoRA,
/// per-module ranks or alphas and combinations of several adapters are written as the combined
/// update with the scaling folded into `B` and `adapter.lora.alpha = 0` (llama.cpp's scale 1).
pub fn export_lora(options: &GgufExportOptions) -> Result<GgufExportReport> {
    let start = Instant::now();
    let base = &resolve_base(options)?;
    let ty = match options.ty {
        ExportType::F32 => GgmlType::F32,
        ExportType::F16 => GgmlType::F16,
        ExportType::Q8_0 => GgmlType::Q8_0,
        other => {
            return Err(unsupported(
                &options.out,
                "type of a LoRA adapter GGUF",
                other.name().into(),
                "f32, f16, q8_0",
            ))
        }
    };
    let meta = BaseMeta::open(base)?;
    let (config, store) = meta.weights(base)?;
    let arch = gguf_arch(&config);
    let set = AdapterSet::open(&options.adapters, &options.combination)?;
    let (names, shapes) = written_tensors(&store, &config)?;
    crate::merge::check_modules_in_base(
        &set,
        &store,
        base,
        &names,
        &shapes,
        config.tie_word_embeddings,
    )?;
    let plain = match set.adapters.as_slice() {
        [one] => {
            let s = &one.settings;
            !s.use_rslora && s.rank_pattern.is_empty() && s.alpha_pattern.is_empty()
        }
        _ => false,
    };
    let alpha = if plain {
        set.adapters[0].settings.alpha as f32
    } else {
        0.0
    };
    // Factors of every module, in module order: (GGUF name, A, B, shape).
    let mut modules = Vec::new();
    let mut module_names: Vec<&String> = set.modules().keys().collect();
    module_names.sort_by(|a, b| export::natural_cmp(a, b));
    for module in module_names {
        let gguf = gguf_tensor_name(&format!("{module}.weight")).ok_or_else(|| {
            unsupported(
                base,
                "adapted module in a LoRA adapter GGUF (one without a llama.cpp name)",
                module.clone(),
                "the attention and MLP projections, and lm_head",
            )
        })?;
        let (a, mut b, shape) = if plain {
            let f = set.adapters[0]
                .factors(module)?
                .expect("the module is the adapter's");
            (f.a, f.b, f.shape)
        } else {
            let low = set.combined(module)?;
            (low.a, low.b, low.shape)
        };
        if let Some(heads) = permuted_heads(arch, &gguf, &config) {
            b = permute_rows(&b, shape.out_features, shape.rank, heads);
        }
        modules.push((gguf, a, b, shape));
    }
    let fit = |row: usize| {
        if row.is_multiple_of(ty.block_size()) {
            ty
        } else {
            GgmlType::F16
        }
    };
    let mut specs = Vec::new();
    let mut data: Vec<&Vec<f32>> = Vec::new();
    for (gguf, a, b, shape) in &modules {
        specs.push(TensorSpec {
            name: format!("{gguf}.lora_a"),
            shape: vec![shape.rank, shape.in_features],
            ty: fit(shape.in_features),
        });
        data.push(a);
        specs.push(TensorSpec {
            name: format!("{gguf}.lora_b"),
            shape: vec![shape.out_features, shape.rank],
            ty: fit(shape.rank),
        });
        data.push(b);
    }
    let default_name = || {
        options.adapters[0]
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into())
    };
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        (
            "general.name".into(),
            Value::String(options.name.clone().unwrap_or_else(default_name)),
        ),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha)),
    ];
    let staged = hone_io::StagedFile::new(&options.out)?;
    let mut writer = BufWriter::with_capacity(1 << 20, staged.file());
    let bytes =
        write::write::<MergeError>(&options.out, &mut writer, &metadata, &specs, |i, spec| {
            if let Some(bad) = data[i].iter().position(|v| !v.is_finite()) {
                return Err(GgufError::Tensor {
                    path: options.out.clone(),
                    tensor: spec.name.clone(),
                    message: format!("value {bad} is {}", data[i][bad]),
                }
                .into());
            }
            quantize_tensor(&options.out, spec, data[i])
        })?;
    drop(writer);
    staged.commit()?;
    let facts = match &meta {
        BaseMeta::Dir(_) => {
            let v = vocab::from_hf_dir(base, config.vocab_size, options.tokenizer_pre.as_deref())?;
            TokenFacts {
                eos: v.eos,
                eot: v.eot,
                template: v.template,
                template_source: v.template_source,
                stop_strings: Vec::new(),
            }
        }
        BaseMeta::Gguf(file) => gguf_token_facts(file)?,
    };
    let mut facts = facts;
    if let Some(t) = &options.template {
        // The adapter file has no tokenizer: the run's template reaches Ollama through the
        // Modelfile only.
        let mut scratch = match &meta {
            BaseMeta::Dir(_) => {
                vocab::from_hf_dir(base, config.vocab_size, options.tokenizer_pre.as_deref())?
                    .metadata
            }
            BaseMeta::Gguf(file) => file.metadata().to_vec(),
        };
        apply_template(&mut scratch, &mut facts, t);
    }
    let modelfile = modelfile_path(&options.out);
    let text = modelfile_text(&options.out, &facts, Some(base));
    hone_io::write_file(&modelfile, text.as_bytes())?;
    let tensor_types = count_types(&specs);
    Ok(GgufExportReport {
        file: options.out.clone(),
        modelfile,
        ty: options.ty,
        bytes,
        tensors: specs.len(),
        tensor_types,
        merged_modules: 0,
        eos_ids: facts
            .eos
            .iter()
            .chain(facts.eot.iter())
            .map(|t| t.id)
            .collect(),
        template_source: facts.template_source,
        stop_strings: facts.stop_strings,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `<stem>.Modelfile` beside the exported file.
pub fn modelfile_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.Modelfile"))
}

/// Ollama's Go template for the chat template families it can be translated from exactly
/// enough (ChatML, Llama 3, Gemma, Phi-3); `None` for others (Ollama then reads the GGUF's own
/// `tokenizer.chat_template`).
pub fn ollama_template(template: &str) -> Option<&'static str> {
    if template.contains("<|im_start|>") {
        Some(
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
             {{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\
             <|im_start|>assistant\n",
        )
    } else if template.contains("<|start_header_id|>") {
        Some(
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}\
             {{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}\
             <|start_header_id|>assistant<|end_header_id|>\n\n",
        )
    } else if template.contains("<start_of_turn>") {
        Some(
            "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n\
             {{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        )
    } else if template.contains("<|assistant|>") && template.contains("<|end|>") {
        Some(
            "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        )
    } else {
        None
    }
}

/// The Ollama `Modelfile` for `file` (`FROM`, `ADAPTER` when `adapter_of` names the base the
/// adapter file goes on, `TEMPLATE`, a `PARAMETER stop` per stop token).
fn modelfile_text(file: &Path, facts: &TokenFacts, adapter_of: Option<&Path>) -> String {
    let name = file
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut text =
        String::from("# Written by hone export gguf. Use: ollama create NAME -f THIS_FILE\n");
    match adapter_of {
        Some(base) if hone_model::loader::is_gguf(base) => {
            text.push_str(&format!("FROM {}\n", base.display()));
            text.push_str(&format!("ADAPTER ./{name}\n"));
        }
        Some(base) => {
            text.push_str(&format!(
                "# The base must be a GGUF file: hone export gguf --model {} --out base.gguf\n",
                base.display()
            ));
            text.push_str("FROM ./base.gguf\n");
            text.push_str(&format!("ADAPTER ./{name}\n"));
        }
        None => text.push_str(&format!("FROM ./{name}\n")),
    }
    if let Some(template) = facts.template.as_deref().and_then(ollama_template) {
        text.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    }
    let stops = facts
        .eot
        .iter()
        .chain(facts.eos.iter())
        .map(|t| t.text.clone())
        .chain(facts.stop_strings.iter().cloned());
    for stop in stops {
        text.push_str(&format!(
            "PARAMETER stop {}\n",
            serde_json::Value::from(stop)
        ));
    }
    text
}

/// `values` in the type `spec` names, an error naming the output file and the tensor.
fn quantize_tensor(out: &Path, spec: &TensorSpec, values: &[f32]) -> Result<Vec<u8>> {
    quantize(spec.ty, values).map_err(|message| {
        GgufError::Tensor {
            path: out.to_path_buf(),
            tensor: spec.name.clone(),
            message,
        }
        .into()
    })
}
