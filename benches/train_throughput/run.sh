#!/usr/bin/env bash
# CPU training throughput: `bft train` against HF transformers + PEFT doing the same steps on
# this machine: SmolLM2-135M-Instruct, LoRA r=16 on all seven projections, batch 4 x 256
# tokens, AdamW, 2 threads. Prints both tokens/s and their ratio.
#
#   benches/train_throughput/run.sh            # STEPS=6 THREADS=2 PYTHON=python3 by default
#
# PyTorch is taken from $PYTHON if it imports torch, transformers and peft; otherwise a venv
# with the CPU wheels is made once under target/bench-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-6}
THREADS=${THREADS:-2}
work=target/bench-train
mkdir -p "$work"

cargo build --release -q -p bft-trainer
bft=target/release/bft

py=${PYTHON:-python3}
if ! "$py" -c "import torch, transformers, peft" 2>/dev/null; then
    if [ ! -x target/bench-venv/bin/python ]; then
        echo "installing CPU PyTorch + transformers + peft into target/bench-venv ..." >&2
        python3 -m venv target/bench-venv
        target/bench-venv/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu torch \
            || target/bench-venv/bin/pip install -q torch
        target/bench-venv/bin/pip install -q transformers peft safetensors
    fi
    py=target/bench-venv/bin/python
fi

# One model for both: the built-in GGUF converted to an f32 HF directory.
[ -d "$work/hf" ] || "$bft" convert smollm2 "$work/hf"
python3 benches/train_throughput/make_data.py ../shared/data/gene_summaries/gene_summaries.jsonl \
    "$work/data.jsonl" 64 2>/dev/null \
    || python3 benches/train_throughput/make_data.py trainer/data/gene_summaries.jsonl "$work/data.jsonl" 64

echo "== bft train ($STEPS steps, $THREADS threads)" >&2
rm -rf "$work/bft-run"
RAYON_NUM_THREADS=$THREADS "$bft" train --model "$work/hf" --data "$work/data.jsonl" \
    --output "$work/bft-run" --max-steps "$STEPS" --batch-size 4 --cutoff-len 256 \
    --lora-rank 16 --lora-alpha 32 --lora-targets all --loss sft --warmup-ratio 0 >&2
# The first step warms caches and allocations, as in the PyTorch run.
bft_tps=$(python3 - "$work/bft-run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
print(sum(r["tokens"] for r in rows) / sum(r["step_time_s"] for r in rows))
PY
)

echo "== HF transformers + PEFT ($STEPS steps, $THREADS threads)" >&2
hf_json=$(OMP_NUM_THREADS=$THREADS "$py" benches/train_throughput/hf_train.py --model "$work/hf" \
    --data "$work/data.jsonl" --steps "$STEPS" --threads "$THREADS")
hf_tps=$(echo "$hf_json" | python3 -c "import json,sys; print(json.load(sys.stdin)['tokens_per_s'])")

python3 - "$bft_tps" "$hf_tps" "$hf_json" <<'PY'
import json, sys
bft, hf, info = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
print(f"bft train:           {bft:8.1f} tokens/s")
print(f"HF + PEFT (torch {info['torch']}): {hf:8.1f} tokens/s")
print(f"ratio:               {bft / hf:8.2f}x")
PY
