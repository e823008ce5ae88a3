#!/usr/bin/env bash
# Training speed of hone and PyTorch + PEFT side by side on this machine: runs
# `hone bench train` and `scripts/bench_train_pytorch.py` alternately (hone, PyTorch, hone, ...)
# with the same settings, prints every JSON line as it comes, then one summary line per shape
# with the median tokens/s of each, their ratio and the peak memory of each (machines are shared
# and noisy: alternating runs see the same conditions, medians drop the outliers).
#
#   scripts/bench_train_side_by_side.sh [-n ROUNDS] [-b HONE_BIN] [-p PYTHON] [SHAPE...]
#
# SHAPE: small (default) and/or smol. HONE_BIN defaults to target/release/hone. To measure the
# AVX2 path on an AVX-512 machine, build it without the AVX-512 kernels and pass that binary:
#   CARGO_TARGET_DIR=target-avx2 cargo build --release -p hone-cli --no-default-features
#   scripts/bench_train_side_by_side.sh -b target-avx2/release/hone small smol
# (its lines say "isa":"avx2"; PyTorch's line names what the CPU offers, whatever MKL takes). To
# hold PyTorch to AVX2 as well, as on an AVX2-only machine, run the script with
#   ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
# in its environment (hone ignores them).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
hone=target/release/hone
python=${PYTHON:-python3}
while getopts "n:b:p:" opt; do
    case $opt in
        n) rounds=$OPTARG ;;
        b) hone=$OPTARG ;;
        p) python=$OPTARG ;;
        *) echo "usage: $0 [-n ROUNDS] [-b HONE_BIN] [-p PYTHON] [SHAPE...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
shapes=("${@:-small}")

[[ -x $hone ]] || { echo "$hone: not an executable (cargo build --release -p hone-cli)" >&2; exit 2; }
"$python" -c 'import torch, peft, transformers' 2>/dev/null || {
    echo "$python: needs torch, transformers and peft (pip install torch transformers peft)" >&2
    exit 2
}

common=(--seq 256 --batch 4 --lora-r 16 --targets q_proj,v_proj)
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
for shape in "${shapes[@]}"; do
    case $shape in
        small) steps=5 ;;
        smol) steps=3 ;;
        *) echo "unknown shape $shape (small, smol)" >&2; exit 2 ;;
    esac
    for ((i = 1; i <= rounds; i++)); do
        "$hone" bench train --shape "$shape" "${common[@]}" --steps "$steps" 2>/dev/null | tail -n 1 | tee -a "$lines"
        "$python" scripts/bench_train_pytorch.py --shape "$shape" "${common[@]}" --steps "$steps" 2>/dev/null \
            | tail -n 1 | tee -a "$lines"
    done
done

"$python" - "$lines" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for shape in dict.fromkeys(r["shape"] for r in rows):
    hone = [r for r in rows if r["shape"] == shape and "impl" not in r]
    torch = [r for r in rows if r["shape"] == shape and "impl" in r]
    h = statistics.median(r["tokens_per_sec"] for r in hone)
    t = statistics.median(r["tokens_per_sec"] for r in torch)
    print(json.dumps({
        "bench": "train_side_by_side", "shape": shape, "rounds": len(hone),
        "cpu": hone[0]["cpu"], "isa_hone": hone[0]["isa"], "isa_cpu": torch[0]["isa"],
        "peer": " + ".join([torch[0]["impl"]] + [f"{k} {torch[0][k]}" for k in ("transformers", "peft") if k in torch[0]]),
        "hone_tokens_per_sec": [round(r["tokens_per_sec"], 1) for r in hone],
        "peer_tokens_per_sec": [round(r["tokens_per_sec"], 1) for r in torch],
        "median_ratio": round(h / t, 3),
        "hone_peak_rss_mb": round(max(r["peak_rss_mb"] for r in hone)),
        "peer_peak_rss_mb": round(max(r["peak_rss_mb"] for r in torch)),
    }))
EOF
