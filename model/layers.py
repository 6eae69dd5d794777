"""Nemotron-4 building blocks on a flat token batch: LayerNorm1P, partial RoPE, paged GQA attention, squared-ReLU
MLP and the pre-norm decoder layer. Numerics follow `transformers.NemotronForCausalLM` (the reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.kv_cache import write_kv_cache_ref
from kernels.paged_attention import paged_attention_ref
from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from model.parallel import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model.quant import LinearMethod


def params_dtype(config: ModelConfig) -> torch.dtype:
    return getattr(torch, config.torch_dtype)


class LayerNorm1P(nn.Module):
    """LayerNorm with bias whose scale is `weight + 1`: checkpoints store the scale zero-centred.

    Like HF, the `+ 1` and the normalization run in the input dtype (F.layer_norm accumulates its statistics in
    fp32 internally), so bf16 results match the reference bit for bit rather than being "more accurate".
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))  # [hidden], zero-centred scale
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype))    # [hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight + 1.0, self.bias, self.eps)  # [T, hidden]


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotate-half (NeoX) RoPE over the first `rotary_dim` dims of a head, for every position.

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

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cache[positions], self.sin_cache[positions]  # [T, R/2] each, fp32


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, R/2] -> [T, H, D] with dims [0, R) rotated and [R, D) passed through.

    Rotate-half pairs dim i with dim i + R/2. As in HF, cos/sin are cast to x's dtype and the products run in it.
    """
    half = cos.shape[-1]
    cos = cos[:, None, :].to(x.dtype)  # [T, 1, R/2]
    sin = sin[:, None, :].to(x.dtype)  # [T, 1, R/2]
    x1 = x[..., :half]                 # [T, H, R/2]
    x2 = x[..., half:2 * half]         # [T, H, R/2]
    rest = x[..., 2 * half:]           # [T, H, D - R]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)  # [T, H, D]


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache: fused QKV -> RoPE -> cache write -> attention -> o_proj."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None):
        super().__init__()
        # Head counts are per rank; with one rank they are the model's.
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        dtype = params_dtype(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                          linear_method, dtype)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size, linear_method, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)                                       # [T, (Hq + 2 * Hkv) * D]
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)        # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        q = apply_rotary(q, cos, sin)                                # [T, Hq, D]
        k = apply_rotary(k, cos, sin)                                # [T, Hkv, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]                  # [NB, BS, Hkv, D] each
        write_kv_cache_ref(k, v, k_cache, v_cache, attn_metadata.slot_mapping)
        out = paged_attention_ref(q, k_cache, v_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                  attn_metadata.block_tables, attn_metadata.max_query_len,
                                  attn_metadata.max_seq_len, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, q_size))          # [T, hidden]


class MLP(nn.Module):
    """down_proj(relu(up_proj(x)) ** 2): no gate, no bias."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None):
        super().__init__()
        dtype = params_dtype(config)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, linear_method, dtype)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, linear_method, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up_proj(x)).square()  # [T, intermediate]
        return self.down_proj(h)                  # [T, hidden]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None):
        super().__init__()
        dtype = params_dtype(config)
        self.input_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, dtype)
        self.self_attn = Attention(config, linear_method)
        self.post_attention_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, dtype)
        self.mlp = MLP(config, linear_method)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_metadata)  # [T, hidden]
        return x + self.mlp(self.post_attention_layernorm(x))                                # [T, hidden]
