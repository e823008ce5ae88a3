#!/usr/bin/env bash
# The README's "RAG vs LoRA vs both" measurement on SmolLM2-135M-Instruct (Q4_1 GGUF), CPU:
# RAFT and closed-book training data from the SQuAD 2.0 set, a LoRA for each (and raft25: RAFT
# with the unanswerable share capped at 25%), then `hone eval compare` on the held-out questions,
# a freshness run (passages added with `hone rag add` after training, asked about), and the
# HotpotQA questions (multi-hop; no adapter is trained on them: 60 questions are too few).
# Outputs under checkpoints/runs/ (git-ignored).
#
#   scripts/rag_compare_smollm2.sh            # everything (about two hours on 2 cores)
#   SKIP_TRAIN=1 scripts/rag_compare_smollm2.sh   # reuse the trained adapters
set -euo pipefail
cd "$(dirname "$0")/.."
hone=target/release/hone
cargo build --release -p hone-cli
scripts/fetch-models.sh smollm2
model=checkpoints/base/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
squad=datasets/rag/squad_v2_complexity
data=checkpoints/runs/data

$hone data raft --corpus $squad/corpus.jsonl --questions $squad/questions.jsonl -k 3 \
  --out $data/raft-squad
$hone data raft --corpus $squad/corpus.jsonl --questions $squad/questions.jsonl -k 3 \
  --unanswerable-share 0.25 --out $data/raft25-squad
$hone data raft --corpus $squad/corpus.jsonl --questions $squad/questions.jsonl --closed-book \
  --out $data/closedbook-squad
if [ -z "${SKIP_TRAIN:-}" ]; then
  $hone train --config configs/smollm2-raft-squad.toml --overwrite
  $hone train --config configs/smollm2-raft25-squad.toml --overwrite
  $hone train --config configs/smollm2-closedbook-squad.toml --overwrite
fi

$hone rag index --docs $squad/corpus.jsonl --out $data/index-squad --force
adapters=(--adapter raft=checkpoints/runs/smollm2-raft-squad/adapter
          --adapter raft25=checkpoints/runs/smollm2-raft25-squad/adapter
          --adapter closedbook=checkpoints/runs/smollm2-closedbook-squad/adapter)
$hone eval compare --model $model "${adapters[@]}" --rag $data/index-squad \
  --questions $data/raft-squad/heldout.jsonl -k 3 --max-tokens 32 \
  --out checkpoints/runs/compare-squad-heldout

# Freshness: the same index plus passages written after training (datasets/rag/freshness).
rm -rf $data/index-squad-fresh
$hone rag index --docs $squad/corpus.jsonl --out $data/index-squad-fresh
$hone rag add $data/index-squad-fresh --docs datasets/rag/freshness/corpus.jsonl
$hone eval compare --model $model "${adapters[@]}" --rag $data/index-squad-fresh \
  --questions datasets/rag/freshness/questions.jsonl -k 3 --max-tokens 32 \
  --out checkpoints/runs/compare-freshness

# HotpotQA (multi-hop, two gold passages per question): the SQuAD-trained adapters on other data.
$hone rag index --docs datasets/rag/hotpotqa_dev_distractor_60/corpus.jsonl --out $data/index-hotpot --force
$hone eval compare --model $model "${adapters[@]}" --rag $data/index-hotpot \
  --questions datasets/rag/hotpotqa_dev_distractor_60/questions.jsonl -k 3 --max-tokens 32 \
  --out checkpoints/runs/compare-hotpot
