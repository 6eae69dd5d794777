"""Paged GQA attention for decode steps: one new query token per sequence (flash-decoding).

Semantics (`paged_decode_attention_ref` is the specification):

- q [B, Hq, D] holds one query per sequence, at position seq_lens[b] - 1. It attends keys 0..seq_lens[b] - 1 of its
  own sequence; its own K/V are already in the cache (the caller writes them first).
- Token i of sequence b lives at cache slot block_tables[b, i // BS] * BS + i % BS of k_cache/v_cache
  [NB, BS, Hkv, D].
- GQA: query head h reads KV head h // (Hq // Hkv).
- The cache is dequantized as stored.float() * k_scale (keys) and stored.float() * v_scale (values). FP8 E4M3
  caches (torch.float8_e4m3fn) carry the per-tensor scales of the checkpoint; other caches normally keep 1.0.
- Scores, softmax and the weighted sum of V are computed in fp32; the output has q's dtype.
- A sequence with seq_lens[b] == 0 (a padding row) yields zeros rather than NaN.
- Cache slots that no valid key maps to may hold anything, NaN included; they never reach the output.

It is a decode-only special case of `kernels.paged_attention.paged_attention_ref` with query_start_loc = arange(B+1).

Kernel: two stages.
1. `_paged_decode_attention_kernel`, grid (B, Hkv, num_splits). A program owns one sequence, one KV head and one
   contiguous slice ("split") of the context. The G = Hq // Hkv query heads sharing that KV head are the M rows of
   both tl.dot calls (padded to BLOCK_G >= 16 rows with masks), so each K/V tile is read from HBM once per group,
   not once per query head. Tiles of BLOCK_N tokens (a multiple of the cache block size, so a tile is whole cache
   blocks) are gathered through the block table; the softmax is online, in fp32, in base 2. The program writes its
   partial (running max, running sum, unnormalized accumulator) to fp32 scratch; with a single split it writes the
   normalized output directly and stage 2 is skipped.
   An FP8 cache with bf16/fp16 q: both dots run in fp16. K converts in the MMA operand layout (it is read along
   head_dim, the cache's contiguous axis); V is read as int32 words and converted in registers before its trip
   through shared memory (`e4m3_words_to_f16`), because the operand layout reads V along the key axis: converted
   late, that is one byte per shared-memory load. The 15B kernel compiled for sm_90 by Triton 3.6 had 128 `LDS.U8`
   among 2176 SASS instructions; reading words it has none among 1680, and V takes transposing `ldmatrix` as a BF16
   V does (340B-TP8 rank: 64 `LDS.U8` before, none now).
   A head_dim that is not a power of two runs as two power-of-two parts (`split_head_dim`, as prefill does):
   192 = 128 + 64, each part its own loads and dots, rather than one part padded to 256. For the 340B-TP8 rank
   (sm_90, Triton 3.6, BF16 cache) that is 24 MMAs a tile instead of 32, 24 cp.async copies instead of 32 (masked
   columns were copied as zeros), and 992 SASS instructions instead of 1240 (FP8 cache: 1112 instead of 1240).
2. `_decode_reduce_kernel`, grid (B, Hq), merges the splits of one (sequence, head) with log-sum-exp rescaling.
   A split that holds no token of its sequence (short sequences in a long batch) has max -inf and sum 0 and gets
   weight exactly 0.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import (check_paged_attention_args, e4m3_words_to_f16, interpreting, mma, split_head_dim,
                                  tile_blocks, to_f16_saturated)

# SMs of an H100 SXM / H200; used when no CUDA device can be asked (the interpreter), so the split rule is the same.
_DEFAULT_SM_COUNT = 132
# Splits target two resident programs per SM: one program streaming K/V per SM leaves HBM bandwidth unused.
_PROGRAMS_PER_SM = 2
# At most this many programs an SM (what the split rule gives at small batch) take 3 stages whatever the default:
# each program's own next tile must be in flight, since no other program covers its waits, and 3 programs of the
# 15B BF16 tile at 3 stages (70 KiB of shared memory each, Triton 3.6) still fit an SM's 227 KiB.
_STAGED_PROGRAMS_PER_SM = 3
# A split below ~256 tokens spends too much of its time on the fixed cost per program (loading q, writing a partial
# of G * D fp32 that stage 2 reads back, filling the load pipeline) next to its K/V bytes (D=128 BF16: 128 KiB).
_MIN_SPLIT_TOKENS = 256
# Tokens per K/V tile: the tile (BLOCK_N x head_dim rounded up to a power of two) is capped at 8192 elements, 16 KiB
# per operand in 16-bit types, which keeps K, V, q and the accumulator in registers at 4 warps for every head_dim up
# to 256.
_TILE_ELEMENTS = 8192
_MAX_HEAD_DIM = 256


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int, scale: float,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [NB, BS, Hkv, D]; seq_lens [B] int32; block_tables [B, MB] int32
    -> out [B, Hq, D] in q's dtype.

    Vectorized over the batch: gather every sequence's first ceil(max_seq_len / BS) blocks into [B, S, Hkv, D],
    mask the positions at or beyond seq_lens[b], and attend in fp32.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads  # query heads per KV head
    blocks = -(-max_seq_len // block_size)
    span = blocks * block_size                                               # S: whole blocks
    valid = torch.arange(span, device=q.device)[None, :] < seq_lens.long()[:, None]  # [B, S]
    # Whole blocks gathered by index_select (one index per block, not per slot; 2x faster than advanced indexing
    # on the CPU): 2.0 -> 0.9 ms a layer on the CPU serving path (B 16, ~220 tokens, 8 query / 2 KV heads, 2
    # threads). The gathered tensors are new, so masking is in place.
    tables = block_tables[:, :blocks].reshape(-1).long()                     # [B * S / BS]
    k = k_cache.index_select(0, tables).view(num_seqs, span, num_kv_heads, head_dim)  # [B, S, Hkv, D]
    v = v_cache.index_select(0, tables).view(num_seqs, span, num_kv_heads, head_dim)  # [B, S, Hkv, D]
    # Zero K and V outside each sequence: garbage there (even NaN) must not leak through a masked score or a
    # probability of 0. Only the outside rows are written (a sequence's partial last block and the blocks past
    # its end), not the whole gathered tensor: masked_fill_ over [B, S, Hkv, D] cost as much as the gather itself
    # (78 us a tensor at B 16, S 256, 2 KV heads, D 64).
    k, v = k.float(), v.float()
    outside = (~valid).view(-1).nonzero().view(-1)                           # [rows outside] into B * S
    k.view(-1, num_kv_heads, head_dim).index_fill_(0, outside, 0.0)
    v.view(-1, num_kv_heads, head_dim).index_fill_(0, outside, 0.0)
    k, v = k.transpose(1, 2), v.transpose(1, 2)                              # [B, Hkv, S, D] fp32

    qg = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)          # [B, Hkv, G, D] fp32
    # softmax(q k^T * scale * k_scale) (v * v_scale): the per-tensor scales fold into the score scale and the
    # output. One fused op instead of einsum / mask / softmax / einsum: 1.5-2.3x faster on the CPU serving path
    # (B 16, S 256, 8 query / 2 KV heads: 2.7 -> 1.1 ms at 2 threads), where decode attention was 41% of a step.
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale * k_scale) * v_scale    # [B, Hkv, G, D] fp32
    # A sequence of length 0 has no key at all: its row is NaN; define its output as 0.
    out = out.masked_fill((seq_lens <= 0).view(num_seqs, 1, 1, 1), 0.0)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)            # [B, Hq, D]


@triton.jit
def _q_part(q_row, offs_d, g_mask, stride_qd, HEAD_DIM: tl.constexpr, FP16_DOTS: tl.constexpr):
    """Columns offs_d of the group's query rows: [BLOCK_G, len(offs_d)], 0 past HEAD_DIM and on padding rows."""
    q = tl.load(q_row[:, None] + offs_d[None, :] * stride_qd, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
                other=0.0)
    if FP16_DOTS:
        q = to_f16_saturated(q)   # FP8 cache, bf16 q: the dots run in fp16 (see to_f16_saturated)
    return q


@triton.jit
def _kv_part(head_ptr, slots, offs_d, tok_mask, stride_d, HEAD_DIM: tl.constexpr):
    """Columns offs_d of the tile's K or V rows as stored: [BLOCK_N, len(offs_d)]; masked-off tokens and columns
    past HEAD_DIM read 0, never the cache."""
    return tl.load(head_ptr + slots[:, None] + offs_d[None, :] * stride_d,
                   mask=tok_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _v_words_part(v_words, slots, tok_mask, FIRST: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ASM_CVT: tl.constexpr):
    """Columns FIRST .. FIRST + WIDTH of an FP8 V tile read as int32 words (4 values each) and converted to fp16 in
    registers, before the tile's trip through shared memory (see e4m3_words_to_f16): [BLOCK_N, WIDTH] fp16."""
    offs_w = FIRST // 4 + tl.arange(0, WIDTH // 4)
    words = tl.load(v_words + (slots // 4)[:, None] + offs_w[None, :],
                    mask=tok_mask[:, None] & (offs_w[None, :] < HEAD_DIM // 4), other=0)  # [BLOCK_N, WIDTH // 4]
    return tl.reshape(e4m3_words_to_f16(words, ASM_CVT), [slots.shape[0], WIDTH])


@triton.jit
def _store_part(rows_ptr, offs_d, values, g_mask, stride_d, HEAD_DIM: tl.constexpr):
    tl.store(rows_ptr[:, None] + offs_d[None, :] * stride_d, values.to(rows_ptr.dtype.element_ty),
             mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _paged_decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, seq_lens_ptr, block_tables_ptr,
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        qk_scale, v_scale, tokens_per_split,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_tb, stride_tn,
        stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
        HAS_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
        FP16_DOTS: tl.constexpr, V_WORDS: tl.constexpr, ASM_CVT: tl.constexpr):
    """Head dims in two parts, as in prefill (`split_head_dim`): columns [0, BLOCK_DA) and, with HAS_TAIL,
    [BLOCK_DA, BLOCK_DA + BLOCK_DB). Each dot runs once per part and the scores add up; 192 = 128 + 64 wastes no
    MMA work on padding, where one 256-wide part would do a third more. Without HAS_TAIL, BLOCK_DA covers the head
    (rounded up to a power of two) and the _b values are never used."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)  # start >= end: an empty split, the loop does not run

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, BLOCK_DA)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this KV head; rows >= GROUP are padding

    seq64 = seq.to(tl.int64)
    q_row = q_ptr + seq64 * stride_qb + heads * stride_qh                                   # [BLOCK_G]
    q_a = _q_part(q_row, offs_da, g_mask, stride_qd, HEAD_DIM, FP16_DOTS)                   # [BLOCK_G, BLOCK_DA]
    q_b = _q_part(q_row, offs_db, g_mask, stride_qd, HEAD_DIM, FP16_DOTS) if HAS_TAIL else q_a

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_G], tl.float32)                 # running sum of exp2(score - m_i)
    acc_a = tl.zeros([BLOCK_G, BLOCK_DA], tl.float32)     # running sum of p @ V (unnormalized), per part
    acc_b = tl.zeros([BLOCK_G, BLOCK_DB], tl.float32)

    table_row = block_tables_ptr + seq64 * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    # FP8 V as int32 words of 4 values (the launcher checked 4-byte alignment and stride_vd == 1).
    v_words = v_head.to(tl.pointer_type(tl.int32), bitcast=True) if V_WORDS else v_head
    # Block numbers are loaded a tile ahead (see tile_blocks: that is what lets the K/V loads pipeline). Masked lanes
    # read block 0 and then nothing: every K/V load below carries tok_mask.
    block = tile_blocks(table_row, stride_tn, start, end, offs_n, CACHE_BLOCK)      # [BLOCK_N] int32
    for tile_start in range(start, end, BLOCK_N):
        block_next = tile_blocks(table_row, stride_tn, tile_start + BLOCK_N, end, offs_n, CACHE_BLOCK)
        tok = tile_start + offs_n                          # [BLOCK_N] positions in the sequence
        tok_mask = tok < end
        slot_k = block.to(tl.int64) * stride_kb + (tok % CACHE_BLOCK) * stride_kt  # [BLOCK_N] int64
        slot_v = block.to(tl.int64) * stride_vb + (tok % CACHE_BLOCK) * stride_vt  # [BLOCK_N] int64

        # FP8 E4M3 converts exactly to bf16/fp16/fp32, so the dot sees the stored values; k_scale is in qk_scale.
        k_a = _kv_part(k_head, slot_k, offs_da, tok_mask, stride_kd, HEAD_DIM).to(q_a.dtype)  # [BLOCK_N, BLOCK_DA]
        s = mma(q_a, tl.trans(k_a), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), DOT_UPCAST, DOT_PRECISION)
        if HAS_TAIL:
            k_b = _kv_part(k_head, slot_k, offs_db, tok_mask, stride_kd, HEAD_DIM).to(q_b.dtype)
            s = mma(q_b, tl.trans(k_b), s, DOT_UPCAST, DOT_PRECISION)
        s = tl.where(tok_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N] fp32, log2 units

        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one valid token
        alpha = tl.exp2(m_i - m_new)           # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])        # [BLOCK_G, BLOCK_N]; 0 on masked tokens
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q_a.dtype)                    # the P @ V dots' operand

        if V_WORDS:
            v_a = _v_words_part(v_words, slot_v, tok_mask, 0, BLOCK_DA, HEAD_DIM, ASM_CVT)   # [BLOCK_N, BLOCK_DA]
        else:
            v_a = _kv_part(v_head, slot_v, offs_da, tok_mask, stride_vd, HEAD_DIM).to(q_a.dtype)
        acc_a = mma(p, v_a, acc_a * alpha[:, None], DOT_UPCAST, DOT_PRECISION)
        if HAS_TAIL:
            if V_WORDS:
                v_b = _v_words_part(v_words, slot_v, tok_mask, BLOCK_DA, BLOCK_DB, HEAD_DIM, ASM_CVT)
            else:
                v_b = _kv_part(v_head, slot_v, offs_db, tok_mask, stride_vd, HEAD_DIM).to(q_b.dtype)
            acc_b = mma(p, v_b, acc_b * alpha[:, None], DOT_UPCAST, DOT_PRECISION)
        m_i = m_new
        block = block_next

    if SINGLE_SPLIT:
        # The only split holds the whole sequence: normalize here and skip stage 2.
        inv_l = v_scale / tl.where(l_i > 0.0, l_i, 1.0)  # seq_len 0: acc is 0 and so is the output
        out_row = out_ptr + seq64 * stride_ob + heads * stride_oh                         # [BLOCK_G]
        _store_part(out_row, offs_da, acc_a * inv_l[:, None], g_mask, stride_od, HEAD_DIM)
        if HAS_TAIL:
            _store_part(out_row, offs_db, acc_b * inv_l[:, None], g_mask, stride_od, HEAD_DIM)
    else:
        # Scratch is contiguous: max/sum [B, Hq, num_splits], acc [B, Hq, num_splits, HEAD_DIM].
        rows = (seq64 * num_heads + heads) * num_splits + split  # [BLOCK_G] int64
        tl.store(part_max_ptr + rows, m_i, mask=g_mask)
        tl.store(part_sum_ptr + rows, l_i, mask=g_mask)
        _store_part(part_acc_ptr + rows * HEAD_DIM, offs_da, acc_a * v_scale, g_mask, 1, HEAD_DIM)
        if HAS_TAIL:
            _store_part(part_acc_ptr + rows * HEAD_DIM, offs_db, acc_b * v_scale, g_mask, 1, HEAD_DIM)


@triton.jit
def _decode_reduce_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_splits,
                          stride_ob, stride_oh, stride_od,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    first = (seq.to(tl.int64) * num_heads + head) * num_splits  # row of split 0 of this (sequence, head)

    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    m = tl.load(part_max_ptr + first + offs_s, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(part_sum_ptr + first + offs_s, mask=s_mask, other=0.0)            # [BLOCK_S]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty (seq_len 0): weights all 0
    total = tl.sum(tl.exp2(m - m_max) * l, 0)             # empty splits: exp2(-inf) * 0 = 0

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        weight = tl.exp2(tl.load(part_max_ptr + first + split) - m_max)
        acc += weight * tl.load(part_acc_ptr + (first + split) * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SM_COUNT


def _auto_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence: enough (B * Hkv * splits) programs for _PROGRAMS_PER_SM per SM, but no split shorter than
    _MIN_SPLIT_TOKENS. Big batches (B * Hkv >= 2 * SMs, e.g. 64 x 8 KV heads) get 1 split; 340B at TP8 (one KV head
    per rank), batch 64, context 4096 gets 5; one 15B sequence of 4096 tokens gets 16."""
    programs = num_seqs * num_kv_heads
    wanted = -(-_PROGRAMS_PER_SM * _sm_count(device) // programs)
    longest = -(-max_seq_len // _MIN_SPLIT_TOKENS)
    return max(1, min(wanted, longest))


def _check_inputs(q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, num_splits) -> None:
    name = "paged_decode_attention"
    check_paged_attention_args(name, q, k_cache, v_cache, seq_lens=seq_lens, block_tables=block_tables)
    num_seqs, head_dim, block_size = q.shape[0], q.shape[2], k_cache.shape[1]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim {head_dim} not supported (1..{_MAX_HEAD_DIM})")
    if block_size < 1 or block_size & (block_size - 1) or block_size > _TILE_ELEMENTS // 64:
        raise ValueError(f"{name}: block_size {block_size} must be a power of two <= {_TILE_ELEMENTS // 64}")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"{name}: seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"{name}: block_tables must be int32 [{num_seqs}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if max_seq_len < 0 or block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(f"{name}: max_seq_len {max_seq_len} must be >= 0 and fit the block table "
                         f"({block_tables.shape[1]} blocks of {block_size})")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{name}: num_splits must be >= 1 or None, got {num_splits}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int, scale: float,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `paged_decode_attention_ref`; seq_lens[b] must not exceed max_seq_len.

    num_splits: context splits per sequence; None picks them from the batch shape (see `_auto_num_splits`), which
    reads no device memory, so the launch stays CUDA-graph capturable for a fixed (B, max_seq_len).
    """
    return _decode_launch(q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, scale, k_scale, v_scale,
                          num_splits, None)


def _v_words_ready(q: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel can read an FP8 V cache as int32 words (4 values each) and convert them in registers: the
    dots run in fp16 (bf16 or fp16 q), whole words per head (head_dim % 4 == 0, the last stride 1) and every word
    4-byte aligned (the other strides and the base)."""
    return (v_cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16)
            and v_cache.shape[-1] % 4 == 0 and v_cache.stride(-1) == 1
            and all(st % 4 == 0 for st in v_cache.stride()[:-1]) and v_cache.data_ptr() % 4 == 0)


@dataclass(frozen=True)
class DecodeTiles:
    """Launch parameters of the split kernel: `default_decode_tiles` unless the GPU sweep (benchmarks/gpu_sweep.py)
    passes alternatives."""
    block_n: int          # keys per tile (at least the cache block size)
    num_warps: int
    num_stages: int
    v_words: bool | None = None  # FP8 V read as int32 words where `_v_words_ready`; False: per byte
    num_splits: int | None = None  # used when the launch's num_splits is None; None: `_auto_num_splits`
    split_head: bool | None = None  # head dims as split_head_dim's parts (192 = 128 + 64); False: one part
                                    # rounded up to a power of two (192 -> 256, the layout before the split)


def default_decode_tiles(head_dim: int, block_size: int, fp8_cache: bool) -> DecodeTiles:
    """Tiles of _TILE_ELEMENTS values: 64 keys for D <= 128, 32 for D = 192 / 256.

    FP8 caches at head_dim <= 128 take 2 warps: 15B, batch 64, context 4096 ran 0.273 ms against 0.35 with 4 (H200
    sweep, 2026-11-28, do_bench); the 340B-TP8 rank (head_dim 192) and BF16 caches were best at 4. With fp16 dots
    FP8 KV took 0.222 ms there against 0.250 for BF16 KV (GPU time in CUDA graphs, suite run 5; V was still read per
    byte then: the sweep times words and bytes side by side).

    Stages: with 2 the loop holds one tile's buffers and waits for each tile's loads after issuing them; 3 keeps
    one tile's K/V in flight while a tile is computed (see tile_blocks; the sweep's 3- and 4-stage rows before
    that change compiled to the same loop as 2). head_dim > 128 (the 340B-TP8 rank: one KV head, so the auto rule
    gives ~2.4 programs an SM at batch 64) takes 3: with so few programs a program's own loads must overlap, and
    the second buffer (55 KiB a program for BF16, Triton 3.6) costs no occupancy there. At head_dim 128 the 15B
    batches of 64 and more run 4 or more programs an SM, which 70 KiB a program would cut to 3: those stay at 2
    until the sweep has timed 3. Launches of at most _STAGED_PROGRAMS_PER_SM programs an SM (small batches: the
    split rule aims at 2) take 3 stages at any head_dim (`_decode_launch`)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return DecodeTiles(max(block_size, _TILE_ELEMENTS // block_d), 2 if fp8_cache and head_dim <= 128 else 4,
                       3 if head_dim > 128 else 2)


def _decode_launch(q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, scale, k_scale, v_scale,
                   num_splits: int | None, tiles: DecodeTiles | None) -> torch.Tensor:
    _check_inputs(q, k_cache, v_cache, seq_lens, block_tables, max_seq_len, num_splits)
    # The kernel reads seq_lens[b] at seq_lens_ptr + b (no stride): a strided view would give sequence b another
    # sequence's length. A no-op when already contiguous (block_tables is read through its strides).
    seq_lens = seq_lens.contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, D]
    if num_seqs == 0 or num_heads == 0:
        return out

    fp8_cache = k_cache.dtype == torch.float8_e4m3fn
    default_tiles = tiles is None
    tiles = tiles or default_decode_tiles(head_dim, block_size, fp8_cache)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_da, block_db = split_head_dim(head_dim) if tiles.split_head is not False else (block_d, 0)
    block_n, num_warps, num_stages = max(block_size, tiles.block_n), tiles.num_warps, tiles.num_stages
    v_words = _v_words_ready(q, v_cache) and tiles.v_words is not False
    if num_splits is None:
        num_splits = tiles.num_splits
    auto = num_splits is None
    if auto:
        num_splits = _auto_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
    # Splits are whole tiles, hence whole cache blocks. Rounding up can leave trailing splits that no sequence
    # reaches: an auto count drops them; a forced count keeps them (they run empty and get weight 0).
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    if auto:
        num_splits = max(1, triton.cdiv(max_seq_len, tokens_per_split))
    if default_tiles and num_seqs * num_kv_heads * num_splits <= _STAGED_PROGRAMS_PER_SM * _sm_count(q.device):
        num_stages = max(num_stages, 3)

    single = num_splits == 1
    part_shape = (num_seqs, num_heads, num_splits)
    part_max = torch.empty(part_shape if not single else (1,), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(part_shape + (head_dim,) if not single else (1,), dtype=torch.float32, device=q.device)

    _paged_decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables,
        out, part_acc, part_max, part_sum,
        float(scale) * float(k_scale) * math.log2(math.e), float(v_scale), tokens_per_split,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_DA=block_da,
        BLOCK_DB=max(block_db, 16), HAS_TAIL=block_db > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=interpreting() and q.dtype == torch.bfloat16 and not fp8_cache, SINGLE_SPLIT=single,
        FP16_DOTS=fp8_cache and q.dtype == torch.bfloat16, V_WORDS=v_words, ASM_CVT=not interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_acc, part_max, part_sum, out, num_splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4, num_stages=1)
    return out
