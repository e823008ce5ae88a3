#!/usr/bin/env python3
"""sentence-transformers' side of the embedding throughput comparison (issue 14.6): embeds the
`text` of every record of a JSONL corpus with a sentence-transformers model on the CPU and prints
one JSON line: {"bench": "rag_embed", "impl": "sentence-transformers", "chunks", "tokens",
"seconds", "chunks_per_s", "threads"}. Same defaults as hone's embedder: batch 32, texts sorted by
length, max_seq_length from the model directory.

  /work/pyref/bin/python scripts/rag_embed_throughput_st.py \
      checkpoints/base/all-minilm-l6-v2 datasets/rag/hotpotqa_dev_distractor_60/corpus.jsonl

hone's figure for the same corpus and model: `cargo test -p hone-rag --test dense -- --nocapture`
prints the embedding throughput of building the HotpotQA index (chunks/s).
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model_dir, corpus = sys.argv[1:]
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8") if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:8], batch_size=32)  # warm-up
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                       max_length=model.max_seq_length)["input_ids"])
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "bench": "rag_embed",
        "impl": "sentence-transformers",
        "model": model_dir,
        "chunks": len(texts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "chunks_per_s": round(len(texts) / seconds, 1),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
