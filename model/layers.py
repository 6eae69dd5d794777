"""Nemotron-4 building blocks on a flat token batch: LayerNorm1P, partial RoPE, paged GQA attention, squared-ReLU
MLP and the pre-norm decoder layer. Every op runs through the layer's `KernelOps` (model/ops.py), so the same
modules run the plain-torch references or the Triton kernels; `transformers.NemotronForCausalLM` is the oracle."""
from __future__ import annotations

import torch
from torch import nn

from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from model.parallel import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model.ops import KernelOps, get_ops
from model.quant import LinearMethod


def params_dtype(config: ModelConfig) -> torch.dtype:
    return getattr(torch, config.torch_dtype)


class LayerNorm1P(nn.Module):
    """LayerNorm with bias whose scale is `weight + 1`: checkpoints store the scale zero-centred."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None,
                 ops: KernelOps | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.ops = ops or get_ops("torch")
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))  # [hidden], zero-centred scale
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype))    # [hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layernorm1p(x, self.weight, self.bias, self.eps)  # [T, hidden]


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half (NeoX) RoPE over the first `rotary_dim` dims of a head, for every position;
    the KV-write op (`ops.rope_kv_write`) looks them up by position and rotates q and k.

    inv_freq is spread over rotary_dim (not head_dim), as in HF's partial rotary: frequency i is
    theta ** (-2i / rotary_dim) for i < rotary_dim / 2. Tables are fp32, computed once at construction.
    """

    def __init__(self, rotary_dim: int, max_position: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))  # [R/2]
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [P, R/2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)                # [P, R/2] fp32
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)                # [P, R/2] fp32


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache: fused QKV -> RoPE fused with the cache write -> paged
    attention -> o_proj."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None, ops: KernelOps):
        super().__init__()
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.ops = ops
        # Per-tensor scales of an FP8 KV cache (dequantized = stored * scale); 1.0 for a bf16/fp16/fp32 cache.
        self.k_scale = 1.0
        self.v_scale = 1.0
        dtype = params_dtype(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, linear_method, dtype)
        # Head counts are this rank's (the projection's shard); with one rank they are the model's.
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        linear_method, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)                                       # [T, (Hq + 2 * Hkv) * D]
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)        # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]                  # [NB, BS, Hkv, D] each
        q = self.ops.rope_kv_write(q, k, v, positions, rotary.cos_cache, rotary.sin_cache, k_cache, v_cache,
                                   attn_metadata.slot_mapping, self.k_scale, self.v_scale)  # [T, Hq, D]
        out = self.ops.attention(q, k_cache, v_cache, attn_metadata, self.scale, self.k_scale,
                                 self.v_scale)                       # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, q_size))          # [T, hidden]


class MLP(nn.Module):
    """down_proj(relu(up_proj(x)) ** 2): no gate, no bias. The linear method runs it, so that it can fuse the
    activation (and, for FP8, the requantization) into the up-projection's epilogue."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None, ops: KernelOps):
        super().__init__()
        dtype = params_dtype(config)
        self.ops = ops
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, linear_method, dtype)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, linear_method, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method = self.up_proj.linear_method
        # The method runs down_proj's matmul itself (bypassing its forward), so the sum over ranks of the
        # row-parallel down projection is added here; a no-op at one rank.
        partial = method.squared_relu_mlp(self.up_proj, self.down_proj, x, self.ops)  # [T, hidden], this rank's
        return self.down_proj.reduce(partial)                                         # [T, hidden]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None, ops: KernelOps):
        super().__init__()
        dtype = params_dtype(config)
        self.input_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, dtype, ops)
        self.self_attn = Attention(config, linear_method, ops)
        self.post_attention_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, dtype, ops)
        self.mlp = MLP(config, linear_method, ops)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, attn_metadata)  # [T, hidden]
        return x + self.mlp(self.post_attention_layernorm(x))                                         # [T, hidden]
