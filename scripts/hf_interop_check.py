#!/usr/bin/env python3
"""Checks that what hone writes loads in the Hugging Face stack and computes what hone computes.

For each PEFT fixture model (fixtures/peft/llama_gqa: Llama with GQA, untied embeddings;
fixtures/peft/qwen2_tied: Qwen2 with q/k/v biases and tied embeddings) this script

1. has `hone train` write adapters (a few AdamW steps at lr 1e-2 on a tiny Alpaca set, so B is
   non-zero), one per case in ADAPTERS: plain LoRA on the seven projections named explicitly,
   plain LoRA with `target_modules = ["all-linear"]`, and rsLoRA with per-module rank and alpha
   (`rank_pattern`, `alpha_pattern`); then `hone adapter combine` writes two more (cat of two
   adapters with weights, linear of one with weight 0.5);
2. loads each adapter with `PeftModel.from_pretrained` (recording PEFT's warnings about missing or
   unexpected keys, and checking every tensor of the file arrived in the PEFT model) and compares
   PEFT's logits with `hone logits --adapter` (max abs diff <= 1e-4);
3. runs `hone merge` of the plain adapter as f32 in shards small enough to need an index, and as
   bf16, and loads each output with AutoModelForCausalLM / AutoTokenizer / GenerationConfig:
   `output_loading_info=True` must report no missing, unexpected or mismatched keys, and nothing
   may be logged about weights not initialised from the checkpoint. Logits are compared with
   hone's: f32 merged (transformers) vs hone base+adapter <= 1e-4; bf16 merged, both upcast to f32,
   vs hone on the same bf16 directory <= 1e-4; bf16 merged computed natively in bf16 by both
   (tolerance BF16_NATIVE_TOL).

Prints one JSON line per check and a closing summary line; exits 1 when a check fails.
With --write-fixtures DIR it also writes the CI fixtures (see fixtures/hf_interop/README.md).

Usage (from the repository root; scripts/hf-interop-check.sh builds hone and sets up Python):
    python scripts/hf_interop_check.py [--hone target/release/hone] [--keep DIR]
        [--write-fixtures fixtures/hf_interop]
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import peft
import safetensors
import tokenizers
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["llama_gqa", "qwen2_tied"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32_TOL = 1e-4
BF16_NATIVE_TOL = 0.05  # measured <= 7.8e-3 (bf16 rounding of logits ~0.5-2 in size)
# The adapter effect must be far above the tolerance, or a match would prove nothing.
MIN_ADAPTER_EFFECT = 1e-2

# name -> [lora] table of the run config (TOML source).
ADAPTERS = {
    "lora": 'r = 8\nalpha = 16\ntarget_modules = ["q_proj", "k_proj", "v_proj", "o_proj", '
    '"gate_proj", "up_proj", "down_proj"]\n',
    "lora_all_linear": 'r = 4\nalpha = 8\ntarget_modules = ["all-linear"]\n',
    "rslora": 'r = 8\nalpha = 4\nuse_rslora = true\n'
    'target_modules = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]\n'
    'rank_pattern = { down_proj = 4, "self_attn.o_proj" = 2 }\n'
    'alpha_pattern = { v_proj = 12 }\n',
}
# name -> arguments of `hone adapter combine` (adapters by case name).
COMBINED = {
    "combined_cat": (["lora", "rslora"], ["--method", "cat", "--weights", "0.6,0.4"]),
    "combined_linear": (["lora"], ["--method", "linear", "--weights", "0.5"]),
}
# Which cases go into the CI fixtures, per model.
FIXTURE_ADAPTER = {"llama_gqa": "lora", "qwen2_tied": "rslora"}

RESULTS = []


def report(check, model, case, ok, **fields):
    line = {"check": check, "model": model, "case": case, "ok": bool(ok), **fields}
    RESULTS.append(line)
    print(json.dumps(line), flush=True)
    return ok


def sh(args, **kwargs):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def git_head():
    """The commit hone was built from (plus " (modified tree)" when the work tree differs)."""
    try:
        head = sh(["git", "rev-parse", "HEAD"], cwd=ROOT).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "crates"], cwd=ROOT).returncode != 0
        return head + (" (modified tree)" if dirty else "")
    except (RuntimeError, OSError):
        return "unknown"


def max_abs(a, b):
    return float((a.float() - b.float()).abs().max())


class Captured:
    """Collects Python warnings and transformers/PEFT log records of WARNING and above."""

    def __enter__(self):
        self.records = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.records.append(record.getMessage())
        self.loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
        for logger in self.loggers:
            logger.addHandler(self.handler)
        self.warn_ctx = warnings.catch_warnings(record=True)
        self.warnings = self.warn_ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.warn_ctx.__exit__(*exc)
        for logger in self.loggers:
            logger.removeHandler(self.handler)
        self.messages = self.records + [str(w.message) for w in self.warnings]
        return False


def suspicious(messages):
    words = ("missing", "unexpected", "not initialized", "newly initialized", "not used", "mismatch")
    return [m for m in messages if any(w in m.lower() for w in words)]


def data_file(path):
    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna", "Kiki", "Omar"]
    colors = ["red", "blue", "green", "yellow"]
    with open(path, "w") as f:
        for i in range(32):
            name, color = names[i % len(names)], colors[(i // 3) % len(colors)]
            f.write(json.dumps({
                "instruction": f"Tell me a story about {name} number {i}.",
                "output": f"{name} had a {color} ball. {name} was happy on day {i * 7 % 31}.",
            }) + "\n")


def train(hone, work, model, case):
    run_dir = os.path.join(work, model, "runs", case)
    config = os.path.join(work, model, f"{case}.toml")
    with open(config, "w") as f:
        f.write(
            f'[model]\npath = "{os.path.join("fixtures/peft", model)}"\n\n'
            f'[data]\ninputs = ["{os.path.join(work, "data.jsonl")}"]\nsplit = {{ val_fraction = 0.2 }}\n\n'
            '[tokenize]\ntemplate = "alpaca"\nmax_seq_len = 128\npacking = false\n\n'
            f"[lora]\n{ADAPTERS[case]}\n"
            "[train]\nlr = 1e-2\nmicro_batch_size = 2\nmax_steps = 12\nwarmup_steps = 0\nseed = 7\n"
            "log_every = 12\n\n[eval]\nat_start = false\n\n"
            f'[output]\ndir = "{run_dir}"\n'
        )
    sh([hone, "train", "--config", config, "--overwrite"], cwd=ROOT)
    return os.path.join(run_dir, "adapter")


def hone_logits(hone, model_dir, inputs, out, adapter=None, dtype="f32"):
    args = [hone, "logits", "--model", model_dir, "--input-ids", inputs, "--out", out, "--dtype", dtype]
    if adapter:
        args += ["--adapter", adapter]
    sh(args, cwd=ROOT)
    return load_file(out)["logits"]


def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def check_peft(hone, work, model, case, adapter, ids, base_logits):
    """PEFT loads the hone-written adapter; its logits equal hone's. Returns PEFT's logits or None."""
    model_dir = os.path.join(ROOT, "fixtures/peft", model)
    inputs = os.path.join(model_dir, "refs/inputs.safetensors")
    hone_out = hone_logits(hone, model_dir, inputs, os.path.join(work, model, f"hone_{case}.safetensors"), adapter)
    effect = max_abs(hone_out, base_logits)
    report("adapter_changes_logits", model, case, effect > MIN_ADAPTER_EFFECT, max_abs_diff_vs_base=effect)
    try:
        with Captured() as cap:
            pm = PeftModel.from_pretrained(base_model(model_dir), adapter).eval()
    except Exception as e:  # noqa: BLE001 - the failure itself is the finding
        report("peft_loads_adapter", model, case, False, error=f"{type(e).__name__}: {e}",
               target_modules=json.load(open(os.path.join(adapter, "adapter_config.json")))["target_modules"])
        return None
    # Every tensor of the file is in the PEFT model, with the same values.
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    params = dict(pm.named_parameters())
    absent, worst = [], 0.0
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params:
            absent.append(key)
        else:
            worst = max(worst, max_abs(params[name].detach(), value))
    lora_params = [n for n in params if ".lora_" in n]
    bad_msgs = suspicious(cap.messages)
    report("peft_loads_adapter", model, case, not absent and not bad_msgs and worst == 0.0
           and len(lora_params) == len(saved), tensors=len(saved), peft_lora_params=len(lora_params),
           absent=absent, max_abs_diff_loaded=worst, warnings=bad_msgs)
    with torch.no_grad():
        peft_out = pm(ids).logits
    diff = max_abs(peft_out, hone_out)
    report("peft_logits_match_hone", model, case, diff <= F32_TOL, max_abs_diff=diff, tol=F32_TOL)
    return peft_out


def check_peft_all_linear_workaround(hone, work, model, adapter, ids, base_logits):
    """When PEFT cannot load `["all-linear"]`, measure the numbers with the names PEFT would write."""
    fixed = os.path.join(work, model, "lora_all_linear_expanded")
    shutil.rmtree(fixed, ignore_errors=True)
    shutil.copytree(adapter, fixed)
    path = os.path.join(fixed, "adapter_config.json")
    config = json.load(open(path))
    config["target_modules"] = sorted(PROJECTIONS)
    json.dump(config, open(path, "w"), indent=2)
    check_peft(hone, work, model, "lora_all_linear(target_modules expanded by this script)", fixed, ids, base_logits)


def layout(directory):
    """File set, tensors (name -> [dtype, shape], shard) and config keys of a model directory."""
    files = sorted(os.listdir(directory))
    tensors, shard_of = {}, {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = [sl.get_dtype(), list(sl.get_shape())]
                    shard_of[key] = name
    record = {"files": files, "tensors": dict(sorted(tensors.items())), "shard_of": dict(sorted(shard_of.items()))}
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if name in files:
            record[name] = json.load(open(os.path.join(directory, name)))
    return record


def check_merged(hone, work, model, case, merged, dtype, ids, expected_f32, merge_args):
    """transformers loads hone's merged directory unchanged; returns transformers' f32 logits."""
    model_dir = os.path.join(ROOT, "fixtures/peft", model)
    inputs = os.path.join(model_dir, "refs/inputs.safetensors")
    tag = f"{case}:merge_{dtype}{'_sharded' if '--max-shard-size' in merge_args else ''}"
    lay = layout(merged)
    index = lay.get("model.safetensors.index.json")
    if "--max-shard-size" in merge_args:
        shards = [f for f in lay["files"] if f.endswith(".safetensors")]
        index_ok = index is not None and len(shards) > 1 and index["weight_map"] == lay["shard_of"]
        report("merge_writes_shards_and_index", model, tag, index_ok, shards=len(shards))
    want_dtype = {"f32": "F32", "bf16": "BF16"}[dtype]
    dtypes = sorted({v[0] for v in lay["tensors"].values()})
    cfg_dtype = lay["config.json"].get("dtype", lay["config.json"].get("torch_dtype"))
    report("merge_writes_dtype", model, tag, dtypes == [want_dtype]
           and cfg_dtype == {"f32": "float32", "bf16": "bfloat16"}[dtype], tensor_dtypes=dtypes, config_dtype=cfg_dtype)

    with Captured() as cap:
        hf, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True, attn_implementation="eager")
        hf.eval()
    loaded_dtype = str(next(hf.parameters()).dtype).replace("torch.", "")
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    bad_msgs = suspicious(cap.messages)
    report("transformers_loads_merged", model, tag, not problems and not bad_msgs
           and loaded_dtype == {"f32": "float32", "bf16": "bfloat16"}[dtype],
           loading_info=problems, warnings=bad_msgs, loaded_dtype=loaded_dtype,
           tied=bool(hf.config.tie_word_embeddings), lm_head_is_embed=hf.lm_head.weight is hf.model.embed_tokens.weight)

    # Tokenizer and generation config load and agree with the base model's.
    try:
        tok, base_tok = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(model_dir)
        cases = json.load(open(os.path.join(model_dir, "refs/tokenization.json")))
        same = all(tok(c["text"], add_special_tokens=True)["input_ids"]
                   == base_tok(c["text"], add_special_tokens=True)["input_ids"]
                   and tok.decode(c["ids"], skip_special_tokens=True) == c["decoded"] for c in cases) and \
            (tok.eos_token, tok.pad_token, tok.bos_token) == (base_tok.eos_token, base_tok.pad_token, base_tok.bos_token)
        texts = cases
        report("tokenizer_loads", model, tag, same, tokenizer_class=type(tok).__name__, texts=len(texts))
    except Exception as e:  # noqa: BLE001
        report("tokenizer_loads", model, tag, False, error=f"{type(e).__name__}: {e}")
    try:
        gen, base_gen = GenerationConfig.from_pretrained(merged), GenerationConfig.from_pretrained(model_dir)
        a, b = gen.to_diff_dict(), base_gen.to_diff_dict()
        a.pop("transformers_version", None), b.pop("transformers_version", None)
        report("generation_config_loads", model, tag, a == b, merged=a, base=b)
    except Exception as e:  # noqa: BLE001
        report("generation_config_loads", model, tag, False, error=f"{type(e).__name__}: {e}")

    with torch.no_grad():
        native = hf(ids).logits.float()
    if dtype == "f32":
        diff = max_abs(native, expected_f32)
        report("merged_logits_match_hone_adapter", model, tag, diff <= F32_TOL, max_abs_diff=diff, tol=F32_TOL)
        hone_merged = hone_logits(hone, merged, inputs, os.path.join(work, model, f"hone_{case}_merged.safetensors"))
        diff = max_abs(native, hone_merged)
        report("merged_logits_match_hone_merged", model, tag, diff <= F32_TOL, max_abs_diff=diff, tol=F32_TOL)
        return native
    # bf16: upcast to f32 in both (same weights, f32 arithmetic), then native bf16 in both.
    hf32 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        upcast = hf32(ids).logits
    hone_up = hone_logits(hone, merged, inputs, os.path.join(work, model, f"hone_{case}_bf16_f32.safetensors"))
    diff = max_abs(upcast, hone_up)
    report("bf16_merged_f32_compute_match_hone", model, tag, diff <= F32_TOL, max_abs_diff=diff, tol=F32_TOL)
    hone_bf16 = hone_logits(hone, merged, inputs, os.path.join(work, model, f"hone_{case}_bf16.safetensors"), dtype="bf16")
    diff = max_abs(native, hone_bf16)
    report("bf16_merged_bf16_compute_match_hone", model, tag, diff <= BF16_NATIVE_TOL, max_abs_diff=diff,
           tol=BF16_NATIVE_TOL, rounding_vs_f32_adapter=max_abs(upcast, expected_f32))
    return upcast


def write_fixture(dest, model, case, adapter, peft_logits, merged_f32, merged_bf16, hf_f32, hf_bf16, merge_args):
    out = os.path.join(dest, model)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, os.path.join(out, "adapter"))
    save_file({"logits": peft_logits.contiguous()}, os.path.join(out, "logits_peft.safetensors"))
    save_file({"logits": hf_f32.contiguous()}, os.path.join(out, "logits_transformers_merged_f32.safetensors"))
    save_file({"logits": hf_bf16.contiguous()}, os.path.join(out, "logits_transformers_merged_bf16.safetensors"))
    record = {
        "adapter_case": case,
        "adapter_lora_table": ADAPTERS[case],
        "merge_f32": {"args": merge_args["f32"], **layout(merged_f32)},
        "merge_bf16": {"args": merge_args["bf16"], **layout(merged_bf16)},
    }
    with open(os.path.join(out, "merged_layout.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hone", default=os.path.join(ROOT, "target/release/hone"))
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    parser.add_argument("--write-fixtures", help="write the CI fixtures here (e.g. fixtures/hf_interop)")
    args = parser.parse_args()
    hone = os.path.abspath(args.hone)
    torch.manual_seed(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
                "hone": sh([hone, "--version"]).strip(), "hone_commit": git_head()}
    print(json.dumps({"versions": versions}), flush=True)

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="hf-interop-")
    os.makedirs(work, exist_ok=True)
    data_file(os.path.join(work, "data.jsonl"))
    try:
        for model in MODELS:
            run_model(hone, work, model, args.write_fixtures)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.write_fixtures:
        with open(os.path.join(args.write_fixtures, "versions.json"), "w") as f:
            json.dump(versions, f, indent=1, sort_keys=True)
            f.write("\n")
    failed = [r for r in RESULTS if not r["ok"]]
    print(json.dumps({"summary": {"passed": len(RESULTS) - len(failed), "failed": len(failed),
                                  "failed_checks": [f"{r['model']}/{r['case']}/{r['check']}" for r in failed]}}))
    return 1 if failed else 0


def run_model(hone, work, model, fixtures_dest):
    os.makedirs(os.path.join(work, model), exist_ok=True)
    model_dir = os.path.join(ROOT, "fixtures/peft", model)
    inputs = os.path.join(model_dir, "refs/inputs.safetensors")
    ids = load_file(inputs)["input_ids"]
    base_logits = hone_logits(hone, model_dir, inputs, os.path.join(work, model, "hone_base.safetensors"))
    with torch.no_grad():
        diff = max_abs(base_model(model_dir)(ids).logits, base_logits)
    report("base_logits_match", model, "base", diff <= F32_TOL, max_abs_diff=diff, tol=F32_TOL)

    adapters, peft_logits = {}, {}
    for case in ADAPTERS:
        adapters[case] = train(hone, work, model, case)
        peft_logits[case] = check_peft(hone, work, model, case, adapters[case], ids, base_logits)
        if case == "lora_all_linear" and peft_logits[case] is None:
            check_peft_all_linear_workaround(hone, work, model, adapters[case], ids, base_logits)
    for case, (parts, extra) in COMBINED.items():
        out = os.path.join(work, model, case)
        combine = [hone, "adapter", "combine", "--out", out, "--force", *extra]
        for part in parts:
            combine += ["--adapter", adapters[part]]
        sh(combine, cwd=ROOT)
        adapters[case] = out
        peft_logits[case] = check_peft(hone, work, model, case, out, ids, base_logits)

    results = {}
    for case in ["lora", "rslora"]:
        expected = hone_logits(hone, model_dir, inputs, os.path.join(work, model, f"hone_{case}.safetensors"), adapters[case])
        merge_args = {"f32": ["--dtype", "f32", "--max-shard-size", "100KB"], "bf16": ["--dtype", "bf16"]}
        outs = {}
        for dtype, extra in merge_args.items():
            merged = os.path.join(work, model, f"merged_{case}_{dtype}")
            sh([hone, "merge", "--model", model_dir, "--adapter", adapters[case], "--out", merged, "--force", *extra],
               cwd=ROOT)
            outs[dtype] = (merged, check_merged(hone, work, model, case, merged, dtype, ids, expected, extra))
        results[case] = (outs, merge_args)

    case = FIXTURE_ADAPTER[model]
    if fixtures_dest and peft_logits.get(case) is not None:
        outs, merge_args = results[case]
        write_fixture(fixtures_dest, model, case, adapters[case], peft_logits[case], outs["f32"][0],
                      outs["bf16"][0], outs["f32"][1], outs["bf16"][1], merge_args)


if __name__ == "__main__":
    sys.exit(main())
