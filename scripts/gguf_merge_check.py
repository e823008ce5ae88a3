#!/usr/bin/env python3
"""Checks `hone merge` from a GGUF base against transformers + PEFT: the merged Hugging Face
directory hone wrote loads in transformers (`from_pretrained(merged)`, its tokenizer through
`AutoTokenizer`), and

  * its logits on a chat prompt equal PEFT's `merge_and_unload` of the same adapter on the GGUF
    loaded by transformers (`from_pretrained(dir, gguf_file=...)`, dequantized to f32);
  * its tokenizer gives the GGUF tokenizer's ids on a few texts, its chat template renders the
    same text, and its generation config stops at the same EOS ids.

  python3 -m venv /work/venv-ref
  /work/venv-ref/bin/pip install torch transformers peft==0.21.2 gguf numpy safetensors
  cargo build --release -p hone-cli
  target/release/hone merge --model checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      --adapter checkpoints/runs/smollm2-alpaca/adapter --out /tmp/merged-smol
  /work/venv-ref/bin/python scripts/gguf_merge_check.py \
      checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      checkpoints/runs/smollm2-alpaca/adapter /tmp/merged-smol

Prints one JSON line; exits 1 when the logits differ by more than 1e-3 or a tokenizer check fails.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

gguf_path, adapter, merged = (os.path.abspath(a) for a in sys.argv[1:4])
d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
gguf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
ours_tok = AutoTokenizer.from_pretrained(merged)
chat = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Give three tips for staying healthy."}]
report = {}
text = gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
report["chat_template_same"] = text == ours_tok.apply_chat_template(
    chat, tokenize=False, add_generation_prompt=True)
samples = [text, "naïve café 東京 🙂 12345 x\t\ty\n\n  z", "def f(x):\n    return x**2  # ok"]
report["ids_same"] = all(gguf_tok(s)["input_ids"] == ours_tok(s)["input_ids"] for s in samples)
report["eos_ids"] = GenerationConfig.from_pretrained(merged).eos_token_id
report["gguf_eos_id"] = gguf_tok.eos_token_id

ids = gguf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
with torch.no_grad():
    reference = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference, adapter).merge_and_unload().eval()
    expected = reference(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    got = loaded(ids).logits
diff = (got - expected).abs()
report.update(prompt_tokens=int(ids.shape[1]), max_abs_diff=float(diff.max()),
              mean_abs_diff=float(diff.mean()))
print(json.dumps(report))
ok = report["max_abs_diff"] <= 1e-3 and report["ids_same"] and report["chat_template_same"]
sys.exit(0 if ok else 1)
