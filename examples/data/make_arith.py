"""Small conversational datasets with a strict answer format: each assistant turn shows the sum
and ends with `#### <answer>` (GSM8K's final-answer line). SmolLM2-135M-Instruct does not answer
this way before training, so the format (and the arithmetic) is a visible, measurable effect.

Also preference pairs for DPO on the same questions: the chosen answer states the right sum,
the rejected one a near miss (off by 1 or 10, or digits swapped), so DPO's effect is checkable:
the share of greedy answers with the right sum.

python make_arith.py  ->  arith_train.jsonl (400 rows), arith_test.jsonl (50 rows),
                          arith_pref_train.jsonl (400 pairs), arith_pref_test.jsonl (50 pairs),
                          arith_prompts_train.jsonl (400 prompts), arith_prompts_test.jsonl (50)
"""

import json
import random

rng = random.Random(0)
phrasings = [
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} plus {b}.",
    "How much is {a} + {b}?",
    "Please sum {a} and {b}.",
]


def row():
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = rng.choice(phrasings).format(a=a, b=b)
    return {
        "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}.\n#### {a + b}"},
        ]
    }


seen = set()
rows = []
while len(rows) < 450:
    r = row()
    key = r["messages"][0]["content"]
    if key not in seen:
        seen.add(key)
        rows.append(r)
for name, part in [("arith_train.jsonl", rows[:400]), ("arith_test.jsonl", rows[400:])]:
    with open(name, "w") as f:
        for r in part:
            f.write(json.dumps(r) + "\n")


def near_miss(a, b):
    c = a + b
    options = [c + 1, c - 1, c + 10, c - 10, int(str(c)[::-1])]
    return rng.choice([o for o in options if o != c and o > 0])


for name, part in [("arith_pref_train.jsonl", rows[:400]), ("arith_pref_test.jsonl", rows[400:])]:
    with open(name, "w") as f:
        for r in part:
            q = r["messages"][0]["content"]
            a, b = (int(x) for x in r["messages"][1]["content"].split(" = ")[0].split(" + "))
            pair = {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {near_miss(a, b)}."}],
            }
            f.write(json.dumps(pair) + "\n")


# Prompts for GRPO: the question alone (the policy writes the answers) and the sum, which the
# `accuracy` reward compares with each completion's final answer.
for name, part in [("arith_prompts_train.jsonl", rows[:400]), ("arith_prompts_test.jsonl", rows[400:])]:
    with open(name, "w") as f:
        for r in part:
            q = r["messages"][0]["content"]
            answer = r["messages"][1]["content"].split("#### ")[1]
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": answer}) + "\n")
