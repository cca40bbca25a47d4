#!/usr/bin/env bash
# CPU training throughput: `bft train` against HF transformers + PEFT doing the same steps on
# this machine: SmolLM2-135M-Instruct, LoRA r=16 on all seven projections, batch 4 x 256
# tokens, AdamW, 2 threads. Four rows measured in one run: HF + PEFT in f32 and under CPU bf16
# autocast, `bft train` in f32 and with `--dtype bf16` (bf16 frozen weights, autocast). Prints
# the CPU model, the kernels each side picked, tokens/s, seconds a step, peak RSS, and bft's
# ratio to PyTorch at the same precision.
#
# The four rows are measured REPEATS times, interleaved (HF f32, HF bf16, bft f32, bft bf16, then
# again), and each row reports its median with the range: on a shared VM one PyTorch run has read
# anywhere from 394 to 604 tokens/s, so a single run of each says little about their ratio.
#
#   benches/train_throughput/run.sh     # STEPS=6 REPEATS=3 THREADS=2 PYTHON=python3 by default
#
# On CPUs without AVX512-BF16 (AMD Zen 2/3, Intel before Cooper Lake) PyTorch's bf16 autocast
# has no bf16 GEMM to run and takes minutes a step (over three on a Zen 3 EPYC, against eight
# seconds in f32): HF_BF16_STEPS=2 times one step of that row (default: STEPS).
#
# PyTorch is taken from $PYTHON if it imports torch, transformers and peft; otherwise a venv
# with the CPU wheels is made once under target/bench-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-6}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
HF_BF16_STEPS=${HF_BF16_STEPS:-$STEPS}
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

# tokens/s of a bft run's steps after the first (which warms caches and allocations, as in
# the PyTorch runs).
bft_row() {
    local dtype=$1 out="$work/bft-run-$1"
    echo "== bft train --dtype $dtype ($STEPS steps, $THREADS threads)" >&2
    rm -rf "$out"
    RAYON_NUM_THREADS=$THREADS python3 benches/peak_rss.py "$work/rss-bft-$dtype" "$bft" train --model "$work/hf" \
        --data "$work/data.jsonl" --output "$out" --max-steps "$STEPS" --batch-size 4 \
        --cutoff-len 256 --lora-rank 16 --lora-alpha 32 --lora-targets all --loss sft \
        --warmup-ratio 0 --dtype "$dtype"
    python3 - "$out/metrics.jsonl" "$(cat "$work/rss-bft-$dtype")" "$dtype" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
timed = rows[1:]
print(json.dumps({"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
                  "step_time_s": sum(r["step_time_s"] for r in timed) / len(timed),
                  "losses": [r["loss"] for r in rows], "peak_rss_mb": float(sys.argv[2]),
                  "dtype": sys.argv[3]}))
PY
}

hf_row() {
    local steps=$STEPS
    [ "$1" = bf16 ] && steps=$HF_BF16_STEPS
    echo "== HF transformers + PEFT, autocast $1 ($steps steps, $THREADS threads)" >&2
    OMP_NUM_THREADS=$THREADS "$py" benches/train_throughput/hf_train.py --model "$work/hf" \
        --data "$work/data.jsonl" --steps "$steps" --threads "$THREADS" --autocast "$1"
}

# One JSON line per run, in files that gather each row's repeats.
runs="$work/runs"
rm -rf "$runs"
mkdir -p "$runs"
for r in $(seq "$REPEATS"); do
    echo "== repeat $r of $REPEATS" >&2
    hf_row none >> "$runs/hf32"
    hf_row bf16 >> "$runs/hf16"
    bft_row f32 >> "$runs/bft32"
    bft_row bf16 >> "$runs/bft16"
done
torch_isa=$("$py" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")

echo "CPU: $("$bft" info 2>/dev/null | sed -n 's/^cpu: //p')"
echo "bft kernels: $("$bft" info 2>/dev/null | sed -n 's/^cpu kernels: //p')"
python3 - "$runs" "$torch_isa" <<'PY'
import json, statistics, sys
def load(name):
    return [json.loads(l) for l in open(f"{sys.argv[1]}/{name}") if l.strip()]
hf32, hf16, b32, b16 = (load(n) for n in ("hf32", "hf16", "bft32", "bft16"))
tps = lambda runs: statistics.median(r["tokens_per_s"] for r in runs)
print(f"torch {hf32[0]['torch']}: CPU capability {sys.argv[2]}")
print(f"{len(hf32)} runs of each row, interleaved; tokens/s is the median (min-max)")
print(f"{'run':26} {'tokens/s':>9} {'(min-max)':>15} {'s/step':>7} {'peak RSS':>9}  ratio of medians")
rows = [("HF + PEFT f32", hf32, ""), ("HF + PEFT bf16 autocast", hf16, ""),
        ("bft train (f32)", b32, f"{tps(b32) / tps(hf32):.2f}x HF f32"),
        ("bft train --dtype bf16", b16, f"{tps(b16) / tps(hf16):.2f}x HF bf16 autocast")]
for name, runs, ratio in rows:
    t = [r["tokens_per_s"] for r in runs]
    step = statistics.median(r["step_time_s"] for r in runs)
    rss = max(r["peak_rss_mb"] for r in runs)
    print(f"{name:26} {tps(runs):9.1f} {f'({min(t):.0f}-{max(t):.0f})':>15} {step:7.2f} {rss:6.0f} MB  {ratio}")
lo = min(r["tokens_per_s"] for r in b16) / max(r["tokens_per_s"] for r in hf16)
hi = max(r["tokens_per_s"] for r in b16) / min(r["tokens_per_s"] for r in hf16)
print(f"bf16 ratio over every pairing of runs: {lo:.2f}x to {hi:.2f}x")
# Which setting is each side's fastest differs by CPU (PyTorch's autocast is the slower one
# where the CPU has no bf16 instructions).
best = lambda a, b: max((tps(a), "f32"), (tps(b), "bf16"))
(bt, bd), (ht, hd) = best(b32, b16), best(hf32, hf16)
print(f"best of each: bft {bt:.1f} tokens/s ({bd}) / PyTorch {ht:.1f} ({hd}) = {bt / ht:.2f}x")
PY
