"""The PyTorch side of the GPU training benchmark: HF transformers + PEFT, bf16, SDPA attention,
LoRA r=16 on every linear layer of a random-init model with DeepSeek-R1-Distill-Qwen-1.5B's
shapes, the BFT loss (token weights sg(p), sample weight 1 - lowest window-mean confidence)
written in PyTorch, sequence 2048, AdamW. Finds the largest batch that fits (halving from
--max-batch on out-of-memory), then times --steps steps. Prints one JSON line: tokens/s, MFU,
peak memory. Runs on the GPU machine, which has torch, transformers and peft."""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--seq", type=int, default=2048)
ap.add_argument("--max-batch", type=int, default=16)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--window", type=int, default=256)
ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
ap.add_argument("--save-model", default="", help="also save the random-init model here (safetensors)")
ap.add_argument("--smoke", action="store_true",
                help="a tiny model on the CPU: checks the script itself on a machine without a GPU")
args = ap.parse_args()
dev = "cpu" if args.smoke else "cuda"

# DeepSeek-R1-Distill-Qwen-1.5B's config.json shapes.
shape = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2)
if args.smoke:
    shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    args.seq, args.max_batch, args.steps, args.warmup = 64, 2, 2, 1
cfg = Qwen2Config(**shape,
                  max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attn_implementation="sdpa", torch_dtype="bfloat16")
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg).to(device=dev, dtype=torch.bfloat16)
if args.save_model:
    model.save_pretrained(args.save_model, safe_serialization=True)
n_base = sum(p.numel() for p in model.parameters())
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                         target_modules=targets, task_type="CAUSAL_LM"))
# f32 LoRA master weights, as bft keeps them.
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
model.gradient_checkpointing_enable()
model.enable_input_require_grads()
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                        weight_decay=0.0, fused=not args.smoke)


def bft_loss(logits, labels, window):
    """BFT (DESIGN.md section 5): sum_b s_b * sum_t m p.detach() l / (n_b + 1e-8), over B."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = (labels != -100).float()
    l = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1),
                        reduction="none").view(labels.shape)
    p = torch.exp(-l).detach()
    n = mask.sum(1)
    # Lowest mean confidence over windows of `window` valid tokens (all valid here).
    w = min(window, labels.size(1))
    means = F.avg_pool1d(p.unsqueeze(1), w, stride=1).squeeze(1)
    s = (1 - means.min(1).values).clamp(0, 1).detach()
    return (s * (mask * p * l).sum(1) / (n + 1e-8)).mean()


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def step(batch):
    ids = torch.randint(0, cfg.vocab_size, (batch, args.seq), device=dev)
    out = model(input_ids=ids)
    loss = bft_loss(out.logits, ids, args.window)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


batch = args.max_batch
while batch >= 1:
    try:
        step(batch)
        sync()
        break
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        batch //= 2
if batch < 1:
    raise SystemExit("no batch fits")
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
times = []
for i in range(args.steps):
    sync()
    t0 = time.perf_counter()
    step(batch)
    sync()
    if i >= args.warmup:
        times.append(time.perf_counter() - t0)
tps = batch * args.seq / (sum(times) / len(times))
# Model FLOPs of a LoRA step with recomputation left out: forward 2N, backward through the
# frozen weights 2N (no weight gradients), per token; attention 12 * layers * seq * hidden.
flops_per_token = 4 * n_base + 12 * cfg.num_hidden_layers * args.seq * cfg.hidden_size
print(json.dumps({
    "impl": "hf+peft", "batch": batch, "seq": args.seq, "tokens_per_s": tps,
    "mfu": tps * flops_per_token / (args.peak_tflops * 1e12),
    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
    "torch": torch.__version__,
}))
