"""The PyTorch side of the throughput benchmark: HF transformers + PEFT LoRA doing the same
steps as `bft train` (same model, data, cutoff, batch, LoRA rank/targets, AdamW), on CPU with
the given number of threads, in f32 or under CPU bf16 autocast (f32 weights and LoRA masters,
bf16 products: oneDNN's bf16 kernels, AMX where the CPU has it). Prints one JSON line: mean
tokens/s over the timed steps, the mean loss of each step, and the peak RSS."""
import argparse
import contextlib
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--cutoff-len", type=int, default=256)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                         target_modules=targets, task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                        weight_decay=0.0)

rows = [json.loads(line) for line in open(args.data)]
samples = []
for r in rows:
    msgs = r["messages"]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"][: args.cutoff_len]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    labels = [-100] * n_prompt + ids[n_prompt:]
    samples.append((ids, labels[: len(ids)]))

def autocast():
    if args.autocast == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


times, tokens, losses = [], [], []
for step in range(args.steps):
    batch = [samples[(step * args.batch_size + i) % len(samples)] for i in range(args.batch_size)]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
    attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    t0 = time.perf_counter()
    with autocast():
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    losses.append(float(out.loss))
    if step >= args.warmup:
        times.append(dt)
        tokens.append(int(attn.sum()))
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_s": sum(tokens) / sum(times), "step_time_s": sum(times) / len(times),
                  "steps": len(times), "torch": torch.__version__, "losses": losses,
                  "peak_rss_mb": peak_mb, "autocast": args.autocast}))
