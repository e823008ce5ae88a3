#!/usr/bin/env bash
# Prefill and decode of hone and llama.cpp side by side on one GGUF file: llama.cpp's
# `llama-bench -p P -n N -t T` and `hone bench generate --model FILE --prompt-tokens P
# --new-tokens N`, alternately, every line printed as it comes (llama-bench's as JSON too).
#
#   scripts/bench_generate_llamacpp.sh [-n ROUNDS] [-b HONE_BIN] [-l LLAMA_CPP_DIR] [-t TYPE] [-p P] [-g N] [-q] [-H]
#
# -q runs hone a second time per round with --q8-activations (decoding multiplies the quantized
# weights by activations rounded to 8 bits, as llama.cpp always does), so each round prints hone
# exact, hone q8 and llama.cpp; with -t bf16 that second run takes --bf16-activations instead
# (prefill multiplies BF16 weights by activations rounded to bfloat16, as llama.cpp does, on
# CPUs with AVX-512 BF16).
#
# -H runs llama-bench a second time per round on transparent huge pages, as hone runs (hone asks
# glibc for them at start-up: README, "Huge pages"): weights read into memory (`-lm none`, not
# mapped from the file's 4 KiB page cache) and GLIBC_TUNABLES=glibc.malloc.hugetlb=1; its lines
# say "huge_pages": true. llama.cpp's own default (the first line) maps the file.
#
# The model is SmolLM2-135M-Instruct (scripts/fetch-models.sh smollm2), rewritten as TYPE (f32,
# f16, bf16, q8_0, q4_0 or q4_1 = the file as shipped) by llama.cpp's own `llama-quantize
# --allow-requantize`, so both programs read the same weights. llama.cpp is built outside the
# repository from the PyPI sdist of llama-cpp-python, which vendors it (never vendored here):
#
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36   # or curl the sdist
#   tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build --target llama-bench llama-quantize -j2
#
# and passed as -l .../vendor/llama.cpp (or LLAMA_CPP_DIR). LLAMA_CPP_BUILD names another build
# folder under it for llama-bench, e.g. an AVX2-only build to compare with hone's AVX2 path on an
# AVX-512 machine:
#
#   cmake -B build-avx2 -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
#         -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF
#   cmake --build build-avx2 --target llama-bench llama-server -j2
#   LLAMA_CPP_BUILD=build-avx2 scripts/bench_generate_llamacpp.sh -b target-avx2/release/hone ...
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=2
hone=target/release/hone
llama=${LLAMA_CPP_DIR:-}
type=f32
prompt=128
gen=128
threads=$(nproc)
q8=0
huge=0
while getopts "n:b:l:t:p:g:qH" opt; do
    case $opt in
        n) rounds=$OPTARG ;;
        b) hone=$OPTARG ;;
        l) llama=$OPTARG ;;
        t) type=$OPTARG ;;
        p) prompt=$OPTARG ;;
        g) gen=$OPTARG ;;
        q) q8=1 ;;
        H) huge=1 ;;
        *) echo "usage: $0 [-n ROUNDS] [-b HONE_BIN] [-l LLAMA_CPP_DIR] [-t TYPE] [-p P] [-g N] [-q] [-H]" >&2; exit 2 ;;
    esac
done

[[ -x $hone ]] || { echo "$hone: not an executable (cargo build --release -p hone-cli)" >&2; exit 2; }
[[ -n $llama ]] || { echo "llama.cpp: pass -l DIR or set LLAMA_CPP_DIR (see the comment at the top)" >&2; exit 2; }
bench=$llama/${LLAMA_CPP_BUILD:-build}/bin/llama-bench
# Conversions are written by the default build's llama-quantize (the file is the same whichever
# ISA a build was compiled for).
quantize=$llama/build/bin/llama-quantize
for tool in "$bench" "$quantize"; do
    [[ -x $tool ]] || { echo "$tool: not built (cmake --build build --target llama-bench llama-quantize)" >&2; exit 2; }
done
src=checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -f $src ]] || { echo "$src: missing (scripts/fetch-models.sh smollm2)" >&2; exit 2; }

case $type in
    q4_1) model=$src ;;
    f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k)
        model=checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.${type^^}.gguf
        if [[ ! -f $model ]]; then
            "$quantize" --allow-requantize "$src" "$model.tmp" "${type^^}" >/dev/null 2>&1 \
                || { echo "llama-quantize to $type failed" >&2; rm -f "$model.tmp"; exit 1; }
            mv "$model.tmp" "$model"
        fi ;;
    *) echo "unknown type $type (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k)" >&2; exit 2 ;;
esac

# llama-bench's prefill and decode lines as JSON; $1: whether on huge pages, then extra flags.
llama_bench() {
    local huge_pages=$1
    shift
    "$bench" -m "$model" -p "$prompt" -n "$gen" -t "$threads" "$@" -o jsonl 2>/dev/null \
        | HUGE_PAGES=$huge_pages python3 -c '
import json, os, sys
for line in sys.stdin:
    r = json.loads(line)
    kind = "prefill" if r["n_prompt"] else "decode"
    print(json.dumps({"bench": "generate", "impl": "llama.cpp " + str(r.get("build_commit")), "phase": kind,
                      "tokens": r["n_prompt"] or r["n_gen"], "tokens_per_sec": r["avg_ts"],
                      "threads": r["n_threads"], "model": r["model_type"],
                      "cpu": r.get("cpu_info"), "huge_pages": os.environ["HUGE_PAGES"] == "1"}))
'
}

for ((i = 1; i <= rounds; i++)); do
    "$hone" bench generate --model "$model" --prompt-tokens "$prompt" --new-tokens "$gen" 2>/dev/null | tail -n 1
    if ((q8)); then
        rounded=--q8-activations
        [[ $type == bf16 ]] && rounded=--bf16-activations
        "$hone" bench generate --model "$model" --prompt-tokens "$prompt" --new-tokens "$gen" \
            "$rounded" 2>/dev/null | tail -n 1
    fi
    llama_bench 0
    if ((huge)); then
        GLIBC_TUNABLES=glibc.malloc.hugetlb=1 llama_bench 1 -lm none
    fi
done
