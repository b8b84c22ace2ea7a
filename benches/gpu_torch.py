"""The PyTorch + PEFT peer of `device_check bench`: same config, random weights, shapes and work.

    python benches/gpu_torch.py CONFIG.json forward|lora-train|sft|dpo bf16|f32 BATCH SEQ ITERS
    python benches/gpu_torch.py peak          (the bf16 matmul rate MFU is measured against)

`sft` is a whole training step as `temper train` takes it: LoRA forward + backward, global-norm
clipping and AdamW. `dpo` is TRL's DPO step with a PEFT model: BATCH pairs, chosen and rejected
rows of SEQ tokens (the first SEQ/8 the prompt) through the policy with gradients and through the
reference (`disable_adapter()`) without, sigmoid loss with beta 0.1, clipping, AdamW.
"""
import sys
import time

import torch

if sys.argv[1] == "peak":
    # Median of 20 products of two random 8192x8192 bf16 matrices, timed with events.
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ts = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize()
        if i >= 5:
            ts.append(s.elapsed_time(e) / 1e3)
    ts.sort()
    print(f"bf16 matmul peak: {2 * 8192**3 / ts[len(ts) // 2] / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name()})")
    sys.exit(0)

from transformers import AutoConfig, AutoModelForCausalLM

path, mode, dtype, batch, seq, iters = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
config = AutoConfig.from_pretrained(path)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").cuda()
rows = 2 * batch if mode == "dpo" else batch
ids = torch.tensor([(i * 7919 + 13) % config.vocab_size for i in range(rows * seq)], device="cuda").reshape(rows, seq)
if mode in ("lora-train", "sft", "dpo"):
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
    elif mode == "dpo":
        # Sequence log-probs of the completions (tokens after the prompt), as TRL sums them.
        def logps(logits):
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            return lp[:, seq // 8 - 1:].sum(-1)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad(), model.disable_adapter():
                ref = logps(model(input_ids=ids).logits)
            pol = logps(model(input_ids=ids).logits)
        margin = (pol[:batch] - ref[:batch]) - (pol[batch:] - ref[batch:])
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        loss.backward()
        if i == 0:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        model.zero_grad(set_to_none=True)
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
print(f"pytorch {name:<14} {mode:<10} {str(dtype).split('.')[-1]:<5} {batch}x{seq}: {m:.4f} s/iter, {rows * seq / m:.0f} tokens/s,"
      f" peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
