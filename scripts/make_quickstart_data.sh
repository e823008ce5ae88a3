#!/usr/bin/env bash
# Builds datasets/quickstart/: instruction-following data that stories260k cannot follow yet.
#
#   cargo build --release -p hone-cli && scripts/make_quickstart_data.sh [N] [target/release/hone]
#
# 1. Samples N stories (default 400) from the shipped base model:
#    hone generate --model checkpoints/base/stories260k --temperature 0.8 --seed $i --max-tokens 120
# 2. Finds each story's hero (the name after "named ", e.g. Lily, Tim, Ben), replaces every
#    occurrence of it with a name drawn (seeded) from NAMES, and cuts the story after its last
#    complete sentence.
# 3. Writes datasets/quickstart/train.jsonl with Alpaca records
#    {"instruction": "Tell me a story about NAME.", "output": "<story about NAME>"}.
#
# Deterministic: the same binary and N give the same file. HELD_OUT names never appear in it;
# configs/quickstart.toml asks for a story about one of them after training.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-400}
HONE=${2:-target/release/hone}
MODEL=checkpoints/base/stories260k
OUT=datasets/quickstart/train.jsonl
[ -x "$HONE" ] || { echo "no hone binary at $HONE (cargo build --release -p hone-cli)" >&2; exit 2; }

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
for i in $(seq 1 "$N"); do
  "$HONE" generate --model "$MODEL" --temperature 0.8 --seed "$i" --max-tokens 120 > "$raw/$i.txt" 2>/dev/null
done

python3 - "$raw" "$N" "$OUT" <<'PY'
import json, random, re, sys

raw, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
NAMES = ["Amy", "Ava", "Bella", "Bob", "Chloe", "Daisy", "Dan", "Ella", "Emma", "Finn", "Grace",
         "Jack", "Jake", "Jenny", "Kate", "Leo", "Lucy", "Mark", "Mia", "Molly", "Nina", "Noah",
         "Olly", "Pete", "Rosa", "Ruby", "Sally", "Sophie", "Toby", "Zoe"]
HELD_OUT = ["Kiki", "Otto", "Hugo"]
rng = random.Random(1234)
records, skipped = [], 0
for i in range(1, n + 1):
    text = open(f"{raw}/{i}.txt", encoding="utf-8").read().strip()
    m = re.search(r"\bnamed ([A-Z][a-z]+)\b", text)
    if not m:
        skipped += 1
        continue
    hero = m.group(1)
    # Keep complete sentences only (generation stops mid-word at 120 tokens).
    ends = [e.end() for e in re.finditer(r'[.!?]"?', text)]
    if not ends:
        skipped += 1
        continue
    text = text[: ends[-1]]
    name = rng.choice(NAMES)
    story = re.sub(rf"\b{hero}\b", name, text)
    if story.count(name) < 2 or any(h in story for h in HELD_OUT):
        skipped += 1
        continue
    records.append({"instruction": f"Tell me a story about {name}.", "output": story})
with open(out, "w", encoding="utf-8") as f:
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"wrote {len(records)} stories to {out} ({skipped} of {n} samples had no usable hero)")
PY
