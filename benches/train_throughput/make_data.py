"""Writes the throughput benchmark's training data: conversations whose assistant turn is
longer than 256 tokens (several gene summaries joined), so every sample fills the cutoff.

    make_data.py SRC OUT N [PER]   # PER summaries an answer (4: past 256 tokens; 24: past 2048)
"""
import json
import sys

src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
per = int(sys.argv[4]) if len(sys.argv) > 4 else 4
genes = [json.loads(line) for line in open(src)]
texts = [g.get("narrative_summary") or g.get("ontological_synopsis") or "" for g in genes]
texts = [t for t in texts if len(t) > 200]
with open(out, "w") as f:
    for i in range(n):
        answer = " ".join(texts[(per * i + k) % len(texts)] for k in range(per))
        row = {"messages": [
            {"role": "user", "content": "Summarise what is known about these genes."},
            {"role": "assistant", "content": answer},
        ]}
        f.write(json.dumps(row) + "\n")
