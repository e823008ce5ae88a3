#!/usr/bin/env python3
"""hone's GGUF exports run by llama.cpp itself (scripts/llamacpp-check.sh builds llama.cpp and calls
this with LLAMA_BIN=its bin directory and HONE=the hone binary).

For each model (stories260k, the PEFT fixtures llama_gqa and qwen2_tied, llama_gqa with its
adapter merged in, and SmolLM2-135M-Instruct when scripts/fetch-models.sh has fetched it) and type
(f32, f16): `hone export gguf`, then `llama-debug --save-logits` on a prompt (f32 KV cache, flash
attention off, so llama.cpp's own rounding stays out of the comparison), and `hone logits` on
llama.cpp's token ids from the same file. Prints one JSON line per check and fails above the
tolerance (1e-3 for f32; 5e-2 for f16, where llama.cpp rounds activations to f16 in its products:
measured 1.3e-4 to 2.1e-2 on logits up to ~20).
Then the adapters alone (`--lora-only`, f32 and q8_0) applied by llama.cpp (`--lora`) to the f32
base export, against hone's merged export (1e-3 for f32). Then the quantized types (q8_0, q4_0, q4_k_m, q5_k_m, q6_k) against llama-quantize from the same f16
export: tensor bytes, and llama-perplexity on held-out GSM8K test text within 1% (SmolLM2); the
tiny K-quant fixture's llama-quantize outputs are written to fixtures/gguf/export/ for cargo test.
Then a chat model's export (SmolLM2, f32) in llama-cli's conversation mode: it stops at the
end of the turn and answers what `hone generate` answers with the file's chat template.
Writes fixtures/gguf/export/llamacpp_refs.json (the committed models only: llama.cpp's ids and
last-position logits), which crates/hone-merge/tests/gguf_export.rs replays without llama.cpp.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LLAMA_BIN = os.environ["LLAMA_BIN"]
HONE = os.environ.get("HONE", os.path.join(ROOT, "target", "release", "hone"))
TOLERANCE = {"f32": 1e-3, "f16": 5e-2}

MODELS = [
    # (name, base, adapters, prompt, committed)
    ("stories260k", "checkpoints/base/stories260k", [], "Once upon a time, there was a little girl", True),
    ("llama_gqa", "fixtures/peft/llama_gqa", [], "Hello world, the cat sat on the mat.", True),
    ("llama_gqa_adapter", "fixtures/peft/llama_gqa", ["fixtures/peft/llama_gqa/adapter"],
     "Hello world, the cat sat on the mat.", True),
    ("qwen2_tied", "fixtures/peft/qwen2_tied", [], "Hello world, the cat sat on the mat.", True),
    ("qwen2_tied_adapter", "fixtures/peft/qwen2_tied", ["fixtures/peft/qwen2_tied/adapter"],
     "Hello world, the cat sat on the mat.", True),
]
# llama_gqa with Llama 3 RoPE scaling in its config.json (written into the temporary directory; the
# same copy as crates/hone-merge/tests/gguf_export.rs's llama3_scaled_fixture): exported with
# llama.cpp's rope_freqs.weight; llama.cpp's logits are compared with hone's on the directory.
LLAMA3 = "llama_gqa_llama3"
MODELS.append((LLAMA3, LLAMA3, [], "Hello world, the cat sat on the mat.", True))
smol = os.path.join(ROOT, "checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
if os.path.exists(smol):
    MODELS.append(("smollm2", smol, [], "The capital of France is", False))


def llama3_scaled(tmp):
    import shutil
    src = os.path.join(ROOT, "fixtures/peft/llama_gqa")
    dst = os.path.join(tmp, LLAMA3)
    os.makedirs(dst, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, name), dst)
    config = json.load(open(os.path.join(src, "config.json")))
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


QUANT_TYPES = ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def same_tensors(ours, theirs):
    """(tensors, tensors of equal type and bytes, type differences) of two GGUF files."""
    import gguf
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    tb = {t.name: t for t in b.tensors}
    equal, types = 0, []
    for t in a.tensors:
        u = tb[t.name]
        if t.tensor_type != u.tensor_type:
            types.append((t.name, t.tensor_type.name, u.tensor_type.name))
        elif np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            equal += 1
    return len(a.tensors), equal, types


def perplexity(model, text):
    out = run([os.path.join(LLAMA_BIN, "llama-perplexity"), "-m", model, "-f", text, "-c", "256",
               "--chunks", "24", "-t", "2", "-b", "256"])
    for line in (out.stdout + out.stderr).splitlines():
        if "Final estimate: PPL =" in line:
            return float(line.split("=")[1].split()[0])
    raise RuntimeError(f"no perplexity for {model}")


def quantizers(tmp):
    """hone's quantized exports against llama-quantize's from the same f16 export: tensor bytes
    (tiny K-quant fixture, whose llama-quantize outputs are committed for cargo test, and
    SmolLM2), and llama-perplexity on held-out GSM8K test text (SmolLM2)."""
    failed = False
    models = [("tiny", "fixtures/gguf/kquant/tiny_q8_0.gguf")]
    if os.path.exists(smol):
        models.append(("smollm2", smol))
    text = os.path.join(tmp, "heldout.txt")
    with open(os.path.join(ROOT, "datasets/eval/gsm8k_test.jsonl")) as f, open(text, "w") as out:
        for line in list(f)[:200]:
            r = json.loads(line)
            out.write(r["question"] + "\n" + r["answer"] + "\n\n")
    for name, base in models:
        f16 = os.path.join(tmp, f"{name}-f16.gguf")
        run([HONE, "export", "gguf", "--model", base, "--type", "f16", "--out", f16, "--force"])
        ppl_f16 = perplexity(f16, text) if name == "smollm2" else None
        for ty in QUANT_TYPES:
            ours = os.path.join(tmp, f"{name}-{ty}-hone.gguf")
            theirs = os.path.join(tmp, f"{name}-{ty}-llama.gguf")
            if name == "tiny":
                theirs = os.path.join(ROOT, f"fixtures/gguf/export/tiny-{ty}.llama-quantize.gguf")
            summary = json.loads(run([HONE, "export", "gguf", "--model", f16, "--type", ty, "--out", ours,
                                      "--force"]).stdout.strip().splitlines()[-1])
            run([os.path.join(LLAMA_BIN, "llama-quantize"), f16, theirs, ty.upper(), "2"])
            n, equal, types = same_tensors(ours, theirs)
            line = {"check": "quantize", "model": name, "type": ty, "tensors": n, "identical": equal,
                    "type_differences": types[:5], "bytes": summary["bytes"],
                    "hone_seconds": summary["seconds"]}
            if name == "smollm2":
                p_ours, p_theirs = perplexity(ours, text), perplexity(theirs, text)
                line.update({"ppl_f16": ppl_f16, "ppl_hone": p_ours, "ppl_llama_quantize": p_theirs,
                             "ppl_ratio": p_ours / p_theirs})
                ok = abs(p_ours / p_theirs - 1) <= 0.01
            else:
                ok = equal == n
            line["ok"] = ok
            failed |= not ok
            print(json.dumps(line), flush=True)
    return failed


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]


def chat(tmp):
    """A chat model's export in llama-cli's conversation mode (greedy, one turn): it must stop at
    the end of the turn (before the token limit) and answer what `hone generate` answers on the
    same file with the file's chat template (rendered by `hone template render`)."""
    if not os.path.exists(smol):
        print(json.dumps({"check": "chat", "skipped": "SmolLM2 not fetched (scripts/fetch-models.sh smollm2)"}))
        return False
    failed = False
    limit = 160
    # f32 only: on a quantized file llama.cpp also quantizes the activations (Q8_0 blocks of 32
    # for its integer dot products), so greedy answers part ways from hone's, which multiplies
    # f32 activations with the decoded weights (measured: logits 0.63 apart on a q8_0 export).
    for ty in ("f32",):
        model = os.path.join(tmp, f"smollm2-chat-{ty}.gguf")
        run([HONE, "export", "gguf", "--model", smol, "--type", ty, "--out", model, "--force"])
        for prompt in CHAT_PROMPTS:
            cli = run([os.path.join(LLAMA_BIN, "llama-cli"), "-m", model, "-p", prompt, "-st", "--temp", "0",
                       "-n", str(limit), "-t", "2", "-c", "1024", "--no-show-timings", "--no-display-prompt",
                       "-ctk", "f32", "-ctv", "f32", "-fa", "off"])
            out = cli.stdout
            answer_cli = out[out.index("> " + prompt) + len(prompt) + 2:].strip()
            if answer_cli.endswith("Exiting..."):
                answer_cli = answer_cli[: -len("Exiting...")].strip()
            msgs = os.path.join(tmp, "messages.json")
            with open(msgs, "w") as f:
                json.dump([{"role": "user", "content": prompt}], f)
            rendered = run([HONE, "template", "render", "--model", model, "--messages", msgs,
                            "--add-generation-prompt"]).stdout
            gen = run([HONE, "generate", "--model", model, "--prompt", rendered, "--max-tokens", str(limit)])
            answer_hone = gen.stdout[len(rendered):].strip() if gen.stdout.startswith(rendered) else gen.stdout.strip()
            stopped = "finish: Stop" in gen.stderr
            ok = stopped and answer_cli == answer_hone
            failed |= not ok
            print(json.dumps({"check": "chat", "type": ty, "prompt": prompt, "ok": ok,
                              "hone_stopped_at_end_of_turn": stopped, "same_answer": answer_cli == answer_hone,
                              "llama_cli": answer_cli[:200], "hone": answer_hone[:200]}), flush=True)
    return failed


def main():
    refs = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, base, adapters, prompt, committed in MODELS:
            hone_model = None
            if name == LLAMA3:
                base = hone_model = llama3_scaled(tmp)
            for ty in ("f32", "f16"):
                out = os.path.join(tmp, f"{name}-{ty}.gguf")
                cmd = [HONE, "export", "gguf", "--model", base, "--type", ty, "--out", out]
                for a in adapters:
                    cmd += ["--adapter", a]
                summary = json.loads(run(cmd).stdout.strip().splitlines()[-1])
                logdir = os.path.join(tmp, "ll")
                run([os.path.join(LLAMA_BIN, "llama-debug"), "-m", out, "-p", prompt, "--save-logits",
                     "--logits-output-dir", logdir, "-t", "2", "-c", "256", "-ctk", "f32", "-ctv", "f32",
                     "-fa", "off"])
                stem = f"{name}-{ty}"
                ids = np.fromfile(os.path.join(logdir, f"llamacpp-{stem}-tokens.bin"), dtype=np.int32)
                ll = np.fromfile(os.path.join(logdir, f"llamacpp-{stem}.bin"), dtype=np.float32)
                save_file({"input_ids": ids[None, :].astype(np.int64)}, os.path.join(tmp, "ids.safetensors"))
                run([HONE, "logits", "--model", hone_model or out, "--input-ids",
                     os.path.join(tmp, "ids.safetensors"), "--out", os.path.join(tmp, "hone.safetensors")])
                hl = load_file(os.path.join(tmp, "hone.safetensors"))["logits"][0, -1]
                diff = float(np.abs(hl - ll).max())
                ok = diff <= TOLERANCE[ty] and len(hl) == len(ll)
                failed |= not ok
                print(json.dumps({"check": "logits", "model": name, "type": ty, "ok": ok,
                                  "max_abs_diff": diff, "tolerance": TOLERANCE[ty], "tokens": len(ids),
                                  "argmax": [int(hl.argmax()), int(ll.argmax())],
                                  "bytes": summary["bytes"]}), flush=True)
                if committed:
                    refs.append({"model": name, "base": LLAMA3 if name == LLAMA3 else base,
                                 "adapters": adapters, "type": ty,
                                 "prompt": prompt, "llamacpp_ids": ids.tolist(),
                                 "llamacpp_last_logits": [float(v) for v in ll]})
        # The adapters alone (`--lora-only`) on the f32 base in llama.cpp (`--lora`) against hone's
        # merged f32 export.
        for name, base, adapters, prompt, committed in MODELS:
            if not adapters:
                continue
            for lora_ty in ("f32", "q8_0"):
                base_file = os.path.join(tmp, f"{name}-base.gguf")
                merged = os.path.join(tmp, f"{name}-merged.gguf")
                lora = os.path.join(tmp, f"{name}-lora-{lora_ty}.gguf")
                run([HONE, "export", "gguf", "--model", base, "--type", "f32", "--out", base_file, "--force"])
                cmd = [HONE, "export", "gguf", "--model", base, "--type", "f32", "--out", merged, "--force"]
                lcmd = [HONE, "export", "gguf", "--model", base, "--lora-only", "--type", lora_ty, "--out", lora]
                for a in adapters:
                    cmd += ["--adapter", a]
                    lcmd += ["--adapter", a]
                run(cmd)
                run(lcmd)
                logdir = os.path.join(tmp, "ll")
                run([os.path.join(LLAMA_BIN, "llama-debug"), "-m", base_file, "--lora", lora, "-p", prompt,
                     "--save-logits", "--logits-output-dir", logdir, "-t", "2", "-c", "256", "-ctk", "f32",
                     "-ctv", "f32", "-fa", "off"])
                stem = f"{name}-base"
                ids = np.fromfile(os.path.join(logdir, f"llamacpp-{stem}-tokens.bin"), dtype=np.int32)
                ll = np.fromfile(os.path.join(logdir, f"llamacpp-{stem}.bin"), dtype=np.float32)
                save_file({"input_ids": ids[None, :].astype(np.int64)}, os.path.join(tmp, "ids.safetensors"))
                run([HONE, "logits", "--model", merged, "--input-ids", os.path.join(tmp, "ids.safetensors"),
                     "--out", os.path.join(tmp, "hone.safetensors")])
                hl = load_file(os.path.join(tmp, "hone.safetensors"))["logits"][0, -1]
                diff = float(np.abs(hl - ll).max())
                tol = 1e-3 if lora_ty == "f32" else 2e-2
                ok = diff <= tol
                failed |= not ok
                print(json.dumps({"check": "lora", "model": name, "lora_type": lora_ty, "ok": ok,
                                  "max_abs_diff": diff, "tolerance": tol, "tokens": len(ids)}), flush=True)
                if committed and lora_ty == "f32":
                    refs.append({"model": name + "_lora", "base": base, "adapters": adapters, "type": "f32",
                                 "lora": True, "prompt": prompt, "llamacpp_ids": ids.tolist(),
                                 "llamacpp_last_logits": [float(v) for v in ll]})
        failed |= quantizers(tmp)
        failed |= chat(tmp)
    version = run([os.path.join(LLAMA_BIN, "llama-cli"), "--version"]).stderr.strip().splitlines()
    doc = {"llama_cpp": [v for v in version if v.startswith("version")][:1], "refs": refs}
    with open(os.path.join(ROOT, "fixtures/gguf/export/llamacpp_refs.json"), "w") as f:
        json.dump(doc, f)
    if failed:
        sys.exit(1)


main()
