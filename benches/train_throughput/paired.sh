#!/usr/bin/env bash
# The f32 ratio of `bft train` to HF transformers + PEFT measured side by side: both runs at
# once, one thread each, pinned to two different CPUs (`taskset`), then again with the CPUs
# swapped; REPEATS such pairs. Same model, data and settings as run.sh (which must have run
# once, or at least prepared target/bench-train).
#
# Why: on a shared 2-vCPU VM the speed of the whole machine drifts by a third within an hour, so
# two runs one after the other can differ by more than the effect measured. Two runs at the same
# moment see the same drift; each pairing's ratio is what this prints, with their median. It
# measures one thread a side (run.sh measures THREADS): both sides scaled about 2x from one
# thread to two on a Zen 3 EPYC.
#
#   benches/train_throughput/paired.sh          # REPEATS=2 DTYPE=f32 (bft's --dtype) CPUS="0 1"
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEATS=${REPEATS:-2}
DTYPE=${DTYPE:-f32}
read -r cpu_a cpu_b <<< "${CPUS:-0 1}"
work=target/bench-train
py=${PYTHON:-target/bench-venv/bin/python}
bft=target/release/bft
if [ ! -d "$work/hf" ] || [ ! -f "$work/data.jsonl" ] || ! "$py" -c "import torch, peft" 2>/dev/null; then
    echo "run benches/train_throughput/run.sh once first (it converts the model, writes the data" >&2
    echo "and installs PyTorch), or set PYTHON to a Python with torch, transformers and peft" >&2
    exit 1
fi
cargo build --release -q -p bft-trainer
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "CPU: $("$bft" info 2>/dev/null | sed -n 's/^cpu: //p')"
echo "bft kernels: $("$bft" info 2>/dev/null | sed -n 's/^cpu kernels: //p')"
for r in $(seq "$REPEATS"); do
    for swap in 0 1; do
        if [ "$swap" = 0 ]; then hf_cpu=$cpu_a; bft_cpu=$cpu_b; else hf_cpu=$cpu_b; bft_cpu=$cpu_a; fi
        echo "== pair $r.$swap: HF on CPU $hf_cpu, bft on CPU $bft_cpu" >&2
        OMP_NUM_THREADS=1 taskset -c "$hf_cpu" "$py" benches/train_throughput/hf_train.py \
            --model "$work/hf" --data "$work/data.jsonl" --steps 6 --threads 1 --autocast none \
            > "$out/hf.json" 2> "$out/hf.log" &
        hf_pid=$!
        # Eight steps: about as long as PyTorch's six, so neither side runs alone for long.
        RAYON_NUM_THREADS=1 taskset -c "$bft_cpu" "$bft" train --model "$work/hf" \
            --data "$work/data.jsonl" --output "$out/bft" --max-steps 8 --batch-size 4 \
            --cutoff-len 256 --lora-rank 16 --lora-alpha 32 --lora-targets all --loss sft \
            --warmup-ratio 0 --dtype "$DTYPE" > /dev/null 2> "$out/bft.log" \
            || { cat "$out/bft.log" >&2; exit 1; }
        wait "$hf_pid" || { cat "$out/hf.log" >&2; exit 1; }
        python3 - "$out/hf.json" "$out/bft/metrics.jsonl" "$hf_cpu" "$bft_cpu" >> "$out/pairs" <<'PY'
import json, statistics, sys
hf = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["tokens_per_s"]
# After the warm-up step, as in the PyTorch script.
steps = [json.loads(l)["step_time_s"] for l in open(sys.argv[2]) if l.strip()][1:]
bft = 1024 / statistics.median(steps)
print(json.dumps({"hf": hf, "bft": bft, "hf_cpu": sys.argv[3], "bft_cpu": sys.argv[4]}))
PY
        rm -rf "$out/bft"
    done
done
python3 - "$out/pairs" "$DTYPE" <<'PY'
import json, statistics, sys
pairs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'HF f32 (1 thread)':>18} {'bft ' + sys.argv[2] + ' (1 thread)':>20}  ratio   CPUs (HF, bft)")
for p in pairs:
    print(f"{p['hf']:13.1f} tok/s {p['bft']:14.1f} tok/s  {p['bft'] / p['hf']:.2f}x  {p['hf_cpu']}, {p['bft_cpu']}")
ratios = [p["bft"] / p["hf"] for p in pairs]
print(f"median ratio {statistics.median(ratios):.2f}x over {len(pairs)} pairs "
      f"({min(ratios):.2f}x-{max(ratios):.2f}x)")
PY
