#!/usr/bin/env bash
# Load test of a separately running `hone serve` (loopback only, bounded): starts the server on
# 127.0.0.1 with an OS-chosen port over the PEFT fixture model, serving its real adapter under
# three names, runs `hone bench serve --url` against it (N concurrent streams round-robin over
# the base and the adapters), prints its JSON lines, and stops the server.
#
# Usage: scripts/serve_load.sh [HONE_BINARY] [CONCURRENCY_LIST] [MAX_TOKENS]
#   e.g. scripts/serve_load.sh target/release/hone 1,8,32 32
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
hone="${1:-$root/target/release/hone}"
concurrency="${2:-1,8,32}"
max_tokens="${3:-32}"
fixture="$root/fixtures/peft/llama_gqa"
out="$(mktemp)"
"$hone" serve --model "$fixture" --port 0 --max-batch 32 \
  --adapter "a=$fixture/adapter" --adapter "b=$fixture/adapter" --adapter "c=$fixture/adapter" \
  >"$out" 2>/dev/null &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 1 300); do
  grep -q "http://" "$out" && break
  kill -0 "$server" 2>/dev/null || { echo "hone serve exited" >&2; exit 1; }
  sleep 0.1
done
url="$(grep -o 'http://[^ ]*' "$out" | head -1)"
echo "server: $url" >&2
"$hone" bench serve --url "$url" --model-name llama_gqa --model-name a --model-name b \
  --model-name c --concurrency "$concurrency" --max-tokens "$max_tokens" --prompt-tokens 16 \
  --prompt-vocab 500 --time-limit-s 120 --request-timeout-s 120
