"""The peer of `temper train` in benches/run-grpo.sh: TRL's GRPOTrainer (transformers generation,
no vLLM) on the CPU with the settings of benches/configs/grpo-bench.yaml: SmolLM2-135M from the
same GGUF, LoRA r=16 on all linear layers, the arithmetic prompts, 8 completions per prompt of at
most 48 tokens at temperature 0.7, 16 completions per micro-batch, 2 micro-batches per step,
rewards `accuracy` (last number = the answer) and `format` (starts with `A + B = C`), 2 threads.
Prints the median step time (first step excluded), the generated tokens per second over the
same steps, and peak RSS.
    python benches/grpo_trl.py PROMPTS.jsonl STEPS"""
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

data, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
path = os.environ.get("TEMPER_SMOLLM2_GGUF", os.path.expanduser("~/.cache/temper/SmolLM2-135M-Instruct.Q4_1.gguf"))
folder, name = os.path.split(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
# transformers dequantizes a GGUF file's weights to `dtype` on load but leaves the model marked
# as GGUF-quantized, and Trainer refuses to train such a model: the weights are plain f32 here.
model.hf_quantizer = None
model.is_quantized = False
rows = [json.loads(line) for line in open(data)]


def last_number(text):
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return found[-1].replace(",", "") if found else None


def accuracy(completions, answer, **kwargs):
    return [float(last_number(c[0]["content"]) == a) for c, a in zip(completions, answer)]


def format_(completions, **kwargs):
    return [float(re.match(r"^\s*\d+\s*\+\s*\d+\s*=\s*\d+", c[0]["content"]) is not None) for c in completions]


class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


clock = Clock()
with tempfile.TemporaryDirectory() as out:
    args = GRPOConfig(
        output_dir=out, report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, num_generations=8, max_completion_length=48, temperature=0.7,
        learning_rate=1e-4, lr_scheduler_type="constant", max_steps=steps, logging_steps=1, seed=0,
        gradient_checkpointing=False, reward_weights=[1.0, 0.5], dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[accuracy, format_], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[clock],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
generated = [h["completions/mean_length"] * 32 for h in logs][1:]
times = clock.times[1:]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"TRL GRPOTrainer: {statistics.median(times):.1f} s per step (median, first excluded), "
      f"{sum(generated) / sum(times):.0f} generated tokens/s of step time, "
      f"mean completion {statistics.mean(h['completions/mean_length'] for h in logs):.1f} tokens, "
      f"peak RSS {rss:.0f} MiB")
