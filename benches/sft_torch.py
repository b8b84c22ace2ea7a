"""The PyTorch + PEFT peer of `temper train` in benches/run-sft.sh: SmolLM2-135M (or $MODEL_DIR), LoRA
r=16 on all linear layers (or the comma-separated $TARGETS), AdamW, micro-batches of BATCH x SEQ tokens from the same JSONL, 2 threads.
$TORCH_DTYPE=bf16 loads the weights in bf16 (PEFT keeps the adapter in f32, its default
`autocast_adapter_dtype`), the fastest CPU setting on processors with AVX512-BF16.
Prints tokens/s (median step, first step excluded) and peak RSS."""
import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

data, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("TORCH_DTYPE", "f32")]
if os.environ.get("MODEL_DIR"):  # a Hugging Face directory (benches/run-moe.sh)
    model = AutoModelForCausalLM.from_pretrained(os.environ["MODEL_DIR"], dtype=DTYPE)
else:
    path = os.environ.get("TEMPER_SMOLLM2_GGUF", os.path.expanduser("~/.cache/temper/SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPE)
targets = os.environ.get("TARGETS", "all-linear")
targets = targets if targets == "all-linear" else targets.split(",")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
rows = [json.loads(line)["input_ids"] for line in open(data)]
times, tokens = [], 0
for step in range(steps):
    ids = torch.tensor(rows[step * batch:(step + 1) * batch])
    t = time.perf_counter()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step > 0:
        times.append(time.perf_counter() - t)
times.sort()
m = times[len(times) // 2]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"pytorch+peft {torch.__version__} ({os.environ.get('TORCH_DTYPE', 'f32')}): {ids.numel() / m:.0f} tokens/s (median step {m:.2f} s), peak RSS {rss:.0f} MiB")
