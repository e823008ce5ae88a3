#!/usr/bin/env python3
"""Writes fixtures/gguf/: GGUF files made by gguf-py (the `gguf` package llama.cpp ships) and the
values gguf-py decodes from them, for hone's GGUF reader tests.

  python3 -m venv /tmp/ggufenv && /tmp/ggufenv/bin/pip install gguf numpy safetensors
  /tmp/ggufenv/bin/python scripts/gguf_fixtures.py

types.gguf: one [3, 512] tensor per type hone reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
quantized by gguf-py from seeded normal values; Q4_K, Q5_K, Q6_K, which gguf-py cannot quantize, as
seeded random blocks with finite f16 scales), plus metadata of every value type.
types.expected.safetensors: `gguf.quants.dequantize` of each tensor as f32, same names and
row-major shapes.
llama_gqa_quant.gguf, qwen2_tied_quant.gguf: the same with the projections, embeddings and
lm_head in Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (see QUANT), for the quantized-weight tests.
llama_gqa.gguf, qwen2_tied.gguf: fixtures/peft/{llama_gqa,qwen2_tied} (checkpoints written by
transformers 5.23) converted to F32 GGUF as llama.cpp's convert_hf_to_gguf.py does it: its tensor
names, llama's q/k rows permuted for interleaved RoPE, the byte-level BPE vocabulary in
tokenizer.ggml.* with the pre-tokenizer name llama.cpp gives that tokenizer (llama-bpe, qwen2).
The tests compare hone's logits on them with transformers' (fixtures/peft/*/refs).
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
import json

from safetensors.numpy import load_file, save_file

out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gguf")
os.makedirs(out_dir, exist_ok=True)
rng = np.random.default_rng(20261203)
ROWS, COLS = 3, 512

w = gguf.GGUFWriter(os.path.join(out_dir, "types.gguf"), arch="llama")
w.add_uint8("test.u8", 200)
w.add_int8("test.i8", -100)
w.add_uint16("test.u16", 60000)
w.add_int16("test.i16", -30000)
w.add_uint32("test.u32", 4000000000)
w.add_int32("test.i32", -2000000000)
w.add_uint64("test.u64", 18000000000000000000)
w.add_int64("test.i64", -9000000000000000000)
w.add_float32("test.f32", 0.1)
w.add_float64("test.f64", 0.1)
w.add_bool("test.bool", True)
w.add_string("test.string", "héllo\nworld")
w.add_array("test.strings", ["a", "", "ünï"])
w.add_array("test.ints", [1, -2, 3])

expected = {}


def finite_f16(n):
    # Scales in a range that keeps products finite, as real files have.
    return rng.uniform(-0.05, 0.05, size=n).astype(np.float16)


for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]:
    name = f"t.{ty.name.lower()}"
    block, nbytes = GGML_QUANT_SIZES[ty]
    if ty in (T.Q4_K, T.Q5_K, T.Q6_K):
        n_blocks = ROWS * COLS // block
        raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
        if ty == T.Q6_K:
            raw[:, 208:210] = finite_f16(n_blocks).view(np.uint8).reshape(n_blocks, 2)
        else:
            raw[:, 0:4] = finite_f16(2 * n_blocks).view(np.uint8).reshape(n_blocks, 4)
        raw = raw.reshape(ROWS, COLS // block * nbytes)
    elif ty == T.F32:
        raw = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    elif ty == T.F16:
        raw = rng.standard_normal((ROWS, COLS)).astype(np.float16)
    else:
        values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        # Some blocks all zero, one with a single non-zero value: quantizers' edge cases.
        values[0, :32] = 0.0
        values[1, 32:64] = 0.0
        values[1, 40] = 3.5
        raw = gguf.quants.quantize(values, ty)
    if ty in (T.F32, T.F16):
        w.add_tensor(name, raw)
    else:
        w.add_tensor(name, raw, raw_dtype=ty)
    deq = gguf.quants.dequantize(raw, ty) if ty not in (T.F32, T.F16) else raw.astype(np.float32)
    assert deq.shape == (ROWS, COLS), (ty, deq.shape)
    assert np.isfinite(deq).all(), ty
    expected[name] = np.ascontiguousarray(deq.astype(np.float32))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
save_file(expected, os.path.join(out_dir, "types.expected.safetensors"))
from importlib.metadata import version
print("wrote", out_dir, "with gguf", version("gguf"), "numpy", np.__version__, file=sys.stderr)


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: per head, rows (2, D/2) -> (D/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def convert(name, pre, quant=None, suffix=""):
    """quant: GGUF tensor-name ending -> block type, for the tensors whose rows are whole blocks
    (the others stay F32); the file is written as `{name}{suffix}.gguf`."""
    src = os.path.join(out_dir, "..", "peft", name)
    cfg = json.load(open(os.path.join(src, "config.json")))
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    tok_cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    arch = cfg["model_type"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(os.path.join(out_dir, f"{name}{suffix}.gguf"), arch=arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(cfg.get("head_dim", cfg["hidden_size"] // heads))
    w.add_value_length(cfg.get("head_dim", cfg["hidden_size"] // heads))
    w.add_rope_dimension_count(cfg.get("head_dim", cfg["hidden_size"] // heads))
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Tokenizer: the vocabulary in id order, added tokens as control tokens.
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a["special"]
    n = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if special.get(i) else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: i for t, i in vocab.items()}
    if tok_cfg.get("bos_token"):
        w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    if tok_cfg.get("pad_token"):
        w.add_pad_token_id(ids[tok_cfg["pad_token"]])
    # transformers' fast tokenizer adds BOS when its post-processor has a template (llama_gqa).
    w.add_add_bos_token(tok["post_processor"] is not None and "TemplateProcessing" in json.dumps(tok["post_processor"]))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for hf, t in tensors.items():
        if hf == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif hf == "model.norm.weight":
            g = "output_norm.weight"
        elif hf == "lm_head.weight":
            g = "output.weight"
        else:
            parts = hf.split(".")
            assert parts[0] == "model" and parts[1] == "layers", hf
            g = f"blk.{parts[2]}." + LAYER_NAMES[".".join(parts[3:])]
        t = t.astype(np.float32)
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_q.bias")):
            t = permute(t, heads)
        if arch == "llama" and g.endswith(("attn_k.weight", "attn_k.bias")):
            t = permute(t, kv)
        out[g] = t
    for g in sorted(out, key=lambda g: (g.startswith("blk."), g)):
        t = np.ascontiguousarray(out[g])
        ty = next((ty for end, ty in (quant or {}).items() if g.endswith(end)), None)
        if ty is not None and t.ndim == 2 and t.shape[1] % GGML_QUANT_SIZES[ty][0] == 0:
            w.add_tensor(g, gguf.quants.quantize(t, ty), raw_dtype=ty)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


convert("llama_gqa", "llama-bpe")
convert("qwen2_tied", "qwen2")

# The same models with their projections (and embeddings, lm_head) in the 32-wide block formats,
# one format per kind of projection; rows that are not whole blocks (llama_gqa's down_proj, 176
# wide) stay F32. Loading them quantized must give the logits of loading them dequantized.
QUANT = {
    "attn_q.weight": T.Q4_0,
    "attn_k.weight": T.Q4_1,
    "attn_v.weight": T.Q5_0,
    "attn_output.weight": T.Q5_1,
    "ffn_gate.weight": T.Q8_0,
    "ffn_up.weight": T.Q4_1,
    "ffn_down.weight": T.Q5_0,
    "output.weight": T.Q8_0,
    "token_embd.weight": T.Q8_0,
}
convert("llama_gqa", "llama-bpe", QUANT, "_quant")
convert("qwen2_tied", "qwen2", QUANT, "_quant")
