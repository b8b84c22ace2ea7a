"""The PyTorch + PEFT peer of `device_check bench`: same config, random weights, shapes and work.

    python benches/gpu_torch.py CONFIG.json forward|lora-train|sft bf16|f32 BATCH SEQ ITERS

`sft` is a whole training step as `temper train` takes it: LoRA forward + backward, global-norm
clipping and AdamW.
"""
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

path, mode, dtype, batch, seq, iters = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
config = AutoConfig.from_pretrained(path)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").cuda()
ids = torch.tensor([(i * 7919 + 13) % config.vocab_size for i in range(batch * seq)], device="cuda").reshape(batch, seq)
if mode in ("lora-train", "sft"):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    # f32 adapters on a bf16 base, as Temper does.
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
torch.cuda.reset_peak_memory_stats()
times = []
for i in range(iters + 1):
    torch.cuda.synchronize()
    t = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            model(input_ids=ids).logits
    else:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if mode == "sft":
            if i == 0:
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if i > 0:
        times.append(time.perf_counter() - t)
times.sort()
m = times[len(times) // 2]
name = path.rsplit("/", 1)[-1].removesuffix(".json")
print(f"pytorch {name:<14} {mode:<10} {str(dtype).split('.')[-1]:<5} {batch}x{seq}: {m:.4f} s/iter, {batch * seq / m:.0f} tokens/s,"
      f" peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
