#!/usr/bin/env python3
"""Writes fixtures/gguf/kquant/: one tiny llama, whose widths are multiples of 256 so every
projection row is whole K-quant blocks, stored once per tensor type, with transformers' logits and
PEFT's LoRA loss and gradients on each, for hone's quantized-base tests.

  python3 -m venv /work/venv-ref
  /work/venv-ref/bin/pip install torch transformers peft==0.21.2 gguf numpy safetensors
  nice -n 19 /work/venv-ref/bin/python scripts/gguf_kquant_fixtures.py

(torch from PyPI or, where it is reachable, --index-url https://download.pytorch.org/whl/cpu; only
the CPU is used.) Seeded and single-threaded, so rerunning it gives the same bytes.

The model: llama, hidden 256, intermediate 512, 1 layer, 4 heads / 2 KV heads, head_dim 64,
vocab 512 with the byte-level BPE tokenizer of fixtures/peft/llama_gqa (pre-tokenizer llama-bpe,
BOS 509, EOS 510, pad 511), rope_theta 1e4, rms eps 1e-5, untied output.weight, context 256.

tiny_<type>.gguf, one per TYPES entry: the seven projections of the layer (attn_q, attn_k,
attn_v, attn_output, ffn_gate, ffn_up, ffn_down) stored as that type; token_embd and output F16,
the norms F32, identical in every file (F16/BF16 decoding is checked by types.gguf; one layer and
F16 embeddings keep the folder near 8 MB). For the types gguf-py can quantize (Q4_0 .. Q8_0)
the projections are the same seeded N(0, 0.04^2) weights, q/k rows permuted as llama.cpp's
convert_hf_to_gguf.py does, then `gguf.quants.quantize`d. gguf-py has no K-quant quantizer, so
Q4_K, Q5_K and Q6_K projections are seeded random blocks with finite positive f16 scales chosen so
the dequantized weights have a std near 0.04 (the rows as stored are the GGUF's, i.e. already in
llama.cpp's permuted q/k order).

The reference model of each file is transformers' own GGUF loading
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: `gguf.quants.dequantize`, llama's q/k
permutation reversed, float32, eager attention). The script also builds the model itself from
`gguf.quants.dequantize` of the file's tensors (its own un-permute) and checks the two give the
same logits.

refs_<type>.safetensors: input_ids [2, 32] int64 (same for every type), logits [2, 32, 512] f32
of the base model; labels [2, 32] (input_ids with labels[1,:5] = labels[0,-3:] = -100), loss
(0-d f32, transformers' causal-LM loss of the PEFT model in train mode) and the gradient of every
LoRA parameter, keyed like adapter/adapter_model.safetensors.
adapter/: one PEFT LoRA adapter (r 8, alpha 16, dropout 0, q/k/v/o/gate/up/down_proj) shared by
all types: lora_A PEFT's default init under torch.manual_seed(SEED + 1), lora_B N(0, 0.05^2) from
torch.Generator().manual_seed(SEED + 2). Its q/k lora_B rows are in Hugging Face (un-permuted)
order, like the model transformers builds.
dequant.safetensors: `gguf.quants.dequantize` of blk.0.attn_q.weight and blk.0.ffn_down.weight of
each file as f32 in the GGUF's row order, their first DEQUANT_ROWS (16) rows only, [16, in] (keys
`<type>.blk.0.attn_q.weight`): every block position of a row, without 8 MB of full tensors.
meta.json: versions, seeds, shapes, per-type weight std, loss, logit and gradient magnitudes.
"""
import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT looks the adapter's base name up on the Hub
import shutil
import sys
import tempfile
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import load_file, save_file

import torch
import transformers
import peft
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file as save_torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gguf", "kquant")
TOKENIZER_SRC = os.path.join(ROOT, "fixtures", "peft", "llama_gqa")

SEED = 20261204
HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 256, 512, 1, 4, 2, 64, 512
ROPE_THETA, RMS_EPS, CONTEXT = 10000.0, 1e-5, 256
WEIGHT_STD = 0.04        # projections of the types gguf-py quantizes; target for the K-quants
BATCH, SEQ = 2, 32
LORA_R, LORA_ALPHA, LORA_B_STD = 8, 16, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
FILE_TYPE = {
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
}

# GGUF name -> (HF name, [out, in]) of the projections, per layer.
PROJ = {
    "attn_q.weight": ("self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
    "attn_k.weight": ("self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
    "attn_v.weight": ("self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
    "attn_output.weight": ("self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
    "ffn_gate.weight": ("mlp.gate_proj.weight", (INTER, HIDDEN)),
    "ffn_up.weight": ("mlp.up_proj.weight", (INTER, HIDDEN)),
    "ffn_down.weight": ("mlp.down_proj.weight", (HIDDEN, INTER)),
}
NORMS = {"attn_norm.weight": "input_layernorm.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight"}
DEQUANT_KEYS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
DEQUANT_ROWS = 16  # leading rows kept in dequant.safetensors: every block position of a row, small


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: per head, rows (2, D/2) -> (D/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """The inverse of permute: per head, rows (D/2, 2) -> (2, D/2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shared_tensors():
    """token_embd and output F16, the norms F32, the same in every file."""
    rng = np.random.default_rng([SEED, 0])
    out = {
        "token_embd.weight": (0.5 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float16),
        "output.weight": (0.05 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float16),
        "output_norm.weight": (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
    }
    for layer in range(LAYERS):
        for g in NORMS:
            out[f"blk.{layer}.{g}"] = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    return out


def float_projections():
    """Seeded N(0, WEIGHT_STD^2) projections in GGUF row order (q/k permuted), the same floats for
    every type gguf-py quantizes."""
    rng = np.random.default_rng([SEED, 1])
    out = {}
    for layer in range(LAYERS):
        for g, (_, shape) in PROJ.items():
            w = (WEIGHT_STD * rng.standard_normal(shape)).astype(np.float32)
            if g == "attn_q.weight":
                w = permute(w, HEADS)
            elif g == "attn_k.weight":
                w = permute(w, KV)
            out[f"blk.{layer}.{g}"] = np.ascontiguousarray(w)
    return out


# Per-element std of the dequantized value for d = 1 with uniform random quants and 6-bit
# scales/mins (Q4_K, Q5_K, dmin = mean(q) * d centres them) or int8 scales (Q6_K).
def _k_factor(ty):
    sc = np.arange(64.0)
    if ty == T.Q6_K:
        s8 = np.arange(-128.0, 128.0)
        return np.sqrt((s8 ** 2).mean() * np.arange(64.0).var())
    q = np.arange(16.0 if ty == T.Q4_K else 32.0)
    var = (sc ** 2).mean() * (q ** 2).mean() - (sc.mean() * q.mean()) ** 2 + q.mean() ** 2 * sc.var()
    return np.sqrt(var)


def k_quant_blocks(ty, shape, rng):
    """Random blocks of a K-quant with finite positive f16 scales giving a std near WEIGHT_STD."""
    block, nbytes = GGML_QUANT_SIZES[ty]
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    d = (WEIGHT_STD / _k_factor(ty) * rng.uniform(0.75, 1.25, n_blocks)).astype(np.float16)
    if ty == T.Q6_K:
        raw[:, 208:210] = d.view(np.uint8).reshape(n_blocks, 2)
    else:
        q_mean = 7.5 if ty == T.Q4_K else 15.5
        dmin = (d.astype(np.float32) * q_mean * rng.uniform(0.9, 1.1, n_blocks)).astype(np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
        raw[:, 2:4] = dmin.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(shape[0], shape[1] // block * nbytes)


def projections(ty, floats):
    """GGUF name -> (raw data, raw dtype or None) of the projections stored as ty."""
    out = {}
    if ty in K_QUANTS:
        rng = np.random.default_rng([SEED, 2, int(ty)])
        for layer in range(LAYERS):
            for g, (_, shape) in PROJ.items():
                out[f"blk.{layer}.{g}"] = (k_quant_blocks(ty, shape, rng), ty)
    else:
        for name, w in floats.items():
            if ty == T.F16:
                out[name] = (w.astype(np.float16), None)
            else:
                out[name] = (gguf.quants.quantize(w, ty), ty)
    return out


def add_tokenizer(w):
    """The byte-level BPE vocabulary of fixtures/peft/llama_gqa, as scripts/gguf_fixtures.py
    writes it (tokens in id order, added tokens as CONTROL, merges, BOS/EOS/pad, add_bos)."""
    tok = json.load(open(os.path.join(TOKENIZER_SRC, "tokenizer.json")))
    tok_cfg = json.load(open(os.path.join(TOKENIZER_SRC, "tokenizer_config.json")))
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a["special"]
    tokens = [f"[PAD{i}]" for i in range(VOCAB)]
    types = [gguf.TokenType.UNUSED] * VOCAB
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if special.get(i) else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    w.add_add_bos_token(True)
    assert (vocab[tok_cfg["bos_token"]], vocab[tok_cfg["eos_token"]], vocab[tok_cfg["pad_token"]]) == (509, 510, 511)


def write_gguf(path, ty, shared, proj):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(f"tiny_{ty.name.lower()}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(VOCAB)
    w.add_file_type(FILE_TYPE[ty])
    add_tokenizer(w)
    tensors = {n: (t, None) for n, t in shared.items()}
    tensors.update(proj)
    for name in sorted(tensors, key=lambda g: (g.startswith("blk."), g)):
        data, raw = tensors[name]
        if raw is None:
            w.add_tensor(name, np.ascontiguousarray(data))
        else:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_dequantized(path):
    """GGUF name -> gguf.quants.dequantize of the tensor as stored (f32, [out, in]), plus types."""
    reader = gguf.GGUFReader(path)
    out, types = {}, {}
    for t in reader.tensors:
        out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        types[t.name] = t.tensor_type
    return out, types


def own_model(deq):
    """A LlamaForCausalLM built from the dequantized tensors with our own q/k un-permute."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
        max_position_embeddings=CONTEXT, rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, bos_token_id=509, eos_token_id=510, pad_token_id=511,
        attn_implementation="eager", dtype="float32",
    )
    model = LlamaForCausalLM(cfg).float()
    sd = {"model.embed_tokens.weight": deq["token_embd.weight"],
          "lm_head.weight": deq["output.weight"],
          "model.norm.weight": deq["output_norm.weight"]}
    for layer in range(LAYERS):
        for g, hf in NORMS.items():
            sd[f"model.layers.{layer}.{hf}"] = deq[f"blk.{layer}.{g}"]
        for g, (hf, _) in PROJ.items():
            w = deq[f"blk.{layer}.{g}"]
            if g == "attn_q.weight":
                w = unpermute(w, HEADS)
            elif g == "attn_k.weight":
                w = unpermute(w, KV)
            sd[f"model.layers.{layer}.{hf}"] = w
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()


def hf_gguf_model(path):
    d = tempfile.mkdtemp()
    os.symlink(os.path.abspath(path), os.path.join(d, "model.gguf"))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32,
                                                 attn_implementation="eager")
    shutil.rmtree(d)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {type(m).__name__ for m in model.modules()} >= {"Linear"}
    assert not any("Gguf" in type(m).__name__ for m in model.modules())
    return model.eval()


def torch_dequant_diff(path, ty):
    """Max |transformers' torch GGUF dequantizer - gguf.quants.dequantize| over the projections,
    for the types transformers' own dequantizer implements (None for the others)."""
    try:
        from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize as torch_dequantize
    except ImportError:
        return None
    if int(ty) not in GGML_BLOCK:
        return None
    worst = 0.0
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type != ty:
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = torch_dequantize(torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).copy()), int(ty)).numpy()
        worst = max(worst, float(np.abs(got.reshape(ref.shape) - ref).max()))
    return worst


def reference_loader():
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
        new_path = is_gguf_arch_supported("llama")
    except ImportError:
        new_path = False
    if new_path:
        return "llama through transformers' GgufHfQuantizer path (its own torch dequantizer)"
    return ("llama through transformers' legacy GGUF loader (modeling_gguf_pytorch_utils: "
            "gguf.quants.dequantize, then LlamaTensorProcessor reverses the q/k permutation)")


def grad_key(name):
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> adapter key
    return name.replace(".default.weight", ".weight")


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    assert np.array_equal(unpermute(permute(np.arange(24.0).reshape(8, 3), 2), 2), np.arange(24.0).reshape(8, 3))
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    shared = shared_tensors()
    floats = float_projections()
    ids_rng = np.random.default_rng([SEED, 3])
    input_ids = torch.from_numpy(ids_rng.integers(0, 509, size=(BATCH, SEQ)).astype(np.int64))
    labels = input_ids.clone()
    labels[1, :5] = -100
    labels[0, -3:] = -100

    meta = {
        "generator": "scripts/gguf_kquant_fixtures.py",
        "seed": SEED,
        "seeds": {
            "shared_tensors": "numpy default_rng([seed, 0]): token_embd 0.5*N and output 0.05*N as F16, norms 1+0.1*N F32",
            "float_projections": f"numpy default_rng([seed, 1]): {WEIGHT_STD}*N, HF order, then q/k permuted",
            "k_quant_blocks": "numpy default_rng([seed, 2, ggml type id]): uniform bytes, then d (and dmin) f16",
            "input_ids": "numpy default_rng([seed, 3]).integers(0, 509, (2, 32))",
            "lora_A": "peft default init (kaiming_uniform_(a=sqrt(5))) under torch.manual_seed(seed+1)",
            "lora_B": f"N(0, {LORA_B_STD}^2) from torch.Generator().manual_seed(seed+2), named_parameters order",
        },
        "versions": {p: version(p) for p in ["torch", "transformers", "peft", "gguf", "numpy", "safetensors"]},
        "model": {"arch": "llama", "hidden": HIDDEN, "intermediate": INTER, "layers": LAYERS,
                  "heads": HEADS, "kv_heads": KV, "head_dim": HEAD_DIM, "vocab": VOCAB,
                  "rope_theta": ROPE_THETA, "rms_eps": RMS_EPS, "context": CONTEXT,
                  "tied": False, "bos": 509, "eos": 510, "pad": 511},
        "shapes": {g: list(s) for g, (_, s) in PROJ.items()},
        "f32_tensors": sorted(shared),
        "attn_implementation": "eager", "dtype": "float32", "torch_threads": 1,
        "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                     "attn_implementation='eager'); " + reference_loader(),
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R, "dropout": 0.0,
                 "targets": TARGETS},
        "train_batch": {"label_mask": "labels[1,:5]=-100, labels[0,-3:]=-100",
                        "loss": "transformers causal-LM loss: logits[:, :-1] vs labels[:, 1:], mean over non -100, "
                                "PEFT model in train mode"},
        "types": {},
    }

    adapter_dir = os.path.join(OUT, "adapter")
    dequant_out = {}
    adapter_keys = None
    for ty in TYPES:
        tname = ty.name.lower()
        path = os.path.join(OUT, f"tiny_{tname}.gguf")
        write_gguf(path, ty, shared, projections(ty, floats))
        deq, types = read_dequantized(path)
        for k in DEQUANT_KEYS:
            assert types[k] == ty, (k, types[k], ty)
            dequant_out[f"{tname}.{k}"] = np.ascontiguousarray(deq[k][:DEQUANT_ROWS])
        for k, v in shared.items():
            stored = T.F16 if v.dtype == np.float16 else T.F32
            assert types[k] == stored and np.array_equal(deq[k], v.astype(np.float32)), k
        proj_all = np.concatenate([deq[f"blk.{l}.{g}"].ravel() for l in range(LAYERS) for g in PROJ])
        assert np.isfinite(proj_all).all(), tname
        per_tensor_std = {g: float(np.concatenate([deq[f"blk.{l}.{g}"].ravel() for l in range(LAYERS)]).std())
                          for g in PROJ}

        model = hf_gguf_model(path)
        assert model.config.tie_word_embeddings is False
        assert model.config._attn_implementation == "eager"
        mine = own_model(deq)
        hf_sd, my_sd = model.state_dict(), mine.state_dict()
        weights_equal = all(torch.equal(hf_sd[k], my_sd[k]) for k in my_sd if "rotary" not in k)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float().contiguous()
            mine_logits = mine(input_ids=input_ids).logits.float()
        own_diff = float((logits - mine_logits).abs().max())
        torch_deq = torch_dequant_diff(path, ty)
        assert own_diff < 1e-4, (tname, own_diff)
        del mine

        if adapter_keys is None:
            # The one adapter, made on the first file's model (lora_A's init depends on shapes only).
            torch.manual_seed(SEED + 1)
            cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             bias="none", task_type="CAUSAL_LM")
            pm = get_peft_model(hf_gguf_model(path), cfg)
            g = torch.Generator().manual_seed(SEED + 2)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
            pm.peft_config["default"].base_model_name_or_path = "tiny_q4_k.gguf"
            pm.save_pretrained(adapter_dir)
            readme = os.path.join(adapter_dir, "README.md")
            if os.path.exists(readme):
                os.remove(readme)
            cfg_path = os.path.join(adapter_dir, "adapter_config.json")
            ac = json.load(open(cfg_path))
            ac["target_modules"] = sorted(ac["target_modules"])  # PEFT writes a set in hash order
            with open(cfg_path, "w") as f:
                f.write(json.dumps(ac, indent=2, sort_keys=True))
            adapter_keys = sorted(load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
            del pm

        pm = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        pm.train()
        out = pm(input_ids=input_ids, labels=labels)
        loss = out.loss
        loss.backward()
        grads = {grad_key(n): p.grad.detach().float().contiguous().clone()
                 for n, p in pm.named_parameters() if p.requires_grad}
        assert sorted(grads) == adapter_keys, (sorted(grads)[:3], adapter_keys[:3])
        grad_norms = {k: float(v.norm()) for k, v in grads.items()}
        assert all(n > 0 and np.isfinite(n) for n in grad_norms.values()), tname
        assert np.isfinite(loss.item()), tname

        refs = {"input_ids": input_ids.contiguous(), "logits": logits,
                "labels": labels.contiguous(), "loss": loss.detach().float().reshape(())}
        refs.update(grads)
        save_torch(refs, os.path.join(OUT, f"refs_{tname}.safetensors"))
        meta["types"][tname] = {
            "file": f"tiny_{tname}.gguf",
            "ggml_type": int(ty),
            "file_type": FILE_TYPE[ty].name,
            "projection_weight_std": float(proj_all.std()),
            "projection_weight_absmax": float(np.abs(proj_all).max()),
            "projection_weight_std_per_tensor": per_tensor_std,
            "logits_abs_max": float(logits.abs().max()),
            "logits_std": float(logits.std()),
            "transformers_vs_own_dequant_logits_max_abs_diff": own_diff,
            "transformers_vs_own_dequant_weights_equal": weights_equal,
            "transformers_torch_dequantizer_vs_gguf_py_max_abs_diff": torch_deq,
            "loss": loss.item(),
            "adapter_logits_abs_max": float(out.logits.detach().abs().max()),
            "adapter_vs_base_logits_max_abs_diff": float((out.logits.detach() - logits).abs().max()),
            "lora_grad_norm_total": float(torch.sqrt(sum(v.double().pow(2).sum() for v in grads.values()))),
            "lora_grad_norm_min": min(grad_norms.values()),
        }
        m = meta["types"][tname]
        print(f"{tname:5s} std {m['projection_weight_std']:.4f} |w|max {m['projection_weight_absmax']:.4f} "
              f"loss {m['loss']:.6f} |logit|max {m['logits_abs_max']:.4f} own-diff {own_diff:.3g} "
              f"weights_equal {weights_equal} torch-deq {torch_deq} grad norm {m['lora_grad_norm_total']:.4g} (min {m['lora_grad_norm_min']:.3g})",
              file=sys.stderr)
        del pm, model

    save_file(dequant_out, os.path.join(OUT, "dequant.safetensors"))
    meta["adapter_keys"] = adapter_keys
    meta["refs_keys"] = ["input_ids", "logits", "labels", "loss"] + adapter_keys
    meta["dequant_keys"] = sorted(dequant_out)
    meta["dequant"] = (f"gguf.quants.dequantize of the tensor as stored (GGUF row order, q/k permuted), "
                       f"f32, its first {DEQUANT_ROWS} rows: [{DEQUANT_ROWS}, in]")
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    total = 0
    for root, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):9d} {sha256(p)[:16]} {os.path.relpath(p, OUT)}", file=sys.stderr)
    print(f"total {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
