#!/usr/bin/env bash
# GPU check: CUDA vs CPU parity on the reference fixtures (logits, quantized GGUF bases), greedy
# generation, a short training run, the CUDA reference tests (loss, gradients, AdamW step), then the training benchmark (1B-class shape) and the
# generation benchmark on CUDA, with PyTorch + PEFT on the same GPU beside hone's training figures
# when python3 has torch, transformers and peft.
#
#   cargo build --release -p hone-cli --features cuda && scripts/gpu-check.sh [target/release/hone]
#   (HONE_CUDA_TESTS=<binary of `cargo test --release -p hone-train --features cuda --test
#   cuda_reference --no-run`> adds the reference tests)
#
# Prints JSON lines (one `{"check": ...}` or `{"step": ...}` line per step, the commands' own JSON
# lines in between). Every step runs even when an earlier one failed (each has a time limit,
# HONE_GPU_STEP_TIMEOUT seconds, default 240), and the exit status is 1 when any failed. Fails when
# f32 CUDA logits differ from the CPU ones (or from transformers' reference logits) by more than
# TF32's 2e-3 (below); bf16 differences are reported, not judged. HONE_GPU_SKIP_BENCH=1 stops
# after the checks.
set -uo pipefail
cd "$(dirname "$0")/.."
export HONE=${1:-target/release/hone}
export DEVICE=${HONE_GPU_DEVICE:-cuda}
STEP_TIMEOUT=${HONE_GPU_STEP_TIMEOUT:-240}
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

[ -x "$HONE" ] || { echo "no hone binary at $HONE (build with --features cuda)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# gpu: /' || true

# burn-cuda multiplies f32 matrices in TF32 on the tensor cores (cubek-matmul picks it whenever
# the GPU has it, as PyTorch does with allow_tf32): f32 logits are judged at TF32's tolerance.
# Measured on an H200: 3.8e-4 (fixtures), 1.3e-3 (the K-quant llama, larger logits).
F32_TOL=${HONE_GPU_F32_TOLERANCE:-2e-3}

status=0
# step NAME CMD...: runs CMD under the step time limit, prints one JSON line with its outcome and
# wall time; stderr goes to the terminal (errors name what failed).
step() {
  local name=$1
  shift
  local started=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then
    # A shell function: run it in a child bash so that the time limit applies to it too.
    export -f "$1"
    timeout "$STEP_TIMEOUT" bash -c '"$@"' _ "$@" || rc=$?
  else
    timeout "$STEP_TIMEOUT" "$@" || rc=$?
  fi
  local ok=true
  [ "$rc" = 0 ] || { ok=false; status=1; }
  echo "{\"step\":\"$name\",\"ok\":$ok,\"rc\":$rc,\"seconds\":$((SECONDS - started))}"
}

for fixture in fixtures/peft/llama_gqa fixtures/peft/qwen2_tied; do
  name=$(basename "$fixture")
  ids="$fixture/refs/inputs.safetensors"
  step "$name-cpu-logits" "$HONE" logits --model "$fixture" --input-ids "$ids" --device cpu \
    --out "$out/$name-cpu.safetensors"
  # f32 on CUDA against CPU, then against transformers' reference.
  step "$name-cuda-vs-cpu" "$HONE" logits --model "$fixture" --input-ids "$ids" --device "$DEVICE" \
    --out "$out/$name-cuda.safetensors" --compare-with "$out/$name-cpu.safetensors" --tolerance "$F32_TOL"
  step "$name-cuda-vs-transformers" "$HONE" logits --model "$fixture" --input-ids "$ids" --device "$DEVICE" \
    --out "$out/$name-cuda.safetensors" --compare-with "$fixture/refs/logits_base.safetensors" --tolerance "$F32_TOL"
  # The adapter and PEFT's reference logits for it.
  step "$name-cuda-adapter-vs-peft" "$HONE" logits --model "$fixture" --adapter "$fixture/adapter" \
    --input-ids "$ids" --device "$DEVICE" --out "$out/$name-cuda-adapter.safetensors" \
    --compare-with "$fixture/refs/logits_adapter.safetensors" --tolerance "$F32_TOL"
  # bf16 weights on CUDA: reported only (tolerance large enough not to fail).
  step "$name-cuda-bf16" "$HONE" logits --model "$fixture" --input-ids "$ids" --device "$DEVICE" --dtype bf16 \
    --out "$out/$name-bf16.safetensors" --compare-with "$out/$name-cpu.safetensors" --tolerance 1e9
done

# Quantized GGUF bases on CUDA (dequantized at load there) against transformers' logits.
for q in q4_k q8_0; do
  step "gguf-$q-cuda-vs-transformers" "$HONE" logits --model "fixtures/gguf/kquant/tiny_$q.gguf" \
    --input-ids "fixtures/gguf/kquant/refs_$q.safetensors" --device "$DEVICE" \
    --out "$out/gguf-$q.safetensors" --compare-with "fixtures/gguf/kquant/refs_$q.safetensors" --tolerance "$F32_TOL"
done

# Greedy generation on CUDA must tell stories260k's golden story too.
story_check() {
  local story
  story=$("$HONE" generate --model checkpoints/base/stories260k --prompt "Once upon a time" --max-tokens 40 \
    --device "$DEVICE") || return 1
  case "$story" in
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."*) ;;
    *) echo "$story" >&2; return 1 ;;
  esac
}
step cuda-greedy-story story_check

# Training on CUDA through the CLI: 6 LoRA steps on the llama_gqa fixture must run and lower the
# validation loss (6.2527 before; 6.10 after on the CPU). The adapters are not compared with a
# CPU run's (both start from the same LoRA A, drawn on the CPU): Adam's first steps are
# lr·sign(g), so TF32 rounding flips near-zero gradient elements and the runs drift apart. The
# numbers are checked by the reference tests below (loss, every LoRA gradient and one AdamW step
# against PEFT/torch).
step train-6-steps-cuda "$HONE" train --config configs/quickstart.toml --overwrite \
  --set "model.path=\"fixtures/peft/llama_gqa\"" --set "model.device=\"$DEVICE\"" \
  --set tokenize.max_seq_len=256 --set train.max_steps=6 --set train.save_every=0 \
  --set train.eval_every=0 --set "output.dir=\"$out/train-cuda\"" --fail-if 'eval/loss > 6.2'

# The CUDA reference tests (`cargo test --release -p hone-train --features cuda --test
# cuda_reference --no-run` prints the binary's path; pass it as HONE_CUDA_TESTS).
if [ -n "${HONE_CUDA_TESTS:-}" ]; then
  step cuda-reference-tests "$HONE_CUDA_TESTS" --test-threads 1 --nocapture
fi

[ "${HONE_GPU_SKIP_BENCH:-0}" = 1 ] && exit $status

# Training throughput on a Llama-3.2-1B-class shape (H100/H200 SXM dense f32 peak: 67 TFLOP/s),
# PyTorch + PEFT on the same GPU beside it when available.
have_torch=0
"$PYTHON" -c 'import torch, transformers, peft; assert torch.cuda.is_available()' 2>/dev/null && have_torch=1
train_args=(--shape llama-1b --seq 2048 --lora-r 16 --targets q_proj,v_proj --steps 5)
step bench-train-f32 "$HONE" bench train "${train_args[@]}" --batch 1 \
  --device "$DEVICE" --peak-tflops "${HONE_GPU_PEAK_TFLOPS:-67}"
[ $have_torch = 1 ] && step pytorch-train-f32 "$PYTHON" scripts/bench_train_pytorch.py "${train_args[@]}" \
  --batch 1 --device cuda
# bf16 base weights, f32 adapters (peak here: the bf16 dense tensor-core figure, 989 TFLOP/s).
step bench-train-bf16 "$HONE" bench train "${train_args[@]}" --batch 4 \
  --device "$DEVICE" --dtype bf16 --peak-tflops "${HONE_GPU_PEAK_BF16_TFLOPS:-989}"
[ $have_torch = 1 ] && step pytorch-train-bf16 "$PYTHON" scripts/bench_train_pytorch.py "${train_args[@]}" \
  --batch 4 --device cuda --dtype bf16
step bench-train-f32-checkpointing "$HONE" bench train "${train_args[@]}" --batch 1 \
  --device "$DEVICE" --peak-tflops "${HONE_GPU_PEAK_TFLOPS:-67}" --gradient-checkpointing

step bench-generate-stories "$HONE" bench generate --model checkpoints/base/stories260k \
  --prompt-tokens 128 --new-tokens 128 --device "$DEVICE"
for batch in 1 8; do
  step "bench-generate-smol-b$batch" "$HONE" bench generate --shape smol --prompt-tokens 512 --new-tokens 128 \
    --batch "$batch" --device "$DEVICE"
  step "bench-generate-smol-b$batch-bf16" "$HONE" bench generate --shape smol --prompt-tokens 512 \
    --new-tokens 128 --batch "$batch" --device "$DEVICE" --dtype bf16
done
exit $status
