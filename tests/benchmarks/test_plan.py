"""`n4 plan`: its figures against a hand calculation from the architecture numbers (written out here, not taken
from the planner), its one-line errors, and its JSON."""
from __future__ import annotations

import json

import pytest

from model.config import PRESETS
from n4.cli import main

GiB = 2 ** 30
EXACT = {"rel": 1e-12}


def _plan(capsys, *argv: str) -> dict:
    main(["plan", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["plan", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err        # one line
    return err


def test_340b_tp8_h100_fp8_kv_matches_hand_calculation(capsys):
    p = _plan(capsys, "--model", "nemotron-4-340b", "--tp", "8", "--gpu", "h100-80gb", "--kv-cache-dtype", "fp8")
    # Nemotron-4 340B: hidden 18432, FFN 73728, 96 layers, 96 query heads, 8 KV heads, head_dim 192, vocab 256000.
    # At TP=8 a rank holds 12 query heads and 1 KV head, 73728 / 8 = 9216 FFN columns, 256000 / 8 = 32000 vocab rows.
    qkv = 18432 * (12 + 1 + 1) * 192                 # 49_545_216
    o = 12 * 192 * 18432                             # 42_467_328
    up = down = 18432 * 9216                         # 169_869_312
    layer = qkv + o + up + down                      # 431_751_168 params of one layer on one rank
    assert layer * 8 * 96 == 331_584_897_024         # 331.58 B layer params in the whole model
    linear = 96 * layer                              # FP8: 1 byte each = 41_448_112_128
    scales = 96 * 4 * (14 * 192 + 18432 + 9216 + 18432)   # fp32 per output row: qkv, o, up, down = 18_726_912
    norms = (2 * 96 + 1) * 2 * 18432 * 2             # 193 LayerNorm1P, weight + bias, BF16 = 14_229_504
    vocab = 32000 * 18432 * 2                        # BF16 embedding shard = lm_head shard = 1_179_648_000
    weights = linear + scales + norms + 2 * vocab
    assert weights == 43_840_364_544                 # 43.84 GB per GPU
    m = p["memory"]
    assert (m["linear_weight_bytes"], m["scale_bytes"], m["norm_bytes"], m["lm_head_bytes"], m["weights_bytes"]) == \
        (41_448_112_128, 18_726_912, 14_229_504, 1_179_648_000, weights)
    read = linear + scales + norms + vocab            # a decode step reads all but the embedding: 42_660_716_544
    assert m["decode_read_bytes"] == read

    # KV per token per GPU: K and V x 96 layers x 1 head x 192 x 1 byte = 36 KiB (72 KiB in BF16), REFERENCE.md
    kv = 2 * 96 * 1 * 192 * 1
    assert kv == 36 * 1024 and p["kv"]["bytes_per_token"] == kv
    usable = 0.9 * 79.22 * GiB                       # CUDA's total on an H100 80GB
    activations = 2048 * (4 * 18432 + 3 * 9216) * 2 + 256 * 256000 * 4   # = 677_380_096
    budget = usable - weights - 4 * GiB - activations   # 27.74 GB
    assert m["kv_budget_bytes"] == pytest.approx(budget, **EXACT)
    assert 27.74e9 < budget < 27.75e9
    tokens = int(budget // (kv * 16)) * 16
    assert p["kv"]["tokens"] == tokens == 752_560
    assert p["kv"]["full_length_sequences"] == 752_560 // 4096 == 183

    # decode at context 2048 (max_model_len / 2): HBM 3.35 TB/s, FP8 1979 / BF16 989 TFLOP/s, NVLink 450 GB/s, 10 us
    for row, batch in zip(p["decode"], (1, 16, 64)):
        hbm = (read + batch * 2048 * kv) / 3.35e12
        compute = 2 * batch * linear / 1979e12 + (2 * batch * 32000 * 18432 + 4 * batch * 12 * 192 * 2048 * 96) / 989e12
        all_reduce = 10e-6 + 2 * 7 / 8 * batch * 18432 * 2 / 450e9       # 2 per layer + the embedding's: 193
        gather = 10e-6 + 7 * batch * 32000 * 2 / 450e9                    # BF16 logit shards to rank 0
        step = max(hbm, compute) + 193 * all_reduce + gather
        assert row["collectives"] == 194
        assert row["step_s"] == pytest.approx(step, **EXACT)
        assert row["tokens_per_s"] == pytest.approx(batch / step, **EXACT)
    assert [round(r["tokens_per_s"], 1) for r in p["decode"]] == [67.9, 1032.7, 3565.2]
    assert 12.7e-3 < read / 3.35e12 < 12.8e-3         # REFERENCE: ~12.6 ms for "42 GB" (see the report)

    # prefill of 4096 tokens in two chunks of 2048: layer FLOPs at FP8, causal attention and one lm_head row at BF16
    chunk1 = 2 * 2048 * linear / 1979e12 + 4 * 12 * 192 * 96 * (2048 * 2049 // 2) / 989e12
    chunk2 = (2 * 2048 * linear / 1979e12
              + (4 * 12 * 192 * 96 * (2048 * (2 * 2048 + 2049) // 2) + 2 * 32000 * 18432) / 989e12)
    comm = 193 * (10e-6 + 2 * 7 / 8 * 2048 * 18432 * 2 / 450e9)
    gather = 10e-6 + 7 * 1 * 32000 * 2 / 450e9
    assert p["prefill"]["time_s"] == pytest.approx(chunk1 + comm + chunk2 + comm + gather, **EXACT)
    # per prompt token over all GPUs: 2 x 331.58 B + 4 x 96 heads x 192 x 96 layers x 4097 / 2 = 677.67 GFLOP
    per_token = 2 * 331_584_897_024 + 4 * 96 * 192 * 96 * 4097 / 2
    assert p["prefill"]["gflop_per_token_all_gpus"] == pytest.approx(per_token / 1e9, **EXACT)
    assert round(per_token / 1e9) == 678             # REFERENCE.md


def test_15b_tp1_h200_matches_hand_calculation(capsys):
    p = _plan(capsys, "--model", "nemotron-4-15b", "--tp", "1", "--gpu", "h200")
    # Nemotron-4 15B: hidden 6144, FFN 24576, 32 layers, 48 query heads, 8 KV heads, head_dim 128, vocab 256000.
    layer = 6144 * (48 + 8 + 8) * 128 + 48 * 128 * 6144 + 6144 * 24576 + 24576 * 6144   # 390_070_272
    linear = 32 * layer
    assert linear == 12_482_248_704                  # REFERENCE.md: 12.48 B layer params
    scales = 32 * 4 * (64 * 128 + 6144 + 24576 + 6144)   # 5_767_168
    norms = 65 * 2 * 6144 * 2                        # 1_597_440
    vocab = 256000 * 6144 * 2                        # 3_145_728_000 (BF16, 1.57 B params)
    weights = linear + scales + norms + 2 * vocab
    read = linear + scales + norms + vocab
    assert (p["memory"]["weights_bytes"], p["memory"]["decode_read_bytes"]) == (18_781_069_312, 15_635_341_312) \
        == (weights, read)

    kv = 2 * 32 * 8 * 128 * 2                        # BF16 ("auto"): 128 KiB per token
    assert kv == 128 * 1024 and p["kv"]["bytes_per_token"] == kv
    activations = 2048 * (4 * 6144 + 3 * 24576) * 2 + 256 * 256000 * 4
    budget = 0.9 * 139.81 * GiB - weights - 2 * GiB - activations
    assert p["memory"]["kv_budget_bytes"] == pytest.approx(budget, **EXACT)
    tokens = int(budget // (kv * 16)) * 16
    assert p["kv"]["tokens"] == tokens == 866_032
    assert p["kv"]["full_length_sequences"] == 866_032 // 4096 == 211

    # decode at context 2048 on one GPU (no collectives): HBM 4.3 TB/s measured, FP8 1979, BF16 790 measured
    for row, batch in zip(p["decode"], (1, 16, 64)):
        hbm = (read + batch * 2048 * kv) / 4.3e12
        compute = 2 * batch * linear / 1979e12 + (2 * batch * 256000 * 6144 + 4 * batch * 48 * 128 * 2048 * 32) / 790e12
        assert row["collectives"] == 0 and row["bound"] == "memory"
        assert row["step_s"] == pytest.approx(max(hbm, compute), **EXACT)
        assert row["tokens_per_s"] == pytest.approx(batch / max(hbm, compute), **EXACT)
    assert [round(r["tokens_per_s"], 1) for r in p["decode"]] == [270.4, 3452.0, 8386.4]
    assert round(read / 4.3e12 * 1e3, 2) == 3.64     # REFERENCE says 3.3 ms: it counts lm_head at 1 byte a param

    chunk1 = 2 * 2048 * linear / 1979e12 + 4 * 48 * 128 * 32 * (2048 * 2049 // 2) / 790e12
    chunk2 = 2 * 2048 * linear / 1979e12 + (4 * 48 * 128 * 32 * (2048 * 6145 // 2) + 2 * 256000 * 6144) / 790e12
    assert p["prefill"]["time_s"] == pytest.approx(chunk1 + chunk2, **EXACT)
    per_token = 2 * linear + 4 * 48 * 128 * 32 * 4097 / 2
    assert p["prefill"]["gflop_per_token_all_gpus"] == pytest.approx(per_token / 1e9, **EXACT)
    assert round(per_token / 1e9, 1) == 26.6         # REFERENCE.md


def test_bf16_kv_and_a_checkpoint_config(capsys, tmp_path):
    p = _plan(capsys, "--model", "nemotron-4-340b", "--tp", "8", "--gpu", "h100-80gb")
    assert p["kv"]["bytes_per_token"] == 72 * 1024   # BF16: 2 x 96 x 1 x 192 x 2
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["nemotron-4-15b"].to_hf()))
    from_dir = _plan(capsys, "--model", str(tmp_path), "--gpu", "h200")
    preset = _plan(capsys, "--model", "nemotron-4-15b", "--gpu", "h200")
    assert from_dir["memory"] == preset["memory"] and from_dir["decode"] == preset["decode"]


def test_table_marks_where_figures_come_from(capsys):
    main(["plan", "--model", "nemotron-4-15b", "--gpu", "h200"])
    out = capsys.readouterr().out
    assert "4.30 TB/s  [measured]" in out and "790 TFLOP/s  [measured]" in out and "1979 TFLOP/s  [datasheet]" in out
    assert "[computed]" in out and "[assumed]" in out and "866,032 tokens" in out


@pytest.mark.parametrize("argv, message", [
    (("--model", "nemotron-4-340b", "--tp", "3", "--gpu", "h100-80gb"),
     "--tp 3 does not divide the model's 8 KV heads"),
    (("--model", "nemotron-4-340b", "--tp", "16", "--gpu", "h100-80gb"), "use one of 1, 2, 4, 8"),
    (("--model", "nemotron-4-340b", "--tp", "8", "--gpu", "a100"), "unknown --gpu 'a100'; known: h100-80gb, h200"),
    (("--model", "nemotron-4-340b", "--tp", "4", "--gpu", "h100-80gb"), "does not fit: fp8 weights need 87.65 GB"),
    (("--model", "nemotron-4-340b", "--tp", "8", "--gpu", "h100-80gb", "--weight-dtype", "bf16"),
     "does not fit: bf16 weights need 85.27 GB"),
    (("--model", "nemotron-4-340b", "--tp", "8", "--gpu", "h100-80gb", "--gpu-memory-utilization", "0.575"),
     "fewer than one --max-model-len 4096 sequence"),
    (("--model", "nemotron-4-15b", "--gpu", "h200", "--max-model-len", "8192"), "max_position_embeddings"),
])
def test_invalid_inputs_give_one_line_errors(capsys, argv, message):
    err = _error(capsys, *argv)
    assert err.startswith("n4 plan: error: ") and message in err
