"""Writes the throughput benchmark's training data: conversations whose assistant turn is
longer than 256 tokens (several gene summaries joined), so every sample fills the cutoff."""
import json
import sys

src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
genes = [json.loads(line) for line in open(src)]
texts = [g.get("narrative_summary") or g.get("ontological_synopsis") or "" for g in genes]
texts = [t for t in texts if len(t) > 200]
with open(out, "w") as f:
    for i in range(n):
        answer = " ".join(texts[(4 * i + k) % len(texts)] for k in range(4))
        row = {"messages": [
            {"role": "user", "content": "Summarise what is known about these genes."},
            {"role": "assistant", "content": answer},
        ]}
        f.write(json.dumps(row) + "\n")
