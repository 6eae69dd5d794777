"""Nemotron-4 for training: dense causal attention over packed rows, autograd end to end.

The serving model (model/nemotron.py) runs a flat token batch against a paged KV cache through inference
kernels; training needs a batch of rows [B, S] and gradients, so this file holds the same architecture in
~150 lines of plain torch. Parameter names are exactly HF's (`model.layers.N.self_attn.q_proj.weight`, ...), so
`state_dict()` is an HF checkpoint and an HF checkpoint loads with `load_state_dict`. The numerics are tested
against `transformers.NemotronForCausalLM` and, after export, against `n4 serve` (training/tests).

Packed rows: several documents share one row of S tokens. `segment_ids` [B, S] (0 for padding) restricts
attention to the token's own document, and `position_ids` restart at 0 at each document start, so a packed
document sees exactly what it would see alone (and what it will see when served).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from n4_train.precision import Precision


class LayerNorm1P(nn.Module):
    """LayerNorm whose scale is stored zero-centred (`weight + 1`), with bias; computed in fp32."""

    def __init__(self, hidden_size: int, eps: float, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size, device=device))  # [H], zero-centred
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device))    # [H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float() + 1.0, self.bias.float(), self.eps)
        return y.to(x.dtype)


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, 1, S, rotary_dim] fp32 (rotate-half layout: the half-table repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim)
    freqs = position_ids.float()[..., None] * inv_freq          # [B, S, R/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]          # [B, 1, S, R]
    return angles.cos(), angles.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]: rotate the first R dims (rotate-half / NeoX), pass the rest through."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin   # [B, H, S, R] fp32
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, S] -> bool [B, 1, S, S]: causal and within the same document. Padding (segment 0) attends
    to itself only, so no row is fully masked (which would give NaN) and its outputs are ignored by the losses."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]        # [B, S, S]
    return (same & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, precision: Precision):
        super().__init__()
        self.config = config
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = precision.linear(hidden, config.num_attention_heads * d)
        self.k_proj = precision.linear(hidden, config.num_key_value_heads * d)
        self.v_proj = precision.linear(hidden, config.num_key_value_heads * d)
        self.o_proj = precision.linear(config.num_attention_heads * d, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        c = self.config
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, c.num_attention_heads, c.head_dim).transpose(1, 2)   # [B, Hq, S, D]
        k = self.k_proj(x).view(batch, seq, c.num_key_value_heads, c.head_dim).transpose(1, 2)   # [B, Hkv, S, D]
        v = self.v_proj(x).view(batch, seq, c.num_key_value_heads, c.head_dim).transpose(1, 2)   # [B, Hkv, S, D]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        v = v.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=True)                                    # [B, Hq, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))                         # [B, S, hidden]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, precision: Precision):
        super().__init__()
        self.up_proj = precision.linear(config.hidden_size, config.intermediate_size)
        self.down_proj = precision.linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())  # [B, S, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, precision: Precision):
        super().__init__()
        self.input_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, precision.device)
        self.self_attn = Attention(config, precision)
        self.post_attention_layernorm = LayerNorm1P(config.hidden_size, config.norm_eps, precision.device)
        self.mlp = MLP(config, precision)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, precision: Precision):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=precision.device)
        self.layers = nn.ModuleList(DecoderLayer(config, precision) for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm1P(config.hidden_size, config.norm_eps, precision.device)


class TrainableNemotron(nn.Module):
    """The causal LM (lm_head [vocab, hidden]) or, when `config.num_labels` > 0, the Nemotron-4-340B-Reward layout
    (lm_head [num_labels, hidden], read at each sequence's last token)."""

    def __init__(self, config: ModelConfig, precision: Precision):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.model = Backbone(config, precision)
        head_out = config.num_labels if config.is_reward else config.vocab_size
        # The reward head stays a plain fp32 nn.Linear: 9 outputs is below TE's FP8 GEMM alignment (16), and its
        # cost is nil.
        self.lm_head = (nn.Linear(config.hidden_size, head_out, bias=False, device=precision.device)
                        if config.is_reward else precision.linear(config.hidden_size, head_out))

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> final-norm hidden states [B, S, hidden]. Without segment_ids every row is one
        causal sequence; without position_ids positions count from 0 along the row."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        mask = None if segment_ids is None else attention_mask(segment_ids)
        x = self.model.embed_tokens(input_ids)                        # [B, S, hidden]
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its activations in the backward pass (~1/3 more
                # compute for activation memory that no longer grows with the layer's internals).
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)                                     # [B, S, hidden]

    def forward(self, input_ids, position_ids=None, segment_ids=None) -> torch.Tensor:
        """-> logits [B, S, vocab] fp32 (causal LM) or head values [B, S, num_labels] fp32 (reward model)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, segment_ids)).float()

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random init for pretraining from scratch: N(0, std) for embeddings and projections, with the two
        projections that write into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * layers) so the
        residual's variance does not grow with depth (GPT-2 / Megatron practice); LayerNorm1P scale 1, bias 0."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.zero_()
                else:
                    scale = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under their HF checkpoint names (transformer-engine's `_extra_state` entries left out)."""
        return {name: param.detach() for name, param in self.named_parameters()}
