"""The PyTorch peer of benches/forward.rs: the same GGUF, inputs and work, 2 threads."""
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

mode, batch, seq, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
path = os.environ.get("TEMPER_SMOLLM2_GGUF", os.path.expanduser("~/.cache/temper/SmolLM2-135M-Instruct.Q4_1.gguf"))
folder, name = os.path.split(path)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
if mode == "lora-train":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
ids = torch.tensor([(i * 7919 + 13) % 49152 for i in range(batch * seq)]).reshape(batch, seq)
times = []
for i in range(iters + 1):
    t = time.perf_counter()
    if mode == "forward":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids).logits.sum().item()
    else:
        model.train()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
    if i > 0:
        times.append(time.perf_counter() - t)
times.sort()
m = times[len(times) // 2]
print(f"pytorch {torch.__version__:<12} {mode:<8} batch {batch} x {seq}: median {m:.3f} s/iter, {batch * seq / m:.0f} tokens/s")
