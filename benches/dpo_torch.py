"""The PyTorch + PEFT peer of `temper train` in benches/run-dpo.sh: one DPO step as TRL's
DPOTrainer does it with a PEFT model (policy forward + backward over chosen and rejected rows
padded together, and the reference forward with the adapter disabled, without gradients),
SmolLM2-135M, LoRA r=16 on all linear layers, AdamW, PAIRS pairs per step, 2 threads. Pairs are
tokenized as DPOTrainer does (prompt ids, completion ids + EOS). Prints tokens/s (real tokens of
the median step, first step excluded) and peak RSS. $TORCH_DTYPE=bf16 loads the weights in bf16
(PEFT keeps the adapter in f32)."""
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

data, pairs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
path = os.environ.get("TEMPER_SMOLLM2_GGUF", os.path.expanduser("~/.cache/temper/SmolLM2-135M-Instruct.Q4_1.gguf"))
folder, name = os.path.split(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
DTYPE_NAME = os.environ.get("TORCH_DTYPE", "f32")
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[DTYPE_NAME])
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
rows = [json.loads(line) for line in open(data)]


def collate(batch):
    seqs = []
    for side in ("chosen", "rejected"):
        for r in batch:
            prompt = tok(r["prompt"]).input_ids
            completion = tok(r[side]).input_ids + [tok.eos_token_id]
            seqs.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
    comp = torch.tensor([m + [0] * (width - len(m)) for _, m in seqs])
    return ids, attn, comp


def logps(ids, attn, comp):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    per_token = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (per_token * comp[:, 1:]).sum(1)


times, counts = [], []
for step in range(steps):
    ids, attn, comp = collate(rows[step * pairs:(step + 1) * pairs])
    t = time.perf_counter()
    policy = logps(ids, attn, comp)
    with torch.no_grad(), model.disable_adapter():
        reference = logps(ids, attn, comp)
    ratios = policy - reference
    loss = -F.logsigmoid(0.1 * (ratios[:pairs] - ratios[pairs:])).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step > 0:
        times.append((time.perf_counter() - t, int(attn.sum())))
times.sort()
m, n = times[len(times) // 2]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"pytorch+peft {torch.__version__} ({DTYPE_NAME}): {n / m:.0f} tokens/s (median step {m:.2f} s), peak RSS {rss:.0f} MiB")
