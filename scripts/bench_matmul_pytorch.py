#!/usr/bin/env python3
"""PyTorch's rate on the matrix products of a LoRA training step, beside hone's.

The frozen weights' products of `hone bench train` (seq 256 x batch 4 = 1,024 tokens): the
forward `x @ W.T` and the input gradient `g @ W` of each projection shape, and the output
projection's two products. The same lines as `cargo run --release -p hone-model --example
kernel_times` prints for hone's kernels (`linear_nt ...`, `linear_nn ...`), one JSON line per
product with its median time and GFLOP/s, then the fastest rate and what a step would take if
every product ran at it (`ceiling_tokens_per_sec`): run both on one machine to see whether the
two BLAS differ, and how far either step is from its products alone.

    python scripts/bench_matmul_pytorch.py [--shape small|smol] [--repeats 7]

To compare with hone's AVX2 build on an AVX-512 machine, hold PyTorch to AVX2 as
scripts/bench_train_side_by_side.sh does: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2.
"""

import argparse
import json
import os
import statistics
import time

import torch

# hidden, layers, heads, kv heads, intermediate, vocab (as `hone bench train --shape`).
SHAPES = {
    "small": (512, 8, 8, 8, 1408, 32000),
    "smol": (576, 30, 9, 3, 1536, 49152),
}


def median_seconds(repeats, f):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    h, layers, heads, kv_heads, inter, vocab = SHAPES[a.shape]
    rows = 256 * 4
    kv = kv_heads * (h // heads)
    flop_total = 0.0
    best = 0.0
    lines = []

    def report(kernel, calls, seconds, flop):
        nonlocal flop_total, best
        flop_total += calls * flop
        best = max(best, flop / seconds)
        lines.append(dict(shape=a.shape, kernel=kernel, calls_per_step=calls,
                          ms_per_call=round(seconds * 1e3, 3),
                          ms_per_step=round(calls * seconds * 1e3, 2),
                          gflops=round(flop / seconds / 1e9, 1)))
        print(json.dumps(lines[-1]), flush=True)

    # (name, out, in, forward calls, input-gradient calls): layer 0's q, k, v have no input gradient.
    linears = [
        ("h->h (q, o)", h, h, 2 * layers, 2 * layers - 1),
        ("h->kv (k, v)", kv, h, 2 * layers, 2 * layers - 2),
        ("h->inter (gate, up)", inter, h, 2 * layers, 2 * layers),
        ("inter->h (down)", h, inter, layers, layers),
    ]
    with torch.no_grad():
        for name, out, inp, fwd_calls, _ in linears:
            x, w = torch.randn(rows, inp) * 0.1, torch.randn(out, inp) * 0.1
            t = median_seconds(a.repeats, lambda: torch.nn.functional.linear(x, w))
            report(f"linear_nt {name}", fwd_calls, t, 2.0 * rows * out * inp)
        for name, out, inp, _, bwd_calls in linears:
            g, w = torch.randn(rows, out) * 0.1, torch.randn(out, inp) * 0.1
            t = median_seconds(a.repeats, lambda: g @ w)
            report(f"linear_nn {name}", bwd_calls, t, 2.0 * rows * out * inp)
        x, w = torch.randn(rows, h) * 0.1, torch.randn(vocab, h) * 0.1
        logits = torch.nn.functional.linear(x, w)
        t = median_seconds(a.repeats, lambda: (torch.nn.functional.linear(x, w), logits @ w))
        report("output projection (logits, dh)", 1, t, 2.0 * 2.0 * rows * vocab * h)
    # Attention's products, counted as kernel_times counts them (not timed here: SDPA's own
    # kernel is not one of the BLAS products): causal blocks of 64 queries, the forward pass's
    # two products and the backward pass's five.
    seen = sum(64 * i * 64 for i in range(1, 256 // 64 + 1))
    flop_total += layers * 3.5 * 2.0 * 2.0 * 4 * heads * seen * (h // heads)
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(json.dumps(dict(
        shape=a.shape, cpu=cpu, peer=f"torch {torch.__version__}", threads=a.threads,
        capability=torch.backends.cpu.get_cpu_capability(),
        products_ms_per_step=round(sum(l["ms_per_step"] for l in lines), 1),
        product_gflop_per_step=round(flop_total / 1e9, 1),
        best_product_gflops=round(best / 1e9, 1),
        ceiling_tokens_per_sec=round(rows / (flop_total / best)))), flush=True)


if __name__ == "__main__":
    main()
