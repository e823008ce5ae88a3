#!/usr/bin/env python3
"""Embedding throughput of sentence-transformers on CPU, the peer of `hone bench rag`'s
`rag_embed` line: the same texts (`hone bench rag --embed-only --dump-chunks FILE` writes them),
the same model directory, the same batch size (sentence-transformers sorts texts by length, as
hone's embedder does). Prints one JSON line. Any JSONL file with a `text` field works (a
`hone rag index` corpus too).

    python scripts/bench_embed_st.py CHUNKS.jsonl [--model checkpoints/base/all-minilm-l6-v2]
                                     [--batch-size 32]

Needs `pip install sentence-transformers` (torch comes with it).
"""
import argparse
import json
import platform
import resource
import time


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("chunks")
    ap.add_argument("--model", default="checkpoints/base/all-minilm-l6-v2")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    texts = [json.loads(line)["text"] for line in open(args.chunks) if line.strip()]
    model = SentenceTransformer(args.model, device="cpu")
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    tokens = sum(len(ids) for ids in model.tokenizer(
        texts, truncation=True, max_length=model.max_seq_length)["input_ids"])
    started = time.perf_counter()
    with torch.inference_mode():
        model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "bench": "rag_embed",
        "impl": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "chunks": len(texts),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "chunks_per_sec": len(texts) / seconds,
        "tokens_per_sec": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }))


if __name__ == "__main__":
    main()
