#!/usr/bin/env python3
"""Reference RoPE inverse frequencies for hone's tests (writes fixtures/rope/reference.json).

A float32 numpy transcription of transformers' `modeling_rope_utils` (v4.4x-5.x):
`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters` and
`_compute_llama3_parameters`. Run: `pip install numpy && python3 scripts/rope_reference.py`.
"""
import json
import math
import os

import numpy as np


def default_inv_freq(base, dim):
    # 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)


def linear_inv_freq(base, dim, factor):
    return (default_inv_freq(base, dim) / np.float32(factor)).astype(np.float32)


def llama3_inv_freq(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    inv_freq = default_inv_freq(base, dim)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth_factor = ((np.float32(old_context_len) / wavelen - np.float32(low_freq_factor))
                     / np.float32(high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth_factor) * inv_freq_llama / np.float32(factor) + smooth_factor * inv_freq_llama).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32), wavelen, low_freq_wavelen, high_freq_wavelen


def main():
    out = {}
    # Llama 3.2 settings (factor 32, low 1, high 4, original 8192), head_dim 64, theta 500000:
    # the 32 frequencies fall in all three regimes (high: unchanged, medium: smoothed, low: / factor).
    cfg = dict(base=500000.0, dim=64, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192)
    inv, wavelen, low_w, high_w = llama3_inv_freq(**cfg)
    regimes = ["high" if w < high_w else ("low" if w > low_w else "medium") for w in wavelen]
    out["llama3"] = dict(config=cfg, inv_freq=[float(x) for x in inv], regimes=regimes)
    out["linear"] = dict(config=dict(base=10000.0, dim=16, factor=4.0),
                         inv_freq=[float(x) for x in linear_inv_freq(10000.0, 16, 4.0)])
    out["default"] = dict(config=dict(base=10000.0, dim=16),
                          inv_freq=[float(x) for x in default_inv_freq(10000.0, 16)])
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "rope", "reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("regimes:", {r: regimes.count(r) for r in set(regimes)})


if __name__ == "__main__":
    main()
