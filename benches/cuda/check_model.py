"""Writes a random-init Qwen2 (bf16 safetensors, HF layout) for the GPU check, with SmolLM2's
tokenizer and chat template (its ids fit either vocabulary):

    check_model.py tiny DIR TOK   # 2 layers, hidden 128, 4/2 heads of 64: the CPU-vs-CUDA check
    check_model.py 1.5b DIR TOK   # DeepSeek-R1-Distill-Qwen-1.5B's shapes: the throughput row

Initialised on the GPU when there is one (seconds for 1.5B parameters), on the CPU otherwise."""
import shutil
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

size, out, tok = sys.argv[1], sys.argv[2], sys.argv[3]
shapes = {
    "tiny": dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
cfg = Qwen2Config(**shapes[size], max_position_embeddings=32768, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{tok}/{f}", f"{out}/{f}")
print(f"{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {out}")
