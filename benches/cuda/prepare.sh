#!/usr/bin/env bash
# Builds, here (x86-64; no GPU needed), everything benches/cuda/check.sh runs on a GPU machine,
# into target/gpu (it must stay under the 64 MiB one device call carries):
#   bft                    the binary (cargo profile `device`: release, no debug info, stripped)
#   cuda_diff              every CUDA kernel against the CPU kernel (kernels/tests/cuda_diff.rs)
#   backends               the engine's op walk on every backend (engine/tests/backends.rs)
#   tok/                   SmolLM2's tokenizer and chat template, for the random-init models
#   data-short.jsonl       conversations of ~150 tokens (the CPU-against-CUDA training check)
#   data-long.jsonl        conversations past 2048 tokens (the throughput comparison)
#   *.py                   the scripts check.sh runs with the GPU machine's PyTorch
# then prints the total size. Next: the device tool with carry ["target/gpu"] and the command
# "bash target/gpu/check.sh".
set -euo pipefail
cd "$(dirname "$0")/../.."
gpu=target/gpu
export BFT_CACHE="${BFT_CACHE:-$PWD/target/bft-models}"

cargo build --profile device -p bft-trainer --bin bft
# The test binaries: cargo prints each executable's path as JSON.
tests=$(cargo test --profile device --no-run --message-format=json \
    -p bft-kernels --test cuda_diff -p bft-engine --test backends 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')

rm -rf "$gpu" && mkdir -p "$gpu/tok"
cp target/device/bft "$gpu/"
while read -r name exe; do cp "$exe" "$gpu/$name"; done <<<"$tests"
for t in cuda_diff backends; do [ -x "$gpu/$t" ] || { echo "no $t test binary" >&2; exit 1; }; done

# The tokenizer and chat template of the built-in model (a converted copy is cached once).
conv=target/bench-train/hf
[ -f "$conv/tokenizer.json" ] || "$gpu/bft" convert smollm2 "$conv"
cp "$conv/tokenizer.json" "$conv/tokenizer_config.json" "$gpu/tok/"

genes=../shared/data/gene_summaries/gene_summaries.jsonl
[ -f "$genes" ] || genes=trainer/data/gene_summaries.jsonl
python3 benches/train_throughput/make_data.py "$genes" "$gpu/data-short.jsonl" 16 1
python3 benches/train_throughput/make_data.py "$genes" "$gpu/data-long.jsonl" 64 24
cp benches/cuda/check.sh benches/cuda/check_model.py benches/cuda/check_compare.py \
    benches/cuda/torch_train.py "$gpu/"
# A device call carries the tracked files too: both together must stay under 64 MiB.
carried=$(du -sb "$gpu" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "target/gpu: $((carried >> 20)) MiB, tracked files: $((tracked >> 20)) MiB (limit 64 MiB)"
if [ $((carried + tracked)) -ge $((64 << 20)) ]; then
    echo "over the 64 MiB a device call carries" >&2
    exit 1
fi
