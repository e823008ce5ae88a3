#!/usr/bin/env python3
"""Checks that an adapter hone trained on a GGUF base loads onto the dequantized model in PEFT
and gives hone's logits: transformers loads the GGUF (`from_pretrained(dir, gguf_file=...)`,
dequantized to f32, llama's q/k rows un-permuted), PEFT loads the adapter, and the logits of a
chat prompt are compared with `hone logits --adapter` on the same file (weights kept quantized).

  python3 -m venv /work/venv-ref
  /work/venv-ref/bin/pip install torch transformers peft==0.21.2 gguf numpy safetensors
  cargo build --release -p hone-cli
  /work/venv-ref/bin/python scripts/gguf_adapter_peft_check.py \
      checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      checkpoints/runs/smollm2-alpaca/adapter

Prints one JSON line (max and mean absolute difference, base and adapter); exits 1 above 1e-3.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, adapter = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
hone = sys.argv[3] if len(sys.argv) > 3 else "target/release/hone"
torch.manual_seed(0)
d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
text = tok.apply_chat_template(
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
with torch.no_grad():
    base = model(ids).logits.numpy()
    peft = PeftModel.from_pretrained(model, adapter).eval()
    tuned = peft(ids).logits.numpy()

report = {"prompt_tokens": int(ids.shape[1])}
with tempfile.TemporaryDirectory() as tmp:
    save_file({"input_ids": ids.numpy().astype(np.int64)}, os.path.join(tmp, "ids.safetensors"))
    for name, ref, extra in [("base", base, []), ("adapter", tuned, ["--adapter", adapter])]:
        out = os.path.join(tmp, f"{name}.safetensors")
        subprocess.run([hone, "logits", "--model", gguf_path, "--input-ids",
                        os.path.join(tmp, "ids.safetensors"), "--out", out, *extra], check=True)
        ours = load_file(out)["logits"]
        diff = np.abs(ours - ref)
        report[name] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
report["adapter_effect_max_abs"] = float(np.abs(tuned - base).max())
print(json.dumps(report))
sys.exit(0 if max(report["base"]["max_abs_diff"], report["adapter"]["max_abs_diff"]) <= 1e-3 else 1)
