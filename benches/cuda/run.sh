#!/usr/bin/env bash
# The GPU benchmark, everything in one device call. Build here (x86-64) and carry the binaries:
#
#   cargo build --release -p bft-bench -p bft-trainer
#   mkdir -p target/gpu && cp target/release/bft-bench target/release/bft target/gpu/
#   # device tool: carry ["target/gpu"], command: "bash benches/cuda/run.sh"
#
# On the GPU machine: the CUDA kernel rows at Qwen2-1.5B's shapes (cuBLAS GEMM, attention, the
# fused BFT loss with its device memory, AdamW) validated against the CPU kernels; PyTorch's
# unfused cross-entropy at the same shape; and HF transformers + PEFT training a random-init
# model with DeepSeek-R1-Distill-Qwen-1.5B's shapes (LoRA r=16 on all linear layers, BFT loss,
# sequence 2048, largest batch that fits): tokens/s, MFU and peak memory. Results go to $OUT
# (or target/gpu-results) as JSON.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-target/gpu-results}
bin=${BIN:-target/gpu}
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

echo "== CUDA kernel differential tests need the test binaries; rows here validate each kernel"
"$bin/bft-bench" --backend cuda --json "$out/bft-cuda.json" 2>&1 | tee "$out/bft-cuda.txt"

echo "== PyTorch unfused cross-entropy at vocab 151,936"
python3 benches/cuda/torch_loss.py | tee "$out/torch-loss.json"

echo "== HF transformers + PEFT, LoRA-BFT at Qwen2-1.5B shapes, sequence 2048"
python3 benches/cuda/torch_train.py | tee "$out/torch-train.json"

echo "== bft train on CUDA"
if "$bin/bft" train --help 2>/dev/null | grep -q "cuda"; then
    echo "bft train --device cuda is listed; see docs/BENCHMARKS.md for the command" | tee "$out/bft-train.txt"
else
    echo "bft train has no CUDA device yet: only the kernel rows and the PyTorch side ran" \
        | tee "$out/bft-train.txt"
fi
