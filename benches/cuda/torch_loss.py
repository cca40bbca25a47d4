"""PyTorch's unfused cross-entropy at vocab 151,936 (logits materialised, f32 upcast inside
cross_entropy), forward and backward to the hidden states, for the row beside bft's fused loss
(`bft-bench --backend cuda --filter loss`). Prints one JSON line: time and peak memory."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--hidden", type=int, default=1536)
ap.add_argument("--vocab", type=int, default=151936)
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()

torch.manual_seed(0)
x = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (0.05 * torch.randn(args.vocab, args.hidden, device="cuda")).to(torch.bfloat16)
y = torch.randint(0, args.vocab, (args.tokens,), device="cuda")


def run():
    logits = x @ w.t()
    l = F.cross_entropy(logits.float(), y, reduction="none")
    p = torch.exp(-l).detach()
    (p * l).mean().backward()
    x.grad = None


run()
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(args.reps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({
    "impl": "torch unfused ce", "tokens": args.tokens, "vocab": args.vocab,
    "time_ms": 1e3 * times[len(times) // 2],
    "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
}))
