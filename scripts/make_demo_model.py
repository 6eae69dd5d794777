"""Writes the embedded demo checkpoint `models/demo/` (config.json + model.safetensors; tokenizer.model comes
from scripts/train_demo_tokenizer.py). The weights are RANDOM (seeded) until the training package produces a
trained demo model: the demo exercises the whole serving path, not language quality.

    python scripts/make_demo_model.py [--output models/demo]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

from model.config import ModelConfig

DEMO = ModelConfig(vocab_size=4096, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                   torch_dtype="bfloat16")


def hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "model.norm.weight": (c.hidden_size,), "model.norm.bias": (c.hidden_size,),
              "lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + norm + ".weight"] = (c.hidden_size,)
            shapes[p + norm + ".bias"] = (c.hidden_size,)
        shapes[p + "self_attn.q_proj.weight"] = (c.num_attention_heads * c.head_dim, c.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (c.num_key_value_heads * c.head_dim, c.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (c.num_key_value_heads * c.head_dim, c.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, c.num_attention_heads * c.head_dim)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


def random_weights(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c.torch_dtype)
    tensors = {}
    for name, shape in hf_shapes(c).items():
        if "norm" in name:  # LayerNorm1P stores weight - 1: zeros are the identity scale
            tensors[name] = torch.zeros(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "models", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    save_file(random_weights(DEMO, args.seed), os.path.join(args.output, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump(DEMO.to_hf(), f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
