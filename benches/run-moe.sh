#!/usr/bin/env bash
# A mixture of experts' LoRA SFT step on the CPU: `temper train` beside PyTorch + PEFT doing the
# same work in one command. The model is a random Qwen3-MoE of a small but realistic shape
# (hidden 512, 4 layers, 8 experts, top-2, expert size 1024, vocabulary 32000) written by
# transformers; LoRA r=16 on the attention projections; micro-batch BATCH x 256 tokens.
# Both compute only the experts each token is routed to (Temper: per expert, its tokens).
#   benches/run-moe.sh [BATCH STEPS]      (PyTorch, transformers and PEFT from $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-4}; STEPS=${2:-6}
PYTHON=${PYTHON:-python3}
TEMPER=${TEMPER:-target/release/temper}
[ "$TEMPER" = target/release/temper ] && cargo build --release >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
"$PYTHON" - "$WORK" "$BATCH" "$STEPS" <<'PY' 2>/dev/null
import json, random, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
work, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=1024, norm_topk_prob=True,
                     max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
model = Qwen3MoeForCausalLM(cfg)
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.normal_(0, 0.05)  # routers start at zero: spread the tokens
model.save_pretrained(work + "/model")
vocab = {f"w{i}": i for i in range(32000)}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(work + "/model/tokenizer.json")
json.dump({"bos_token": "w1", "eos_token": "w2"}, open(work + "/model/tokenizer_config.json", "w"))
r = random.Random(0)
with open(work + "/rows.jsonl", "w") as f:
    for _ in range(batch * steps):
        f.write(json.dumps({"input_ids": [r.randrange(100, 31900) for _ in range(256)]}) + "\n")
PY
cat > "$WORK/job.yaml" <<YAML
model:
  path: $WORK/model
adapter:
  r: 16
  lora_alpha: 32
  target_modules: [q_proj, k_proj, v_proj, o_proj]
data:
  path: $WORK/rows.jsonl
  shuffle: false
  max_length: 256
training:
  learning_rate: 1.0e-4
  lr_scheduler: constant
  precision: f32
  micro_batch_size: $BATCH
  max_steps: $STEPS
output_dir: $WORK/out
YAML
/usr/bin/time -f "%M" -o "$WORK/rss" "$TEMPER" train "$WORK/job.yaml" 2>/dev/null
"$PYTHON" - "$WORK" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/out/metrics.jsonl")][1:]
rate = statistics.median(r["tokens_per_second"] for r in rows)
rss = int(open(sys.argv[1] + "/rss").read().split()[-1]) / 1024
print(f"temper (ndarray): {rate:.0f} tokens/s (median step, first excluded), peak RSS {rss:.0f} MiB")
PY
MODEL_DIR="$WORK/model" TARGETS=q_proj,k_proj,v_proj,o_proj "$PYTHON" benches/sft_torch.py "$WORK/rows.jsonl" "$BATCH" "$STEPS" 2>/dev/null
