#!/usr/bin/env bash
# Serving throughput of hone and llama.cpp side by side on one GGUF file: `llama-server -np S
# -cb` and `hone serve --max-batch S`, each started in turn and loaded by the same client
# (`hone bench serve --url`: streamed completions of the same seeded random prompts, greedy,
# ignore_eos, so every request produces exactly MAX_TOKENS tokens) at each concurrency. Every
# measurement draws prompts of its own (--seed from the round and the concurrency): llama-server
# keeps each slot's last prompt and would skip the prefill of a prompt it saw at an earlier
# concurrency, which hone does not (no prefix cache), and the two would not do the same work.
# One JSON line per (server, concurrency) with `"server": "hone"|"hone q8"|"llama.cpp"`: throughput,
# p50/p99 latency, time to first token and inter-token latency.
#
#   scripts/bench_serve_llamacpp.sh -l LLAMA_CPP_DIR [-m MODEL.gguf] [-c 1,8,32] [-n REQUESTS]
#                                   [-g MAX_TOKENS] [-p PROMPT_TOKENS] [-r ROUNDS] [-b HONE_BIN] [-q] [-H]
#
# -q serves hone with --q8-activations (decoding steps multiply the quantized weights by
# activations rounded to 8 bits, as llama.cpp does; its lines then say "server": "hone q8").
# -H also runs llama-server on transparent huge pages, as hone runs (README, "Huge pages"): the
# weights read into memory (-lm none) and GLIBC_TUNABLES=glibc.malloc.hugetlb=1; its lines say
# "server": "llama.cpp huge pages".
# -a passes more arguments to `hone serve` (e.g. -a "--prefill-chunk 64"); -o runs hone only.
#
# REQUESTS per concurrency (default: 4 × concurrency, at least 8). llama.cpp is built outside the
# repository from the PyPI sdist of llama-cpp-python (see scripts/bench_generate_llamacpp.sh;
# target llama-server; LLAMA_CPP_BUILD names another build folder, e.g. build-avx2). The model
# defaults to SmolLM2-135M-Instruct Q4_1
# (scripts/fetch-models.sh smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."

llama=${LLAMA_CPP_DIR:-}
model=checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
concurrency=1,8,32
requests=
gen=64
prompt=128
rounds=1
hone=target/release/hone
threads=$(nproc)
q8=()
server=hone
extra=()
peer=1
huge=0
while getopts "l:m:c:n:g:p:r:b:qa:oH" opt; do
    case $opt in
        l) llama=$OPTARG ;;
        m) model=$OPTARG ;;
        c) concurrency=$OPTARG ;;
        n) requests=$OPTARG ;;
        g) gen=$OPTARG ;;
        p) prompt=$OPTARG ;;
        r) rounds=$OPTARG ;;
        b) hone=$OPTARG ;;
        q) q8=(--q8-activations); server="hone q8" ;;
        a) read -ra extra <<<"$OPTARG" ;;
        o) peer=0 ;;
        H) huge=1 ;;
        *) echo "usage: $0 -l LLAMA_CPP_DIR [-m MODEL] [-c 1,8,32] [-n REQUESTS] [-g MAX_TOKENS] [-p PROMPT_TOKENS] [-r ROUNDS] [-b HONE_BIN] [-q] [-a HONE_SERVE_ARGS] [-o] [-H]" >&2; exit 2 ;;
    esac
done
[[ -x $hone ]] || { echo "$hone: not an executable (cargo build --release -p hone-cli)" >&2; exit 2; }
[[ -n $llama ]] || { echo "llama.cpp: pass -l DIR or set LLAMA_CPP_DIR" >&2; exit 2; }
server_bin=$llama/${LLAMA_CPP_BUILD:-build}/bin/llama-server
[[ -x $server_bin ]] || { echo "$server_bin: not built (cmake --build build --target llama-server)" >&2; exit 2; }
[[ -f $model ]] || { echo "$model: missing (scripts/fetch-models.sh smollm2)" >&2; exit 2; }

slots=$(tr ',' '\n' <<<"$concurrency" | sort -n | tail -1)
port=18088
log=$(mktemp -d)
pid=
stop() { [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap 'stop; rm -rf "$log"' EXIT

wait_ready() {
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { echo "$1 exited; its log:" >&2; cat "$log/$1.log" >&2; exit 1; }
        sleep 0.2
    done
    echo "$1 did not become ready" >&2; exit 1
}

load() { # name round
    # The model name the server lists first (hone: the file's stem; llama-server: its path).
    local name
    name=$(curl -sf "http://127.0.0.1:$port/v1/models" | grep -o '"id": *"[^"]*"' | head -1 | sed 's/.*"\([^"]*\)"$/\1/')
    for c in ${concurrency//,/ }; do
        local n=${requests:-$(( c * 4 > 8 ? c * 4 : 8 ))}
        "$hone" bench serve --url "http://127.0.0.1:$port" --model-name "$name" \
            --concurrency "$c" --requests "$n" --max-tokens "$gen" --prompt-tokens "$prompt" \
            --prompt-vocab 49152 --seed $(( $2 * 1000 + c )) --time-limit-s 600 --request-timeout-s 600 2>/dev/null \
            | sed "s/^{/{\"server\":\"$1\",\"file\":\"$(basename "$model")\",/"
    done
}

llama() { # name round [llama-server flags...]
    local name=$1 round=$2
    shift 2
    # Context: every slot holds its prompt and its tokens.
    "$server_bin" -m "$model" -np "$slots" -cb -t "$threads" -c $(( slots * (prompt + gen + 16) )) \
        --port "$port" "$@" >"$log/$name.log" 2>&1 &
    pid=$!
    wait_ready "$name"
    load "$name" "$round"
    stop
}

for round in $(seq 1 "$rounds"); do
    if (( peer )); then
        llama llama.cpp "$round"
        if (( huge )); then
            GLIBC_TUNABLES=glibc.malloc.hugetlb=1 llama "llama.cpp huge pages" "$round" -lm none
        fi
    fi
    "$hone" serve --model "$model" --port "$port" --max-batch "$slots" "${q8[@]}" "${extra[@]}" \
        >"$log/hone.log" 2>&1 &
    pid=$!
    wait_ready hone
    load "$server" "$round"
    stop
done
