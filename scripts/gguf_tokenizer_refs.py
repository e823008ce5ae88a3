#!/usr/bin/env python3
"""Writes the GGUF tokenizer fixtures of fixtures/gguf/ and the ids transformers gives on them.

  /work/pyref/bin/pip install gguf numpy transformers sentencepiece protobuf
  scripts/fetch-models.sh        # SmolLM2-135M-Instruct.Q4_1.gguf into checkpoints/base/
  /work/pyref/bin/python scripts/gguf_tokenizer_refs.py

smollm2-tokenizer.gguf: the metadata of the fetched SmolLM2-135M-Instruct Q4_1 file (every key:
general.*, llama.*, tokenizer.*), no tensors, rewritten by gguf-py's GGUFWriter.
stories260k-tokenizer.gguf: the SentencePiece-style tokenizer of checkpoints/base/stories260k
(tokenizer.json: BPE with byte fallback, Metaspace "prepend_scheme: first") written as llama.cpp's
convert_hf_to_gguf.py writes a llama vocabulary (`_set_vocab_llama_hf`: tokenizer.ggml.model =
llama, tokens, scores, token types with <0xNN> bytes as BYTE, add_space_prefix from the
normalizer/pre-tokenizer, special ids).
stories260k-llamacpp-tokenizer.gguf: the same tokenizer converted by llama.cpp's own
convert_hf_to_gguf.py (`--vocab-only`; it falls back to `_set_vocab_llama_hf`, so every score is
-1000 and there is no add_space_prefix key: merges are recovered from ties). Rewritten only when
LLAMA_CPP names a llama.cpp source tree, e.g. the one the llama-cpp-python sdist vendors:
  pip download --no-deps --no-binary :all: llama-cpp-python   (the .tar.gz; untar it)
  LLAMA_CPP=.../llama_cpp_python-0.3.36/vendor/llama.cpp python scripts/gguf_tokenizer_refs.py
*.refs.json: what transformers' own GGUF loading (AutoTokenizer.from_pretrained(dir,
gguf_file=...), its integrations/ggml.py converters) gives on CORPUS: ids with and without
special tokens, token strings, decodes; for SmolLM2 also apply_chat_template of CONVERSATION.

transformers decides; hone's tests (crates/hone-model/tests/gguf.rs) replay these files.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from importlib.metadata import version

import gguf
import tokenizers
import numpy as np
import transformers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gguf")
SMOLLM2 = os.path.join(ROOT, "checkpoints", "base", "smollm2-135m-instruct",
                       "SmolLM2-135M-Instruct.Q4_1.gguf")
STORIES = os.path.join(ROOT, "checkpoints", "base", "stories260k")

CORPUS = [
    "Hello, world!",
    "The capital of France is Paris.",
    " leading space and trailing space ",
    "Café déjà vu — naïve façade, Ångström, Straße, ñandú.",
    "日本語のテキストと中文字符，한국어도 있습니다。",
    "Emoji: 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵!",
    "Numbers: 1234567890, 3.14159, -42, 1e-10, 0x1F, 2026-12-03.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet x: Vec<u32> = vec![1, 2, 3];\n\tprintln!(\"{x:?}\");\n}\n",
    "tabs\t\tand\tspaces    and\n\n\nnewlines\r\n  \n end",
    "    four leading spaces",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|>text after a special token<|im_start|>",
    "I'm sure they'll say you've done it; we'd know. DON'T SHOUT",
    "a",
    "",
    "   ",
    "\n",
    "Ünïcödé ßträngé wörds",
    "mixed12ab34cd 5 67 890",
    "<s>hello</s> <unk> not special in every vocabulary",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in one word: 東京?"},
]
CONVERSATION_NO_SYSTEM = [{"role": "user", "content": "Hi there!"}]


def copy_metadata(src, dst):
    """Every metadata key of `src` into a tensor-free GGUF file `dst`, values and types kept."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stories_gguf(dst):
    """checkpoints/base/stories260k's tokenizer.json as convert_hf_to_gguf.py's
    `_set_vocab_llama_hf` writes it (vocab order, scores, token types, special ids)."""
    tok = json.load(open(os.path.join(STORIES, "tokenizer.json")))
    cfg = json.load(open(os.path.join(STORIES, "tokenizer_config.json")))
    vocab = tok["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    added = {a["id"]: a for a in tok["added_tokens"]}
    tokens, scores, types = [], [], []
    # LlamaHfVocab.hf_tokens: score = -1000 for added tokens, else -id (BPE vocabularies carry
    # no scores; the merge rank stands in), types: <0xNN> BYTE, added special CONTROL, UNK.
    for text, i in by_id:
        tokens.append(text.encode("utf-8"))
        if i in added:
            scores.append(-1000.0)
            content = added[i]["content"]
            if content == tok["model"].get("unk_token"):
                types.append(gguf.TokenType.UNKNOWN)
            elif added[i]["special"]:
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            scores.append(-float(i))
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(dst, arch="llama")
    w.add_name("stories260k tokenizer")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # Metaspace with prepend_scheme "first" (or a Prepend normalizer): a space prefix.
    w.add_add_space_prefix(True)
    w.add_bos_token_id(vocab[cfg["bos_token"]] if isinstance(cfg["bos_token"], str)
                       else vocab[cfg["bos_token"]["content"]])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_add_bos_token(bool(cfg.get("add_bos_token", True)))
    w.add_add_eos_token(bool(cfg.get("add_eos_token", False)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def refs(path, corpus, chat):
    d = tempfile.mkdtemp()
    try:
        shutil.copy(path, os.path.join(d, "model.gguf"))
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    finally:
        shutil.rmtree(d)
    out = {
        "generator": f"transformers {transformers.__version__} ({type(tok).__name__}), "
                     f"tokenizers {tokenizers.__version__}, gguf {version('gguf')}",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "unk_token": tok.unk_token, "pad_token": tok.pad_token,
        "samples": [],
    }
    for text in corpus:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        plain = tok(text, add_special_tokens=False)["input_ids"]
        out["samples"].append({
            "text": text,
            "ids": ids,
            "ids_no_special": plain,
            "tokens": tok.convert_ids_to_tokens(plain),
            "decode": tok.decode(plain),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    if chat:
        out["chat"] = []
        for conv in (CONVERSATION, CONVERSATION_NO_SYSTEM):
            for gen in (False, True):
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                out["chat"].append({
                    "messages": conv, "add_generation_prompt": gen, "text": text,
                    "ids": tok(text, add_special_tokens=False)["input_ids"],
                })
    return out


def write_json(name, value):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    if not os.path.isfile(SMOLLM2):
        sys.exit(f"{SMOLLM2} is missing: run scripts/fetch-models.sh first")
    smol = os.path.join(OUT, "smollm2-tokenizer.gguf")
    copy_metadata(SMOLLM2, smol)
    write_json("smollm2-tokenizer.refs.json", refs(smol, CORPUS, chat=True))
    stories = os.path.join(OUT, "stories260k-tokenizer.gguf")
    stories_gguf(stories)
    write_json("stories260k-tokenizer.refs.json", refs(stories, CORPUS, chat=False))
    converted = os.path.join(OUT, "stories260k-llamacpp-tokenizer.gguf")
    llama_cpp = os.environ.get("LLAMA_CPP")
    if llama_cpp:
        env = dict(os.environ, PYTHONPATH=os.path.join(llama_cpp, "gguf-py"))
        subprocess.run([sys.executable, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), STORIES,
                        "--vocab-only", "--outfile", converted], check=True, env=env)
    write_json("stories260k-llamacpp-tokenizer.refs.json", refs(converted, CORPUS, chat=False))


if __name__ == "__main__":
    main()
