#!/usr/bin/env bash
# GPU check: CUDA vs CPU parity on the reference fixtures (logits, and a few training steps), the
# generation benchmark and the training benchmark (1B-class shape) on CUDA.
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
# Training parity: the same 6 LoRA steps on the llama_gqa fixture on CPU and on CUDA; the two
# adapters must give the same logits (f32, within 1e-3) on the fixture's reference inputs.
for dev in cpu "$DEVICE"; do
  "$HONE" train --config configs/quickstart.toml --overwrite \
    --set "model.path=\"fixtures/peft/llama_gqa\"" --set "model.device=\"$dev\"" \
    --set train.max_steps=6 --set train.save_every=0 --set train.eval_every=0 \
    --set "output.dir=\"$out/train-${dev//:/_}\"" > "$out/train-${dev//:/_}.log" || status=1
done
"$HONE" logits --model fixtures/peft/llama_gqa --adapter "$out/train-cpu/adapter" \
  --input-ids fixtures/peft/llama_gqa/refs/inputs.safetensors --device cpu --out "$out/trained-cpu.safetensors"
"$HONE" logits --model fixtures/peft/llama_gqa --adapter "$out/train-${DEVICE//:/_}/adapter" \
  --input-ids fixtures/peft/llama_gqa/refs/inputs.safetensors --device cpu --out "$out/trained-cuda.safetensors" \
  --compare-with "$out/trained-cpu.safetensors" --tolerance 1e-3 || status=1

# Training throughput on a Llama-3.2-1B-class shape (H100 SXM dense f32 peak: 67 TFLOP/s).
"$HONE" bench train --shape llama-1b --seq 2048 --batch 1 --lora-r 16 --targets q_proj,v_proj --steps 5 \
  --device "$DEVICE" --peak-tflops "${HONE_GPU_PEAK_TFLOPS:-67}" || status=1
"$HONE" bench train --shape llama-1b --seq 2048 --batch 1 --lora-r 16 --targets q_proj,v_proj --steps 5 \
  --device "$DEVICE" --peak-tflops "${HONE_GPU_PEAK_TFLOPS:-67}" --gradient-checkpointing || status=1
# bf16 base weights, f32 adapters (peak here: the bf16 dense tensor-core figure, 989 TFLOP/s on H100 SXM).
"$HONE" bench train --shape llama-1b --seq 2048 --batch 4 --lora-r 16 --targets q_proj,v_proj --steps 5 \
  --device "$DEVICE" --dtype bf16 --peak-tflops "${HONE_GPU_PEAK_BF16_TFLOPS:-989}" || status=1
exit $status
