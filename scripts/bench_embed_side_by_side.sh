#!/usr/bin/env bash
# Embedding throughput of hone and sentence-transformers side by side on this machine: the same
# chunks of the shipped data, the same model (all-MiniLM-L6-v2 from scripts/fetch-models.sh),
# the same batch size, run alternately (hone, sentence-transformers, hone, ...); prints every
# JSON line, then a summary line with both series and the ratio of the medians.
#
#   scripts/bench_embed_side_by_side.sh [-n ROUNDS] [-c CHUNKS] [-b HONE_BIN] [-p PYTHON]
#
# PYTHON needs sentence-transformers (python3 -m venv VENV && VENV/bin/pip install
# sentence-transformers).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
chunks=2048
hone=target/release/hone
python=${PYTHON:-python3}
while getopts "n:c:b:p:" opt; do
    case $opt in
        n) rounds=$OPTARG ;;
        c) chunks=$OPTARG ;;
        b) hone=$OPTARG ;;
        p) python=$OPTARG ;;
        *) echo "usage: $0 [-n ROUNDS] [-c CHUNKS] [-b HONE_BIN] [-p PYTHON]" >&2; exit 2 ;;
    esac
done
model=checkpoints/base/all-minilm-l6-v2
[[ -x $hone ]] || { echo "$hone: not an executable (cargo build --release -p hone-cli)" >&2; exit 2; }
[[ -f $model/model.safetensors ]] || { echo "$model: missing (scripts/fetch-models.sh minilm)" >&2; exit 2; }
"$python" -c 'import sentence_transformers' 2>/dev/null || {
    echo "$python: needs sentence-transformers (pip install sentence-transformers)" >&2
    exit 2
}

texts=$(mktemp)
lines=$(mktemp)
trap 'rm -f "$texts" "$lines"' EXIT
for ((i = 1; i <= rounds; i++)); do
    "$hone" bench rag --embedder "$model" --embed-only --embed-chunks "$chunks" \
        --batch-size 32 --dump-chunks "$texts" 2>/dev/null | tee -a "$lines"
    "$python" scripts/bench_embed_st.py "$texts" --model "$model" --batch-size 32 2>/dev/null \
        | tee -a "$lines"
done

"$python" - "$lines" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
hone = [r for r in rows if "impl" not in r]
peer = [r for r in rows if "impl" in r]
h = statistics.median(r["chunks_per_sec"] for r in hone)
p = statistics.median(r["chunks_per_sec"] for r in peer)
print(json.dumps({
    "bench": "embed_side_by_side", "rounds": len(hone), "chunks": hone[0]["chunks"],
    "mean_tokens_per_chunk": round(hone[0]["mean_tokens_per_chunk"], 1),
    "cpu": hone[0]["cpu"], "isa_hone": hone[0]["isa"], "peer": peer[0]["impl"],
    "hone_chunks_per_sec": [round(r["chunks_per_sec"], 1) for r in hone],
    "peer_chunks_per_sec": [round(r["chunks_per_sec"], 1) for r in peer],
    "median_ratio": round(h / p, 3),
    "hone_peak_rss_mb": round(max(r["peak_rss_mb"] for r in hone)),
    "peer_peak_rss_mb": round(max(r["peak_rss_mb"] for r in peer)),
}))
PY
