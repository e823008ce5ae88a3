#!/usr/bin/env python3
"""Writes fixtures/gguf/smollm2-greedy.refs.json: transformers' greedy continuations and prompt
logits of the fetched SmolLM2-135M-Instruct Q4_1 GGUF, for hone's end-to-end GGUF test.

  /work/pyref/bin/pip install gguf numpy transformers torch
  scripts/fetch-models.sh        # SmolLM2-135M-Instruct.Q4_1.gguf into checkpoints/base/
  /work/pyref/bin/python scripts/gguf_greedy_refs.py

The model and tokenizer come from transformers' own GGUF loading
(`from_pretrained(dir, gguf_file=...)`), weights dequantized to float32 (GgufConfig(dequantize=
True)), on the CPU. Each prompt is one user message through the file's chat template with the
generation prompt; generation is greedy (do_sample=False), 40 new tokens at most, stopping at the
file's EOS. For each prompt the refs hold the prompt ids, the generated ids and text, and the
logits of chosen rows of the prompt: the last position in full (argmax, top ids) and 256 values
of it and of the first and middle positions.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "checkpoints", "base", "smollm2-135m-instruct",
                     "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "fixtures", "gguf", "smollm2-greedy.refs.json")
MAX_NEW_TOKENS = 40
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does.",
    "Translate 'good morning' into Spanish.",
]
# Logit values saved per row: ids 0..255 (special tokens and common bytes) and the top ids.
COLUMNS = 256
TOP = 20


def main():
    if not os.path.isfile(MODEL):
        sys.exit(f"{MODEL} is missing: run scripts/fetch-models.sh first")
    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    os.symlink(os.path.abspath(MODEL), os.path.join(d, "model.gguf"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file="model.gguf", dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.eval()
    kinds = sorted({type(m).__name__ for m in model.modules()})
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    out = {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "model": "checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "modules": kinds, "dtypes": dtypes,
        "max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": tok.eos_token_id,
        "columns": COLUMNS, "prompts": [],
    }
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float().numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)
        new = gen[0, len(ids):].tolist()
        rows = {}
        for pos in (0, len(ids) // 2, len(ids) - 1):
            row = logits[pos]
            top = np.argsort(-row, kind="stable")[:TOP]
            rows[str(pos)] = {
                "head": [float(v) for v in row[:COLUMNS]],
                "top_ids": [int(i) for i in top],
                "top_values": [float(row[i]) for i in top],
            }
        out["prompts"].append({
            "prompt": prompt, "chat_text": text, "prompt_ids": ids,
            "new_ids": new,
            "text": tok.decode(new, skip_special_tokens=True),
            "logit_rows": rows,
        })
        print(prompt, "->", repr(out["prompts"][-1]["text"]), flush=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
