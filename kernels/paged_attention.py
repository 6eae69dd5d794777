"""Causal GQA attention of a flat token batch over the paged KV cache (prefill chunks and decode alike).

`paged_attention_ref` is the CPU execution path and the specification every Triton attention kernel is tested
against; `paged_prefill_attention` is the Triton kernel for batches with prompt chunks (design notes above
`_paged_prefill_attention_kernel`). Semantics:

- The batch is packed: sequence b's new tokens are rows query_start_loc[b]:query_start_loc[b+1] of `q`. They are
  the LAST q_len[b] tokens of a sequence of seq_lens[b] tokens; the first seq_lens[b] - q_len[b] (the context) were
  cached by earlier steps. The new tokens' own K/V must already be in the cache (the caller writes them first).
- Token i of sequence b lives at cache slot block_tables[b, i // BS] * BS + i % BS.
- Causal: the query at absolute position p attends keys 0..p of its own sequence.
- GQA: query head h reads KV head h // (Hq // Hkv).
- The cache holds K/V in q's dtype or FP8 E4M3; the values used are stored.float() * k_scale (v_scale), per tensor.
- Scores, softmax and the weighted sum of V are computed in fp32; the output has q's dtype.

Cache slots that no valid key maps to (padding of the block table, blocks of other sequences, never-written memory)
may hold anything, NaN included: they are masked out before they can reach the output.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import (check_paged_attention_args, interpreting, mma, split_head_dim, tile_blocks,
                                  to_f16_saturated)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        max_query_len: int, max_seq_len: int, scale: float,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """q [T, Hq, D]; k_cache, v_cache [NB, BS, Hkv, D]; query_start_loc [B+1] int32; seq_lens [B] int32;
    block_tables [B, MB] int32 -> out [T, Hq, D] in q's dtype.

    k_scale / v_scale dequantize the cache: the key (value) used is stored.float() * k_scale (v_scale). With an FP8
    E4M3 cache they are the checkpoint's per-tensor `self_attn.k_scale` / `v_scale`; with a bf16/fp16/fp32 cache 1.0.

    Vectorized over the batch: gather every sequence's K/V blocks into a padded [B, S, Hkv, D], pad the queries
    to [B, max_query_len, Hq, D], mask, attend, and scatter the valid rows back to the flat layout.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads  # query heads per KV head
    device = q.device
    out = q.new_zeros(num_tokens, num_heads, head_dim)  # [T, Hq, D]; rows no sequence owns stay zero
    if num_tokens == 0 or num_seqs == 0:
        return out

    starts = query_start_loc[:-1].long()                 # [B] first row of each sequence in the flat batch
    q_lens = query_start_loc[1:].long() - starts         # [B] new tokens per sequence
    seq_lens = seq_lens.long()                           # [B] cached + new
    ctx_lens = seq_lens - q_lens                         # [B] tokens cached before this step

    # Keys: position j of sequence b sits at row j % BS of block block_tables[b, j // BS]; whole blocks are
    # gathered (index_select over blocks is ~2x faster on the CPU than indexing slot by slot).
    blocks = -(-max_seq_len // block_size)
    span = blocks * block_size                                             # S
    tables = block_tables[:, :blocks].reshape(-1).long()                   # [B * S / BS]
    k_pos = torch.arange(span, device=device)                              # [S]
    key_valid = k_pos[None, :] < seq_lens[:, None]                         # [B, S]
    # Zero K and V outside each sequence: garbage there (even NaN) must not leak through a masked score or a
    # probability of 0. The gathered tensors are new, so this is in place.
    outside = ~key_valid[:, :, None, None]                                 # [B, S, 1, 1]
    k = k_cache.index_select(0, tables).view(num_seqs, span, num_kv_heads, head_dim)
    v = v_cache.index_select(0, tables).view(num_seqs, span, num_kv_heads, head_dim)
    k = k.float().masked_fill_(outside, 0.0).transpose(1, 2)               # [B, Hkv, S, D] fp32
    v = v.float().masked_fill_(outside, 0.0).transpose(1, 2)               # [B, Hkv, S, D] fp32

    # Queries: padded row i of sequence b is flat row starts[b] + i, when i < q_lens[b]. Each KV head's G query
    # heads are laid out as one sequence of G * Q rows, so one attention call covers the group (GQA).
    q_idx = torch.arange(max_query_len, device=device)                     # [Q]
    query_valid = q_idx[None, :] < q_lens[:, None]                         # [B, Q]
    rows = torch.where(query_valid, starts[:, None] + q_idx[None, :], 0)   # [B, Q] (padding reads row 0)
    q_pad = q[rows].float().view(num_seqs, max_query_len, num_kv_heads, group, head_dim)  # [B, Q, Hkv, G, D]
    q_rows = q_pad.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * max_query_len, head_dim)

    # Causal mask in absolute positions: query i of sequence b is at position ctx_lens[b] + i.
    q_pos = ctx_lens[:, None] + q_idx[None, :]                             # [B, Q]
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]  # [B, Q, S]
    allowed = allowed[:, None, None].expand(num_seqs, 1, group, max_query_len, span)
    allowed = allowed.reshape(num_seqs, 1, group * max_query_len, span)   # [B, 1, G * Q, S]

    # softmax(q k^T * scale * k_scale) (v * v_scale), the per-tensor scales folded into the score scale and the
    # output: one fused op instead of einsum / mask / softmax / einsum. A row with no allowed key at all (padding
    # of an empty sequence) comes out NaN; such rows are dropped below.
    out_rows = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=allowed,
                                              scale=scale * k_scale) * v_scale  # [B, Hkv, G * Q, D] fp32
    out_pad = out_rows.view(num_seqs, num_kv_heads, group, max_query_len, head_dim)
    out_pad = out_pad.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_query_len, num_heads, head_dim)  # [B, Q, Hq, D]

    out[rows[query_valid]] = out_pad[query_valid].to(q.dtype)              # [T_valid, Hq, D] back to flat rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton: paged_prefill_attention
#
# Grid (query tiles, KV heads). A program owns TILE_M consecutive new tokens of ONE sequence and ALL G query heads
# of one KV head: its BLOCK_R = TILE_M * G (+ padding) score rows are (token, head) pairs, row r = token r // G,
# head r % G, so each K/V tile is read once per GQA group and feeds one [BLOCK_R, BLOCK_N] tl.dot. TILE_M =
# BLOCK_R // G need not be a power of two (G = 6 -> 21 tokens = 126 of 128 rows; G = 12 -> 10 tokens = 120 rows).
#
# Tile -> sequence map, computed on the device with no host sync: sequence b's tiles start at program
# query_start_loc[b] // TILE_M + b. That is increasing in b and leaves room for all cdiv(q_len, TILE_M) tiles of b,
# so a binary search over query_start_loc finds a program's sequence; a program past its sequence's last tile exits.
# Grid size T // TILE_M + B: at most one idle program per sequence, instead of B * cdiv(max_query_len, TILE_M).
#
# Keys are visited in BLOCK_N tiles along the sequence, each key's slot looked up in the block table (so a tile
# spans BLOCK_N / BS cache blocks and any block size works); a tile's block numbers are loaded one tile ahead, which
# is what lets Triton keep K/V loads in flight while a tile is computed (`tile_blocks`). Tiles entirely at or before
# the tile's first query position need no causal mask; the rest, up to the last query position, are masked; later
# ones are skipped.
# KV_TMA (a launch option for the GPU sweep; no default uses it): where BLOCK_N divides the cache block size, an
# unmasked tile is one run of rows of one cache block, so K and V arrive as TMA boxes of the cache viewed as
# [NB * BS, Hkv * D] rows (one block-table read a tile instead of a gather of BLOCK_N pointers); the masked tiles
# keep the gathers, whose masks keep unwritten slots (NaN included) out.
# Online softmax in fp32 with exp2 (scale * k_scale * log2(e) folded into one multiplier, v_scale applied once at
# the end). head_dim D is split into a power-of-two head part BLOCK_DA and a tail BLOCK_DB (192 = 128 + 64), two dots
# per product instead of padding D to 256 (which would waste 25% of the MMA work and registers); D-axis masks cover
# dims that are not a sum of two powers of two. FP8 cache: K/V tiles load as e4m3 and convert to the dots' dtype,
# which is exact (every e4m3 value is an fp16/bf16/fp32 value), so the only difference from the ref is the fp32
# rounding of where the scales are multiplied in. With bf16 q the dots run in fp16 (FP16_DOTS: q converted once,
# saturating; P in fp16 keeps 3 more bits than in bf16), which saves the second conversion step per value.
# ----------------------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_kv_tile(acc_a, acc_b, m_i, l_i, q_a, q_b, q_pos, start_n, kv_end, blk,
                    k_ptr, v_ptr, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_TAIL: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    KV_TMA: tl.constexpr, k_desc_a, k_desc_b, v_desc_a, v_desc_b, head_col):
    """One online-softmax step of BLOCK_R score rows against keys start_n .. start_n + BLOCK_N - 1, whose cache
    blocks are blk ([BLOCK_N], loaded a tile ahead by the caller: `tile_blocks`).

    KV_TMA (tiles wholly inside one cache block and wholly valid: the unmasked loop with BLOCK_SIZE % BLOCK_N == 0):
    blk is that one block (a scalar), and K and V come as TMA boxes of the [NB * BS, Hkv * D] view of the cache, rows
    blk * BS + start_n % BS, columns head_col (+ BLOCK_DA for the tail, from the *_desc_b descriptors)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)                                  # [BLOCK_N] absolute key positions
    offs_da = tl.arange(0, BLOCK_DA)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    if KV_TMA:
        row = blk * BLOCK_SIZE + start_n % BLOCK_SIZE                        # first cache row of the tile
        k_a = k_desc_a.load([row, head_col]).to(q_a.dtype)                    # [BLOCK_N, BLOCK_DA]
    else:
        key_ok = offs_n < kv_end                                              # [BLOCK_N]
        in_blk = offs_n % BLOCK_SIZE                                          # [BLOCK_N]
        k_row = k_ptr + blk.to(tl.int64) * stride_kb + in_blk * stride_ks     # [BLOCK_N] pointers to each key
        v_row = v_ptr + blk.to(tl.int64) * stride_vb + in_blk * stride_vs     # [BLOCK_N]
        mask_a = key_ok[:, None] & (offs_da[None, :] < HEAD_DIM)              # [BLOCK_N, BLOCK_DA]
        mask_b = key_ok[:, None] & (offs_db[None, :] < HEAD_DIM)              # [BLOCK_N, BLOCK_DB]
        # Masked-off slots read 0, never the cache: they may hold NaN (or belong to another sequence).
        k_a = tl.load(k_row[:, None] + offs_da[None, :] * stride_kd, mask=mask_a, other=0.0).to(q_a.dtype)
    s = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    s = mma(q_a, tl.trans(k_a), s, UPCAST, DOT_PRECISION)                   # [BLOCK_R, BLOCK_N] fp32
    if HAS_TAIL:
        if KV_TMA:
            k_b = k_desc_b.load([row, head_col + BLOCK_DA]).to(q_b.dtype)     # [BLOCK_N, BLOCK_DB]
        else:
            k_b = tl.load(k_row[:, None] + offs_db[None, :] * stride_kd, mask=mask_b, other=0.0).to(q_b.dtype)
        s = mma(q_b, tl.trans(k_b), s, UPCAST, DOT_PRECISION)
    if CAUSAL_MASK:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))

    # qk_scale (> 0) goes into the row max and into exp2's argument as one FFMA per score, instead of scaling every
    # score first and subtracting the max after (an FMUL and an FADD). The compiled 15B tiles (sm_90, Triton 3.6)
    # went from 265 FMUL, 104 FADD and 36 FFMA to 205, 72 and 68, and from 2104 to 2040 instructions.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                          # [BLOCK_R] log2 units; m_i finite
    alpha = tl.exp2(m_i - m_new)                                              # rescales what was summed so far
    p = tl.exp2(s * qk_scale - m_new[:, None])                                # [BLOCK_R, BLOCK_N] fp32
    l_i = l_i * alpha + tl.sum(p, 1)

    if KV_TMA:
        v_a = v_desc_a.load([row, head_col]).to(q_a.dtype)                    # [BLOCK_N, BLOCK_DA]
    else:
        v_a = tl.load(v_row[:, None] + offs_da[None, :] * stride_vd, mask=mask_a, other=0.0).to(q_a.dtype)
    acc_a = acc_a * alpha[:, None]
    acc_a = mma(p.to(v_a.dtype), v_a, acc_a, UPCAST, DOT_PRECISION)          # [BLOCK_R, BLOCK_DA] fp32
    if HAS_TAIL:
        if KV_TMA:
            v_b = v_desc_b.load([row, head_col + BLOCK_DA]).to(q_b.dtype)     # [BLOCK_N, BLOCK_DB]
        else:
            v_b = tl.load(v_row[:, None] + offs_db[None, :] * stride_vd, mask=mask_b, other=0.0).to(q_b.dtype)
        acc_b = acc_b * alpha[:, None]
        acc_b = mma(p.to(v_b.dtype), v_b, acc_b, UPCAST, DOT_PRECISION)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _paged_prefill_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, k_desc_a, k_desc_b, v_desc_a, v_desc_b,
        num_seqs, qk_scale, v_scale,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
        stride_btb, stride_btn,
        GROUP: tl.constexpr, TILE_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
        HAS_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, REVERSE: tl.constexpr,
        KV_TMA: tl.constexpr, FP16_DOTS: tl.constexpr):
    # REVERSE: the last query tiles of a sequence (the most keys, under the causal mask) start first, so the short
    # ones fill the end of the launch instead of the long ones trailing it. Timed by the GPU sweep; off by default.
    tile_id = tl.num_programs(0) - 1 - tl.program_id(0) if REVERSE else tl.program_id(0)
    kv_head = tl.program_id(1)

    # Sequence of this program: the last b with query_start_loc[b] // TILE_M + b <= tile_id (see the map above).
    lo = tl.zeros((), tl.int32)
    hi = tl.zeros((), tl.int32) + num_seqs                  # the answer + 1 lies in (lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid).to(tl.int32) // TILE_M + mid
        go_right = first <= tile_id
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    tile_start = (tile_id - (q_start // TILE_M + seq)) * TILE_M   # first new token of this tile, within the sequence
    if tile_start >= q_len:
        return                                              # the (at most one) spare program of this sequence
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx_len = seq_len - q_len                               # tokens cached before this step

    # Score rows: (token, head) pairs of this tile and KV head.
    offs_r = tl.arange(0, BLOCK_R)
    tok = tile_start + offs_r // GROUP                      # [BLOCK_R] token index within the sequence's new tokens
    head = kv_head * GROUP + offs_r % GROUP                 # [BLOCK_R] query head
    row_ok = (offs_r < TILE_M * GROUP) & (tok < q_len)      # [BLOCK_R]
    q_pos = ctx_len + tok                                   # [BLOCK_R] absolute position (causal limit)
    q_row = q_ptr + (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh   # [BLOCK_R]
    o_row = out_ptr + (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh  # [BLOCK_R]

    offs_da = tl.arange(0, BLOCK_DA)
    q_mask_a = row_ok[:, None] & (offs_da[None, :] < HEAD_DIM)
    q_a = tl.load(q_row[:, None] + offs_da[None, :] * stride_qd, mask=q_mask_a, other=0.0)  # [BLOCK_R, BLOCK_DA]
    if FP16_DOTS:
        q_a = to_f16_saturated(q_a)     # FP8 cache, bf16 q: K, V and P follow q's dtype into fp16 dots
    acc_a = tl.zeros([BLOCK_R, BLOCK_DA], dtype=tl.float32)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    q_mask_b = row_ok[:, None] & (offs_db[None, :] < HEAD_DIM)
    if HAS_TAIL:
        q_b = tl.load(q_row[:, None] + offs_db[None, :] * stride_qd, mask=q_mask_b, other=0.0)  # [BLOCK_R, BLOCK_DB]
        if FP16_DOTS:
            q_b = to_f16_saturated(q_b)
    else:
        q_b = q_a                                           # placeholder, never read
    acc_b = tl.zeros([BLOCK_R, BLOCK_DB], dtype=tl.float32)
    # Finite start: a row that sees only masked scores in a tile keeps alpha = 1, p = 0 instead of NaN.
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    first_pos = ctx_len + tile_start                        # smallest query position of the tile
    kv_end = ctx_len + tl.minimum(tile_start + TILE_M, q_len)   # keys [0, kv_end) are all this tile may see
    # Keys below full_end are <= first_pos, so visible to every row: no causal mask there.
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    head_col = kv_head * HEAD_DIM                           # the head's first column in the [NB * BS, Hkv * D] view
    # The unmasked tiles: every key valid and visible to every row, so with KV_TMA each is a whole box of one cache
    # block. (Triton 3.6's Hopper warp specialization of this loop did not split off a producer at 8 warps and failed
    # to compile at 4, 2026-11-28: not offered.)
    # Each tile's cache blocks are loaded one tile ahead and carried. KV_TMA tiles lie in one cache block: one block
    # number a tile (a scalar).
    offs_key = tl.arange(0, BLOCK_N)
    first_loop_offs = 0 if KV_TMA else offs_key
    blk = tile_blocks(bt_row, stride_btn, 0, kv_end, first_loop_offs, BLOCK_SIZE)
    for start_n in range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        blk_next = tile_blocks(bt_row, stride_btn, start_n + BLOCK_N, kv_end, first_loop_offs, BLOCK_SIZE)
        acc_a, acc_b, m_i, l_i = _attend_kv_tile(
            acc_a, acc_b, m_i, l_i, q_a, q_b, q_pos, start_n, kv_end, blk,
            k_head, v_head, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_R, BLOCK_N, BLOCK_DA, BLOCK_DB, HAS_TAIL, False, DOT_PRECISION, UPCAST,
            KV_TMA, k_desc_a, k_desc_b, v_desc_a, v_desc_b, head_col)
        blk = blk_next
    # Loaded afresh rather than carried out of the first loop: carried, it cost the 15B tile 10 registers (204 vs 194)
    # and the 340B-TP8 one 8 (254 vs 246; sm_90, Triton 3.6).
    blk_masked = tile_blocks(bt_row, stride_btn, full_end, kv_end, offs_key, BLOCK_SIZE)
    for start_n in range(full_end, kv_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        blk_next = tile_blocks(bt_row, stride_btn, start_n + BLOCK_N, kv_end, offs_key, BLOCK_SIZE)
        acc_a, acc_b, m_i, l_i = _attend_kv_tile(
            acc_a, acc_b, m_i, l_i, q_a, q_b, q_pos, start_n, kv_end, blk_masked,
            k_head, v_head, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_R, BLOCK_N, BLOCK_DA, BLOCK_DB, HAS_TAIL, True, DOT_PRECISION, UPCAST,
            False, k_desc_a, k_desc_b, v_desc_a, v_desc_b, head_col)
        blk_masked = blk_next

    inv_l = v_scale / tl.where(l_i > 0.0, l_i, 1.0)        # [BLOCK_R]; padding rows have l = 0 and are not stored
    out_a = acc_a * inv_l[:, None]
    tl.store(o_row[:, None] + offs_da[None, :] * stride_od, out_a.to(out_ptr.dtype.element_ty), mask=q_mask_a)
    if HAS_TAIL:
        out_b = acc_b * inv_l[:, None]
        tl.store(o_row[:, None] + offs_db[None, :] * stride_od, out_b.to(out_ptr.dtype.element_ty), mask=q_mask_b)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _launch_config(head_dim: int, group: int, elem_bytes: int, fp8_cache: bool = False) -> dict:
    """BLOCK_R score rows (TILE_M tokens x G heads), BLOCK_N keys per tile, warps and pipeline stages for sm_90.

    Checked by compiling for sm_90 with the Triton wheel's ptxas, and timed on an H200 (2026-11-28: the sweep in
    benchmarks/gpu_sweep.py; these tiles reached about half of SDPA's speed, benchmarks/README.md, while every tile
    still waited for its own K/V loads: see tile_blocks). The K/V loads are gathers through the block table (no
    TMA), kept in flight by a ring of cp.async buffers: 3 stages give 3 buffers (BF16 cache) or 2 (FP8, converted
    in registers), waiting with one tile's copies outstanding. Compiled by Triton 3.6 for the model shapes (bf16 q,
    8 warps, 3 stages; tests/kernels/test_sm90_launches.py): D=128, 128 x 64 tiles, 194 registers and 128 KiB
    (BF16 cache) / 186-190 and 80 KiB (FP8); D=192, 128 x 64, 246-251 and 192 KiB (BF16); with an FP8 cache
    64 keys spilled, and 32 keys take 238 and 80 KiB. None spills. fp32 q (tests, not serving) takes the FMA-based
    ieee dot, no tensor cores: 32 x 16 tiles (16 x 16 above D=64) over 8 warps stay spill-free, FP8 cache included.
    """
    if elem_bytes >= 4:
        block_r, block_n, num_warps, num_stages = (32 if head_dim <= 64 else 16), 16, 8, 2
    elif head_dim > 128 and not fp8_cache:
        # H200 sweep (2026-11-28), 340B-TP8 rank, 4096 tokens, BF16 cache: 64 keys 0.293 ms against 0.372 with
        # 32 keys. With an FP8 cache 64 keys spill (above), so that stays at 32. 2, 3 and 4 stages timed the same
        # then because every tile waited for its own loads (see tile_blocks); with the block numbers loaded a tile
        # ahead, 3 stages keep one tile's K/V in flight (246 registers, 192 KiB of shared memory, no spills).
        block_r, block_n, num_warps, num_stages = 128, 64, 8, 3
    else:
        block_r, block_n, num_warps, num_stages = 128, (64 if head_dim <= 128 else 32), 8, 3
    block_r = max(block_r, triton.next_power_of_2(group))   # at least one token of all G heads per tile
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _check_prefill_args(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables) -> None:
    name = "paged_prefill_attention"
    check_paged_attention_args(name, q, k_cache, v_cache, query_start_loc=query_start_loc, seq_lens=seq_lens,
                               block_tables=block_tables)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if (query_start_loc.shape != (num_seqs + 1,) or block_tables.dim() != 2
            or block_tables.shape[0] != num_seqs):
        raise ValueError(f"{name}: need query_start_loc [B+1], seq_lens [B], block_tables [B, MB]; got "
                         f"{tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}, {tuple(block_tables.shape)}")
    for arg, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_tables", block_tables)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name}: {arg} must be int32 or int64, got {t.dtype}")


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, max_seq_len: int, scale: float,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Triton version of `paged_attention_ref` (same arguments, same result within the tolerances in
    tests/kernels/test_paged_prefill_attention.py). q [T, Hq, D] fp32/bf16/fp16; k_cache, v_cache [NB, BS, Hkv, D]
    in q's dtype or float8_e4m3fn (dequantized with k_scale / v_scale) -> out [T, Hq, D] in q's dtype.

    max_query_len and max_seq_len are accepted for signature parity; the kernel bounds each sequence on the device,
    so the launch needs no host sync and is CUDA-graph safe.
    """
    return _prefill_launch(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, k_scale, v_scale,
                           None)


def _prefill_launch(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, k_scale, v_scale,
                    cfg: dict | None) -> torch.Tensor:
    """The launch; for the GPU sweep in benchmarks/gpu_sweep.py, cfg overrides `_launch_config` (BLOCK_R, BLOCK_N,
    num_warps, num_stages, optionally REVERSE and KV_TMA, which takes effect where `_kv_tma_ready` holds)."""
    _check_prefill_args(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
    # The kernel reads query_start_loc and seq_lens at ptr + index (no stride): strided views would map programs to
    # the wrong rows (and past the end of q and out). No-ops when already contiguous; block_tables has its strides.
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    # Zeros, not empty: rows past query_start_loc[-1] (a padded batch) belong to no program and stay 0, as in the ref.
    out = torch.zeros_like(q)                                                # [T, Hq, D]
    # numel, not just T: with Hq = 0 the tile size below divides by group = 0, with D = 0 split_head_dim fails;
    # the ref returns the empty output for both.
    if out.numel() == 0 or num_seqs == 0:
        return out

    block_da, block_db = split_head_dim(head_dim)
    cfg = cfg or _launch_config(head_dim, group, q.element_size(), k_cache.dtype == torch.float8_e4m3fn)
    tile_m = cfg["BLOCK_R"] // group                                         # tokens per program
    grid = (num_tokens // tile_m + num_seqs, num_kv_heads)                   # >= sum_b cdiv(q_len_b, TILE_M)
    fp16_dots = k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16
    kv_tma = bool(cfg.get("KV_TMA", False)) and _kv_tma_ready(k_cache, v_cache, cfg["BLOCK_N"], block_da, block_db)
    descs = _kv_descriptors(k_cache, v_cache, cfg["BLOCK_N"], block_da, block_db) if kv_tma else (None,) * 4
    _paged_prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, *descs,
        num_seqs, float(scale) * float(k_scale) * _LOG2E, float(v_scale),
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        GROUP=group, TILE_M=tile_m, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DA=block_da, BLOCK_DB=max(block_db, 16),
        HAS_TAIL=block_db > 0, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and interpreting() and not fp16_dots,
        REVERSE=bool(cfg.get("REVERSE", False)), KV_TMA=kv_tma, FP16_DOTS=fp16_dots,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _kv_tma_ready(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int, block_da: int, block_db: int) -> bool:
    """Whether K/V tiles can be TMA boxes: every tile inside one cache block (BLOCK_N divides the block size); the
    head part and tail boxes cover the head exactly (a box wider than the head would read the next head's columns);
    the cache contiguous, so that [NB, BS, Hkv, D] views as [NB * BS, Hkv * D] rows, rows and base 16-byte aligned."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    return (block_size % block_n == 0 and head_dim == block_da + block_db
            and all(c.is_contiguous() and c.data_ptr() % 16 == 0 and (num_kv_heads * head_dim * c.element_size()) % 16 == 0
                    for c in (k_cache, v_cache)))


def _kv_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int, block_da: int, block_db: int):
    """(K head part, K tail, V head part, V tail) descriptors of the caches as [NB * BS, Hkv * D] rows; boxes of
    [BLOCK_N, BLOCK_DA] and [BLOCK_N, BLOCK_DB] (None without a tail)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    out = []
    for cache in (k_cache, v_cache):
        rows = cache.view(-1, cache.shape[2] * cache.shape[3])               # [NB * BS, Hkv * D]
        out.append(TensorDescriptor.from_tensor(rows, [block_n, block_da]))
        out.append(TensorDescriptor.from_tensor(rows, [block_n, block_db]) if block_db else None)
    return out[0], out[1], out[2], out[3]
