"""Small builders shared by the training tests: the demo tokenizer, tiny architectures over its vocabulary, and
synthetic datasets whose right answers are known."""
from __future__ import annotations

import json
import os
import random

from model.config import ModelConfig

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEMO = os.path.join(REPO, "models", "demo")
# A tiny architecture over the demo tokenizer's 4096 tokens: GQA 2:1, partial rotary, head_dim 16.
TINY = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   torch_dtype="float32")

WORDS = ("list tuple dict set string number value function class module method object file name type error "
         "loop index key item line code data text call return import").split()


def write_config(path: str, config: ModelConfig = TINY) -> str:
    with open(path, "w") as f:
        json.dump(config.to_hf(), f)
    return path


def write_jsonl(path: str, records) -> str:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def text_corpus(path: str, documents: int, seed: int) -> str:
    """Documents of a tiny regular language (a word sequence, repeated), each ending with an <|endoftext|> line:
    learnable in a few dozen steps, so a falling loss means the loop works."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(words + words + words))
    with open(path, "w") as f:
        f.write("".join(doc + "\n<|endoftext|>\n" for doc in docs))
    return path


def chat_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = rng.choice(WORDS)
        records.append({"messages": [{"role": "user", "content": f"{word}: say it twice."},
                                     {"role": "assistant", "content": f"{word} {word}"}]})
    return records


# Reward-model rows whose five attributes are known functions of the response: the first four are 4 x the
# fraction of the response's words drawn from word class i (a fifth class is filler), verbosity grows with the
# number of words (4 to 24 -> 0 to 4). The prompt varies but carries no signal.
ATTRIBUTE_WORDS = (("yes", "sure", "here"), ("true", "right", "exact"), ("then", "so", "thus"),
                   ("module", "function", "method"))
FILLER = ("the", "a", "of", "and", "to", "in")


def helpsteer_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        weights = [rng.random() ** 2 for _ in range(5)]
        n = rng.randint(4, 24)
        classes = rng.choices(range(5), weights=weights, k=n)
        words = [rng.choice(FILLER if c == 4 else ATTRIBUTE_WORDS[c]) for c in classes]
        record = {"prompt": f"Tell me about {rng.choice(WORDS)}.", "response": " ".join(words)}
        for i, name in enumerate(("helpfulness", "correctness", "coherence", "complexity")):
            record[name] = round(4 * classes.count(i) / n, 3)
        record["verbosity"] = round(4 * (n - 4) / 20, 3)
        records.append(record)
    return records
