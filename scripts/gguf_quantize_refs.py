#!/usr/bin/env python3
"""Writes fixtures/gguf/quantize/refs.gguf: f32 inputs and what gguf-py (the `gguf` package of
llama.cpp) quantizes them to, for hone's GGUF writer (crates/hone-model/tests/gguf_quantize.rs
checks hone's bytes against these).
  python3 -m venv /tmp/ggufenv && /tmp/ggufenv/bin/pip install gguf numpy
  /tmp/ggufenv/bin/python scripts/gguf_quantize_refs.py
Tensors: `input` [ROWS, 512] f32 (seeded normal rows at several scales, and rows of edge cases:
all-zero blocks, one non-zero value, ties for the largest magnitude, constant blocks, values on
rounding boundaries, values so small that the f16 scale is 0, a negative-only block), then `q.<type>` = gguf.quants.quantize
(input, type) for F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (raw bytes, stored as that type).
"""
import os
import sys
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gguf", "quantize")
os.makedirs(out_dir, exist_ok=True)
rng = np.random.default_rng(20261204)
COLS = 512
rows = [rng.standard_normal(COLS) * s for s in (1.0, 0.02, 30.0, 1e-3)]
edge = np.zeros(COLS)
edge[32 + 7] = -2.5                                          # one non-zero value, negative
edge[64:96] = np.linspace(-1, 1, 32)                         # symmetric: the tie goes to the first
edge[96:128] = 0.75                                          # constant block
edge[128:160] = -np.abs(rng.standard_normal(32))             # negative only
edge[160:192] = np.arange(32) - 16.0                          # integers: Q8_0 steps land on .5s
edge[192:224] = rng.standard_normal(32) * 1e-30              # tiny: d underflows f16
edge[224:256] = np.array([3.0, -3.0] * 16)                   # max tie, positive first
edge[256:288] = (np.arange(32) % 16) * (1 / 15)              # Q4_1 steps exactly
edge[288:320] = rng.standard_normal(32) * 6000               # large, within f16
edge[320:512] = rng.uniform(-1, 1, 192)
rows.append(edge)
inp = np.ascontiguousarray(np.stack(rows).astype(np.float32))

w = gguf.GGUFWriter(os.path.join(out_dir, "refs.gguf"), arch="llama")
w.add_string("general.description", f"gguf-py {version('gguf')} quantize() of `input`")
w.add_tensor("input", inp)
for ty in (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
    raw = gguf.quants.quantize(inp, ty)
    if ty == T.F16:
        w.add_tensor(f"q.{ty.name.lower()}", raw)
    else:
        w.add_tensor(f"q.{ty.name.lower()}", raw, raw_dtype=ty)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", out_dir, "with gguf", version("gguf"), "numpy", np.__version__, file=sys.stderr)
