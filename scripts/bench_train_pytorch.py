#!/usr/bin/env python3
"""PyTorch + PEFT counterpart of `hone bench train`, for side-by-side figures.

Same work per step as hone's benchmark: a randomly initialised Llama of the named shape in fp32,
LoRA (PEFT) on the given projections, random token ids as inputs and labels, causal-LM loss,
backward, global-norm clipping at 1.0 and one AdamW step; one warm-up step, then `--steps` timed
steps. Prints one JSON line with the same keys as `hone bench train`.

    pip install torch transformers peft
    python scripts/bench_train_pytorch.py --shape small --seq 256 --batch 4 --lora-r 16 \
        --targets q_proj,v_proj --steps 5
"""

import argparse
import json
import resource
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1408, vocab_size=32000,
                  tie_word_embeddings=False),
    "smol": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                 tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                     tie_word_embeddings=True),
}


def machine():
    """(CPU model, ISA) as `hone bench train` reports them (`avx512`, `avx2` or `sse`)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown", "unknown"
    lines = text.splitlines()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "unknown")
    flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        isa = "avx512"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "sse"
    return model, isa


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="base weights' dtype (bf16: adapters stay f32 under autocast-free mixed precision)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[a.shape], rms_norm_eps=1e-5, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float()
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(a.device)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets = a.targets.split(",")
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha or 2 * a.lora_r, lora_dropout=0.0,
                      target_modules="all-linear" if targets == ["all-linear"] else targets)
    model = get_peft_model(model, lora)
    if a.dtype == "bf16":
        # PEFT's usual mixed precision: bf16 frozen base, f32 trainable adapters.
        for q in model.parameters():
            if q.requires_grad:
                q.data = q.data.float()
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(42)

    def step():
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=gen).to(a.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()
    sync()
    started = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "bench": "train", "impl": f"pytorch {torch.__version__}", "shape": a.shape,
        "device": a.device, "dtype": a.dtype, "seq": a.seq, "batch": a.batch, "lora_r": a.lora_r,
        "targets": targets, "trainable_params": trainable, "steps": a.steps,
        "tokens_per_sec": a.batch * a.seq * a.steps / seconds,
        "sec_per_step": seconds / a.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20
                        if a.device.startswith("cuda") else None),
        "cpu": machine()[0], "isa": machine()[1],
        "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
