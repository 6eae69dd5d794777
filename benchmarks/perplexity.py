"""Held-out perplexity of a checkpoint as n4 serves it (weights, activation scheme and KV-cache dtype included),
for comparing quantization schemes on the same text.

    python benchmarks/perplexity.py --model models/demo [--kv-cache-dtype fp8] [--quantization fp8]

The held-out text is the held-out split of the demo model's pretraining corpus (training/demo/build_corpus.py:
CPython's documentation and stdlib docstrings, PSF licence, rebuilt here in a few seconds): documents the demo
model never trained on.
Perplexity = exp(mean negative log-likelihood) over every token of fixed-size windows but the first of each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)



def held_out_text() -> str:
    """The demo corpus's held-out documents, as build_corpus.py splits them (whole documents, by title hash)."""
    path = os.path.join(REPO, "training", "demo", "build_corpus.py")
    spec = importlib.util.spec_from_file_location("n4_demo_build_corpus", path)
    corpus = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = corpus  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(corpus)
    held_out = [text for title, text in corpus.build() if corpus.is_heldout(title, corpus.HELDOUT_PERCENT)]
    return "\n\n".join(held_out)


def perplexity(model: str, windows: int, window_len: int, kv_cache_dtype: str = "auto",
               quantization: str | None = None, dtype: str = "float32") -> dict:
    import sentencepiece

    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.sampling import SamplingParams

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(model, "tokenizer.model"))
    ids = sp.encode(held_out_text())
    if len(ids) < windows * window_len:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {windows} x {window_len}")
    config = EngineConfig(max_model_len=window_len + 1, num_kv_blocks=windows * (window_len // 16 + 2),
                          max_num_batched_tokens=4096, kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine.from_pretrained(model, config, dtype=dtype, quantization=quantization)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for w in range(windows):
        engine.add_request(f"w{w}", ids[w * window_len:(w + 1) * window_len], params)
    total, count = 0.0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            total -= sum(e.logprob for e in out.prompt_logprobs)
            count += len(out.prompt_logprobs)
    return {"model": model, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype, "tokens": count,
            "nll": total / count, "perplexity": math.exp(total / count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--quantization", default=None, choices=[None, "fp8"])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(json.dumps(perplexity(args.model, args.windows, args.window_len, args.kv_cache_dtype,
                                args.quantization, args.dtype)))


if __name__ == "__main__":
    main()
