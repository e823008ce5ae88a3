#!/usr/bin/env python3
"""Writes fixtures/bert/: a tiny random BERT sentence embedder in sentence-transformers' directory
layout, and reference embeddings computed by sentence-transformers, for hone-rag's parity test
(crates/hone-rag/tests/embed.rs).

  tiny/                    the sentence-transformers model (config.json, model.safetensors,
                           tokenizer.json, vocab.txt, modules.json, 1_Pooling/config.json,
                           sentence_bert_config.json)
  tiny.refs.json           sentences, token ids and embeddings of the tiny model
  minilm.refs.json         embeddings of the real all-MiniLM-L6-v2 (checkpoints/base/, fetched by
                           scripts/fetch-models.sh), when present

The tiny model keeps the real all-MiniLM-L6-v2 tokenizer's normalisation and WordPiece rules with
a small vocabulary (special tokens, every single character and ##character piece, the 600 first
whole words of the real vocabulary), hidden size 32, 2 layers, 4 heads, 64 positions. Weights are
drawn with a fixed seed and a larger spread than BERT's initialiser (0.2, LayerNorm weights around
1) so every layer changes the output.

Run with the reference venv:  /work/pyref/bin/python scripts/bert_fixture.py
(torch, transformers 5.25, sentence-transformers 6.3).
"""
import json
import os
import shutil
import sys

import torch
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, BertTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "bert")
MINILM = os.path.join(ROOT, "checkpoints", "base", "all-minilm-l6-v2")

SENTENCES = [
    "A Turing machine is a mathematical model of computation.",
    "The cat sat on the mat.",
    "hello",
    "Paris is the capital of France, and its largest city!",
    "Ünïcödé àccents, numbers 12345 and symbols #@% are normalised.",
    "",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),  # longer than 64 tokens
    "What year did the Normans conquer England?",
]


def tiny_vocab():
    real = [line.rstrip("\n") for line in open(os.path.join(MINILM, "vocab.txt"), encoding="utf-8")] \
        if os.path.exists(os.path.join(MINILM, "vocab.txt")) else None
    if real is None:
        sys.exit("bert_fixture: needs checkpoints/base/all-minilm-l6-v2/vocab.txt (scripts/fetch-models.sh minilm)")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [t for t in real if len(t) == 1 or (t.startswith("##") and len(t) == 3)]
    words = [t for t in real if t.isalpha() and len(t) > 1 and not t.startswith("[")][:600]
    vocab = []
    for t in special + chars + words:
        if t not in vocab:
            vocab.append(t)
    return vocab


def write_tiny():
    tiny = os.path.join(OUT, "tiny")
    stage = tiny + ".partial"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    vocab = tiny_vocab()
    with open(os.path.join(stage, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(stage, "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    torch.manual_seed(14)
    bert = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    hf_dir = os.path.join(stage, "hf")
    bert.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(hf_dir, max_seq_length=64)
    pooling = models.Pooling(32, pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    model.save(stage)
    shutil.rmtree(hf_dir)
    # sentence-transformers writes README.md and a config with its version; keep the model files.
    for extra in ["README.md"]:
        p = os.path.join(stage, extra)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(tiny, ignore_errors=True)
    os.rename(stage, tiny)
    return tiny


def refs(model_dir, sentences, out_name, with_ids):
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    emb = model.encode(sentences, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    record = {
        "source": f"sentence-transformers {__import__('sentence_transformers').__version__}, "
        f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "model": os.path.relpath(model_dir, ROOT),
        "max_seq_length": model.max_seq_length,
        "sentences": sentences,
        "embeddings": [[float(x) for x in row] for row in emb],
    }
    if with_ids:
        tok = model.tokenizer
        record["input_ids"] = [
            tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"] for s in sentences
        ]
    with open(os.path.join(OUT, out_name), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {out_name}: {len(sentences)} embeddings of dim {emb.shape[1]}")


def main():
    os.makedirs(OUT, exist_ok=True)
    tiny = write_tiny()
    refs(tiny, SENTENCES, "tiny.refs.json", with_ids=True)
    if os.path.exists(os.path.join(MINILM, "model.safetensors")):
        refs(MINILM, SENTENCES, "minilm.refs.json", with_ids=True)
    else:
        print("all-MiniLM-L6-v2 not fetched: minilm.refs.json not written")


if __name__ == "__main__":
    main()
