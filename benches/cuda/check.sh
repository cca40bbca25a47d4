#!/usr/bin/env bash
# The GPU check of the CUDA path, in one device call of at most 8 minutes on one H100/H200:
#   1 kernels  every CUDA kernel's differential test against the CPU kernel (cuda_diff)
#   2 ops      the engine's op walk on CUDA against the CPU, forward and backward (backends)
#   3 train    three LoRA-BFT steps of a small random-init Qwen2 on CUDA against the same
#              steps on the CPU: loss, gradient norm and adapter weights (check_compare.py)
#   4 speed    `bft train` against HF transformers + PEFT (bf16, sdpa) at
#              DeepSeek-R1-Distill-Qwen-1.5B's shapes: random init, sequence 2048, LoRA r=16 on
#              all linear layers, BFT; tokens/s, MFU and peak memory, same GPU, same call
# It prints one line per part and writes $OUT/check.json (and each part's log beside it). Each
# step has its own time limit (75 + 45 + 2 x 50 + 130 + 100 s, and the two random models), so
# the call ends within 8 minutes whatever hangs.
#
#   bash benches/cuda/prepare.sh   # here, without a GPU: builds target/gpu (under 64 MiB)
#   device tool: carry ["target/gpu"], command "bash target/gpu/check.sh", timeout_s 600
#
# CHECK_DEVICE=cpu runs parts 3 and 4 with the CPU in CUDA's place at tiny shapes and parts 1
# and 2 as skips: a dry run of the script on a machine without a GPU (PYTHON must import torch,
# transformers, peft and safetensors).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/results}
mkdir -p "$out"
dev=${CHECK_DEVICE:-cuda}
py=${PYTHON:-python3}
peak=${PEAK_TFLOPS:-989}
work=$(mktemp -d)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BFT_CACHE="$work/cache" RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
[ "$dev" = cuda ] && export BFT_REQUIRE_CUDA=1
: >"$out/parts.jsonl"

# part NAME STATUS SECONDS DETAIL_JSON: one line on stdout, one JSON object in parts.jsonl.
part() {
    printf '%-8s %-5s %6.1f s  %s\n' "$1" "$2" "$3" "$4"
    printf '{"part": "%s", "status": "%s", "seconds": %s, "detail": %s}\n' "$1" "$2" "$3" "$4" \
        >>"$out/parts.jsonl"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# The summary line cargo's test harness prints, as a JSON string.
tests_json() {
    local line
    line=$(grep -h '^test result' "$1" | tail -1 | tr -d '"')
    printf '"%s"' "${line:-no test summary: see the log}"
}

gpu_line=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)
echo "GPU: $gpu_line"

for t in cuda_diff backends; do
    name=$([ "$t" = cuda_diff ] && echo kernels || echo ops)
    t0=$(now)
    if [ "$dev" != cuda ]; then
        part "$name" skip 0 '"no CUDA device in a dry run"'
        continue
    fi
    timeout "$([ "$t" = cuda_diff ] && echo 75 || echo 45)" "$here/$t" --test-threads 1 \
        >"$out/$name.log" 2>&1
    rc=$?
    part "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(since "$t0")" "$(tests_json "$out/$name.log")"
done

# 3: the same three steps on the CPU and on the device, bf16 weights, no dropout.
t0=$(now)
"$py" "$here/check_model.py" tiny "$work/tiny" "$here/tok" >"$out/train.log" 2>&1
steps=(--data "$here/data-short.jsonl" --model "$work/tiny" --loss bft --dtype bf16 --max-steps 3
    --batch-size 4 --cutoff-len 256 --lora-rank 8 --lora-alpha 16 --lora-targets all
    --lora-dropout 0 --warmup-ratio 0 --lr 1e-3 --window 16)
for k in 0 1; do
    d=$([ $k = 0 ] && echo cpu || echo "$dev")
    timeout 50 "$here/bft" train "${steps[@]}" --device "$d" --output "$work/run-$k" \
        >>"$out/train.log" 2>&1
done
detail=$("$py" "$here/check_compare.py" train "$work/run-0" "$work/run-1" 2>>"$out/train.log")
status=$(echo "$detail" | grep -q '"ok": true' && echo ok || echo FAIL)
part train "$status" "$(since "$t0")" "${detail:-\"see train.log\"}"

# 4: bft and HF + PEFT at 1.5B shapes (tiny shapes in a dry run), each under its own limit.
t0=$(now)
size=$([ "$dev" = cuda ] && echo 1.5b || echo tiny)
seq=$([ "$dev" = cuda ] && echo 2048 || echo 256)
"$py" "$here/check_model.py" "$size" "$work/big" "$here/tok" >"$out/speed.log" 2>&1
mem_log="$work/mem.csv"
if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$mem_log" 2>/dev/null &
    smi=$!
fi
timeout 130 "$here/bft" train --model "$work/big" --data "$here/data-long.jsonl" --loss bft \
    --dtype bf16 --device "$dev" --cutoff-len "$seq" --batch-size "${BATCH:-4}" --max-steps 4 \
    --lora-rank 16 --lora-alpha 32 --lora-targets all --lora-dropout 0 --warmup-ratio 0 \
    --window 256 --checkpointing --output "$work/run-big" >>"$out/speed.log" 2>&1
bft_rc=$?
peak_mib=""
if [ "$dev" = cuda ]; then
    kill "$smi" 2>/dev/null
    peak_mib=$(sort -n "$mem_log" | tail -1)
fi
bft_json='null'
[ $bft_rc = 0 ] && bft_json=$("$py" "$here/check_compare.py" speed "$work/run-big" "$work/big" "$seq" "$peak" $peak_mib 2>>"$out/speed.log")
if [ "$dev" = cuda ]; then
    hf_json=$(timeout 100 "$py" "$here/torch_train.py" --seq 2048 --max-batch 8 --steps 4 \
        --warmup 1 --peak-tflops "$peak" 2>>"$out/speed.log" | tail -1)
else
    hf_json=$(timeout 180 "$py" "$here/torch_train.py" --smoke 2>>"$out/speed.log" | tail -1)
fi
status=$([ -n "$bft_json" ] && [ "$bft_json" != null ] && [ -n "$hf_json" ] && echo ok || echo FAIL)
part speed "$status" "$(since "$t0")" "{\"bft\": ${bft_json:-null}, \"hf_peft\": ${hf_json:-null}, \"bft_exit\": $bft_rc}"

"$py" - "$out/parts.jsonl" "$out/check.json" "$gpu_line" <<'PY'
import json, sys
parts = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"gpu": sys.argv[3], "parts": parts}, open(sys.argv[2], "w"), indent=1)
print("all ok" if all(p["status"] in ("ok", "skip") for p in parts) else "FAILED: " +
      ", ".join(p["part"] for p in parts if p["status"] not in ("ok", "skip")))
PY
rm -rf "$work"
