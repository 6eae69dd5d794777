"""The shared Triton helpers of kernels/triton_utils.py, under the interpreter (their compiled forms are covered by
the kernels that use them: tests/kernels/test_sm90_launches.py and the GPU tests)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import triton_utils
from kernels.decode_attention import paged_decode_attention
from kernels.paged_attention import paged_prefill_attention
from kernels.triton_utils import e4m3_words_to_f16

FP8 = torch.float8_e4m3fn


@triton.jit
def _words_to_f16_kernel(src_ptr, dst_ptr, N: tl.constexpr, ASM: tl.constexpr):
    words = tl.load(src_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, N // 4))  # [N // 4]
    tl.store(dst_ptr + tl.arange(0, N), tl.reshape(e4m3_words_to_f16(words, ASM), [N]))         # [N] fp16


def _every_e4m3_value(device: str = "cpu") -> torch.Tensor:
    """All 254 non-NaN E4M3 bit patterns (both zeros, the subnormals, +-448), shuffled so that each byte position of
    a word sees every kind; 256 values, whole words."""
    bits = torch.arange(256, dtype=torch.int32)
    bits = bits[(bits & 0x7F) != 0x7F].to(torch.uint8)                  # 0x7F / 0xFF are E4M3's NaNs
    bits = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(0))]
    return torch.cat([bits, bits[:2]]).view(FP8).to(device)


def test_e4m3_words_to_f16_every_value_in_memory_order():
    """The interpreter's bit-level conversion: bitwise what torch's conversion gives, in memory order."""
    values = _every_e4m3_value()
    out = torch.empty(256, dtype=torch.float16)
    _words_to_f16_kernel[(1,)](values, out, N=256, ASM=False)
    assert torch.equal(out.view(torch.int16), values.to(torch.float16).view(torch.int16))


@pytest.mark.gpu
def test_e4m3_words_to_f16_inline_asm_on_the_gpu():
    """The compiled path (cvt.rn.f16x2.e4m3x2 on each half of a word): the byte order and the values, bitwise."""
    values = _every_e4m3_value("cuda")
    out = torch.empty(256, dtype=torch.float16, device="cuda")
    _words_to_f16_kernel[(1,)](values, out, N=256, ASM=True)
    assert torch.equal(out.view(torch.int16).cpu(), values.to(torch.float16).view(torch.int16).cpu())


def _attention_args(kernel):
    q = torch.randn(2, 4, 64)                                        # [B or T, Hq, D]
    cache = torch.randn(3, 16, 2, 64)                                # [NB, BS, Hkv, D]
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    if kernel is paged_decode_attention:
        return dict(q=q, k_cache=cache, v_cache=cache.clone(), seq_lens=lens, block_tables=tables, max_seq_len=1,
                    scale=0.125)
    return dict(q=q, k_cache=cache, v_cache=cache.clone(), query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
                seq_lens=lens, block_tables=tables, max_query_len=1, max_seq_len=1, scale=0.125)


@pytest.mark.parametrize("kernel", [paged_decode_attention, paged_prefill_attention])
def test_attention_kernels_refuse_cpu_tensors_outside_the_interpreter(kernel, monkeypatch):
    # Both wrappers share check_paged_attention_args: without it, decode on CPU tensors reached Triton's launcher.
    monkeypatch.setattr(triton_utils, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=f"{kernel.__name__}: a Triton kernel needs CUDA tensors"):
        kernel(**_attention_args(kernel))


@pytest.mark.parametrize("kernel", [paged_decode_attention, paged_prefill_attention])
def test_attention_kernels_name_the_tensor_on_another_device(kernel):
    args = _attention_args(kernel)
    args["block_tables"] = args["block_tables"].to("meta")
    with pytest.raises(ValueError, match=f"{kernel.__name__}: block_tables is on meta, q on cpu"):
        kernel(**args)
