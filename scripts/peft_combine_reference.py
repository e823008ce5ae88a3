#!/usr/bin/env python3
"""PEFT `add_weighted_adapter` references for hone-merge's tests (writes fixtures/peft_combine/).

Starting from the PEFT fixture `fixtures/peft/llama_gqa` (base model + `adapter/`, here adapter "one"),
this makes two more LoRA adapters with PEFT ("two": r=8, alpha=8; "three": r=4, alpha=8; other seeds,
lora_B ~ N(0, 0.05^2)), saves them, reloads all three from disk and runs PEFT's real
`LoraModel.add_weighted_adapter` for each deterministic combination type. Each result is saved with
`save_pretrained` (adapter_config.json + adapter_model.safetensors) under `combined/<case>/`.

`svd_clamp` makes PEFT's result depend on the signs LAPACK gives the singular vectors (the clamp
quantile is taken over the entries of U·S and Vh), which no other SVD reproduces. For that case the
script transcribes PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`, checks that the
transcription reproduces PEFT's own output exactly, and saves the transcription's result with the
sign convention hone uses (in each kept singular triplet the largest-magnitude entry of U's column is
positive; the first such entry on ties).

Run from the repository root with the reference stack (torch 2.15 CPU, transformers 5.24, PEFT 0.21.2):
    /work/pyref/bin/python scripts/peft_combine_reference.py
"""
import json
import os
import shutil
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import task_arithmetic
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "fixtures", "peft", "llama_gqa")
OUT = os.path.join(ROOT, "fixtures", "peft_combine")
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

# name, r, lora_alpha, seed (adapter "one" is the llama_gqa fixture's: r=8, alpha=16).
NEW_ADAPTERS = [("adapter_two", 8, 8, 1234), ("adapter_three", 4, 8, 4321)]

# Each case is one add_weighted_adapter call; keys are its keyword arguments (`adapters` by name).
CASES = [
    dict(name="linear", adapters=["one", "two"], weights=[0.7, 0.4], combination_type="linear"),
    dict(name="cat", adapters=["one", "three"], weights=[0.7, -0.3], combination_type="cat"),
    dict(name="ties", adapters=["one", "two"], weights=[0.7, 0.4], combination_type="ties", density=0.5),
    dict(name="magnitude_prune", adapters=["one", "two"], weights=[0.7, 0.4],
         combination_type="magnitude_prune", density=0.5),
    # Default svd_rank: the largest rank, 8, of a delta of rank 20.
    dict(name="svd", adapters=["one", "two", "three"], weights=[0.7, 0.4, -0.3], combination_type="svd"),
    dict(name="ties_svd", adapters=["one", "two"], weights=[0.7, 0.4], combination_type="ties_svd",
         density=0.5, svd_rank=4, majority_sign_method="frequency"),
    dict(name="magnitude_prune_svd", adapters=["one", "three"], weights=[0.7, -0.3],
         combination_type="magnitude_prune_svd", density=0.5),
    # Saved from the transcription with hone's sign convention (see the module docstring).
    dict(name="svd_clamp", adapters=["one", "two"], weights=[0.7, 0.4], combination_type="svd",
         svd_rank=4, svd_clamp=0.9),
]


def sort_target_modules(path):
    """PEFT writes `target_modules` in set order, which changes with Python's string hashing."""
    with open(path) as f:
        config = json.load(f)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def base_model():
    return AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()


def make_adapter(name, r, alpha, seed):
    torch.manual_seed(seed)  # lora_A: PEFT's kaiming-uniform init
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(), config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, param in sorted(model.named_parameters()):
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.peft_config["default"].base_model_name_or_path = "../../peft/llama_gqa"
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))  # PEFT's model card template: not needed
    sort_target_modules(os.path.join(out, "adapter_config.json"))


def lora_layers(model, adapter):
    """(PEFT key prefix, layer) of every LoRA layer holding `adapter`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def canonical_signs(U, Vh):
    """Flips each triplet so that the largest-magnitude entry of U's column is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def transcribed_svd(model, case, canonical):
    """PEFT's `_svd_generalized_task_arithmetic_weighted_adapter` for combination_type `svd` (linear
    layers, no fan_in_fan_out), optionally with the canonical signs: {key: tensor}."""
    rank, clamp = case["svd_rank"], case["svd_clamp"]
    tensors = {}
    for name, layer in lora_layers(model, case["adapters"][0]):
        valid = [(a, w) for a, w in zip(case["adapters"], case["weights"]) if a in layer.lora_A]
        deltas = [layer.get_delta_weight(a) for a, _ in valid]
        delta = task_arithmetic(deltas, torch.tensor([w for _, w in valid]))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
        if canonical:
            U, Vh = canonical_signs(U, Vh)
        U = U @ torch.diag(S)
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi_val = torch.quantile(dist, clamp)
        U, Vh = U.clamp(-hi_val, hi_val), Vh.clamp(-hi_val, hi_val)
        tensors[f"{name}.lora_A.weight"] = Vh.contiguous()
        tensors[f"{name}.lora_B.weight"] = U.contiguous()
    return tensors


def singular_gaps(model, case, rank):
    """Per module, in float64: sigma_1, sigma_r, sigma_{r+1} of the combined delta PEFT decomposes."""
    from peft.utils import merge_utils

    rule = case["combination_type"].removesuffix("_svd")
    gaps = {}
    for name, layer in lora_layers(model, case["adapters"][0]):
        valid = [(a, w) for a, w in zip(case["adapters"], case["weights"]) if a in layer.lora_A]
        deltas = [layer.get_delta_weight(a) for a, _ in valid]
        weights = torch.tensor([w for _, w in valid])
        if rule == "svd":
            delta = task_arithmetic(deltas, weights)
        elif rule == "ties":
            delta = merge_utils.ties(deltas, weights, case["density"], case.get("majority_sign_method", "total"))
        else:
            delta = merge_utils.magnitude_prune(deltas, weights, case["density"])
        s = torch.linalg.svdvals(delta.double())
        gaps[name.removeprefix("base_model.model.")] = [s[0].item(), s[rank - 1].item(), s[rank].item()]
    return gaps


def main():
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    for name, r, alpha, seed in NEW_ADAPTERS:
        make_adapter(name, r, alpha, seed)

    # Every input reloaded from disk, so PEFT combines exactly the stored values hone reads.
    model = PeftModel.from_pretrained(base_model(), os.path.join(SRC, "adapter"), adapter_name="one")
    model.load_adapter(os.path.join(OUT, "adapter_two"), adapter_name="two")
    model.load_adapter(os.path.join(OUT, "adapter_three"), adapter_name="three")
    ranks = {"one": 8, "two": 8, "three": 4}

    combined = os.path.join(OUT, "combined")
    shutil.rmtree(combined, ignore_errors=True)
    meta_cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            kwargs = {k: v for k, v in case.items() if k != "name"}
            model.add_weighted_adapter(adapter_name=case["name"], **kwargs)
            model.save_pretrained(tmp, selected_adapters=[case["name"]])
            saved = os.path.join(tmp, case["name"])
            dest = os.path.join(combined, case["name"])
            os.makedirs(dest)
            shutil.copy(os.path.join(saved, "adapter_config.json"), dest)
            sort_target_modules(os.path.join(dest, "adapter_config.json"))
            config = json.load(open(os.path.join(saved, "adapter_config.json")))
            entry = dict(case, r=config["r"], lora_alpha=config["lora_alpha"])
            if "svd_clamp" in case:
                peft_tensors = load_file(os.path.join(saved, "adapter_model.safetensors"))
                mine = transcribed_svd(model, case, canonical=False)
                assert mine.keys() == peft_tensors.keys()
                worst = max((mine[k] - peft_tensors[k]).abs().max().item() for k in mine)
                assert worst == 0.0, f"transcription differs from PEFT's svd_clamp by {worst}"
                save_file(transcribed_svd(model, case, canonical=True),
                          os.path.join(dest, "adapter_model.safetensors"), metadata={"format": "pt"})
                entry["saved"] = "transcription with canonical signs (equal to PEFT's output without them)"
            else:
                shutil.copy(os.path.join(saved, "adapter_model.safetensors"), dest)
                entry["saved"] = "PEFT add_weighted_adapter + save_pretrained"
            if case["combination_type"].endswith("svd"):
                rank = case.get("svd_rank") or max(ranks[a] for a in case["adapters"])
                gaps = singular_gaps(model, case, rank)
                entry["singular_values_s1_sr_sr1"] = gaps
                entry["min_relative_gap"] = min((g[1] - g[2]) / g[0] for g in gaps.values())
            meta_cases.append(entry)

    meta = {
        "script": "scripts/peft_combine_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "base": "fixtures/peft/llama_gqa",
        "adapters": {
            "one": {"dir": "fixtures/peft/llama_gqa/adapter", "r": 8, "lora_alpha": 16},
            **{n.removeprefix("adapter_"): {"dir": f"fixtures/peft_combine/{n}", "r": r, "lora_alpha": a, "seed": s}
               for n, r, a, s in NEW_ADAPTERS},
        },
        "sign_convention": "largest-magnitude entry of each kept column of U positive (first on ties)",
        "cases": meta_cases,
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
