#!/usr/bin/env bash
# GPU check: CUDA vs CPU parity on the reference fixtures and the generation benchmark on CUDA.
#
#   cargo build --release --features cuda && scripts/gpu-check.sh [target/release/hone]
#
# Prints JSON lines. Fails when f32 CUDA logits differ from the CPU ones (or from transformers'
# reference logits) by more than 1e-3; bf16 differences are reported, not judged.
set -euo pipefail
cd "$(dirname "$0")/.."
HONE=${1:-target/release/hone}
DEVICE=${HONE_GPU_DEVICE:-cuda}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

[ -x "$HONE" ] || { echo "no hone binary at $HONE (build with --features cuda)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# gpu: /' || true

status=0
for fixture in fixtures/peft/llama_gqa fixtures/peft/qwen2_tied; do
  name=$(basename "$fixture")
  "$HONE" logits --model "$fixture" --input-ids "$fixture/refs/inputs.safetensors" --device cpu \
    --out "$out/$name-cpu.safetensors"
  # f32 on CUDA against CPU, then against transformers' reference.
  "$HONE" logits --model "$fixture" --input-ids "$fixture/refs/inputs.safetensors" --device "$DEVICE" \
    --out "$out/$name-cuda.safetensors" --compare-with "$out/$name-cpu.safetensors" --tolerance 1e-3 || status=1
  "$HONE" logits --model "$fixture" --input-ids "$fixture/refs/inputs.safetensors" --device "$DEVICE" \
    --out "$out/$name-cuda.safetensors" --compare-with "$fixture/refs/logits_base.safetensors" --tolerance 1e-3 || status=1
  # bf16 weights on CUDA: reported only (tolerance large enough not to fail).
  "$HONE" logits --model "$fixture" --input-ids "$fixture/refs/inputs.safetensors" --device "$DEVICE" --dtype bf16 \
    --out "$out/$name-bf16.safetensors" --compare-with "$out/$name-cpu.safetensors" --tolerance 1e9 || status=1
done

# Greedy generation on CUDA must tell stories260k's golden story too.
story=$("$HONE" generate --model checkpoints/base/stories260k --prompt "Once upon a time" --max-tokens 40 --device "$DEVICE")
case "$story" in
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."*) echo '{"check":"cuda_greedy_story","ok":true}' ;;
  *) echo "{\"check\":\"cuda_greedy_story\",\"ok\":false}"; echo "$story" >&2; status=1 ;;
esac

"$HONE" bench generate --model checkpoints/base/stories260k --prompt-tokens 128 --new-tokens 128 --device "$DEVICE"
for batch in 1 8; do
  "$HONE" bench generate --shape smol --prompt-tokens 512 --new-tokens 128 --batch "$batch" --device "$DEVICE"
  "$HONE" bench generate --shape smol --prompt-tokens 512 --new-tokens 128 --batch "$batch" --device "$DEVICE" --dtype bf16
done
exit $status
