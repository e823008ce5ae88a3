#!/usr/bin/env bash
# Hugging Face interoperability check: adapters hone writes load in PEFT with hone's logits, and
# `hone merge` output loads unchanged in transformers with hone's logits (f32 sharded, bf16).
#
#   scripts/hf-interop-check.sh                       # run the checks (JSON lines, exit 1 on failure)
#   scripts/hf-interop-check.sh --write-fixtures fixtures/hf_interop   # also refresh CI fixtures
#   scripts/hf-interop-check.sh --keep /tmp/hf-interop                 # keep the work directory
#
# Python: $PYTHON if set (e.g. PYTHON=/work/pyref/bin/python), else target/hf-interop-venv/ (created
# with `pip install torch transformers peft safetensors` from PyPI on first use). Builds hone with
# `cargo build --release -p hone-cli` unless HONE points at a binary. See scripts/hf_interop_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  VENV=${HF_INTEROP_VENV:-target/hf-interop-venv}
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
  fi
  if ! "$VENV/bin/python" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then
    "$VENV/bin/pip" install --quiet torch transformers peft safetensors
  fi
  PYTHON="$VENV/bin/python"
fi

if [ -z "${HONE:-}" ]; then
  cargo build --release -p hone-cli
  HONE=target/release/hone
fi

exec "$PYTHON" scripts/hf_interop_check.py --hone "$HONE" "$@"
