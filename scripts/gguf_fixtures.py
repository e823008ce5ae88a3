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
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import save_file

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
