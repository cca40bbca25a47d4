"""Reads `bft train` runs for the GPU check; prints one JSON line.

    check_compare.py train CPU_RUN DEVICE_RUN   # the two runs agree within the tolerances below
    check_compare.py speed RUN MODEL_DIR SEQ PEAK_TFLOPS [PEAK_MEM_MIB]   # tokens/s and MFU

Tolerances of a bf16 run on the device against the same run on the CPU (which computes the bf16
model in f32): each step's loss within 2% and gradient norm within 5%, relative; each adapter
tensor within 10% of its norm (Adam steps of size lr move each weight by about lr whatever the
gradient's size, so a small gradient whose sign differs moves it the other way)."""
import json
import sys


def metrics(run):
    return [json.loads(line) for line in open(f"{run}/metrics.jsonl")]


def train(cpu, dev):
    from safetensors.numpy import load_file
    import numpy as np
    a, b = metrics(cpu), metrics(dev)
    worst = {"loss": 0.0, "grad_norm": 0.0, "adapter": 0.0}
    for x, y in zip(a, b):
        worst["loss"] = max(worst["loss"], abs(x["loss"] - y["loss"]) / abs(x["loss"]))
        worst["grad_norm"] = max(worst["grad_norm"],
                                 abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"])
    wa = load_file(f"{cpu}/adapter/adapter_model.safetensors")
    wb = load_file(f"{dev}/adapter/adapter_model.safetensors")
    for name, t in wa.items():
        t, u = t.astype(np.float64), wb[name].astype(np.float64)
        worst["adapter"] = max(worst["adapter"],
                               float(np.linalg.norm(t - u) / max(np.linalg.norm(t), 1e-12)))
    ok = (len(a) == len(b) == 3 and worst["loss"] <= 0.02 and worst["grad_norm"] <= 0.05
          and worst["adapter"] <= 0.10)
    print(json.dumps({"ok": ok, "steps": [len(a), len(b)], "worst_relative": worst,
                      "loss": [[x["loss"], y["loss"]] for x, y in zip(a, b)],
                      "grad_norm": [[x["grad_norm"], y["grad_norm"]] for x, y in zip(a, b)]}))


def parameters(model_dir):
    """The element count of every tensor in a model's safetensors files (one or sharded),
    read from their headers."""
    import glob
    total = 0
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def speed(run, model_dir, seq, peak_tflops, peak_mib=None):
    rows = metrics(run)
    timed = rows[1:] or rows
    tps = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    cfg = json.load(open(f"{model_dir}/config.json"))
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_base = parameters(model_dir)
    # The same count as torch_train.py: forward 2N and backward 2N a token, plus attention.
    flops_per_token = 4 * n_base + 12 * n * seq * h
    print(json.dumps({"impl": "bft", "tokens_per_s": tps,
                      "mfu": tps * flops_per_token / (peak_tflops * 1e12),
                      "step_time_s": [r["step_time_s"] for r in rows],
                      "peak_mem_gib": peak_mib / 1024 if peak_mib else None,
                      "losses": [r["loss"] for r in rows]}))


if sys.argv[1] == "train":
    train(sys.argv[2], sys.argv[3])
else:
    speed(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]),
          float(sys.argv[6]) if len(sys.argv) > 6 else None)
