"""`n4 plan`: what a Nemotron-4 model needs on each GPU at a tensor-parallel size, and a roofline projection of
what that deployment can do. Arithmetic only, on the architecture (model/config.py presets or a checkpoint's
config.json) and the hardware ceilings in benchmarks/roofline.py; nothing is loaded and no GPU is needed.

Per GPU (rank) at TP = N, as n4 shards the model (DESIGN.md, issue 5):
- weights: q/k/v, o, up and down of every layer hold 1/N of their parameters each (QKV split by KV-head groups,
  so N must divide the KV heads); FP8 weights take 1 byte a parameter plus one fp32 scale per output row of the
  rank's shard (per-channel, the finer of the two schemes n4 loads; per-tensor saves under 20 MB), BF16 weights 2
  bytes; the embedding and lm_head hold ceil(vocab / N) rows each, in BF16 (n4 never quantizes them: lm_head is in
  every FP8 checkpoint's ignored_layers, quantize/convert.py); the LayerNorm1P weights and biases are replicated.
- KV cache: 2 (K and V) x layers x (KV heads / N) x head_dim x 2 bytes (BF16, --kv-cache-dtype auto) or 1 (FP8),
  per token, in blocks of 16 tokens.
- memory for the KV cache: --gpu-memory-utilization x the GPU's memory - weights - a reserve, where the reserve is
  the memory CUDA and the libraries hold outside torch (assumed 2 GiB at TP=1 and 4 GiB at TP>1, rounded up from
  vLLM's profile on an H100: 1.79 GiB at TP=1, 3.58 GiB at TP=2, vllm-project/vllm#10511) plus one step's
  activations (computed: max_num_batched_tokens x (4 x hidden + 3 x intermediate / N) x 2 bytes for the layer's
  BF16 intermediates, and max_num_seqs x vocab x 4 bytes of fp32 logits on rank 0). n4's engine sizes its pool
  from the memory in use after loading, so its activations really come out of the (1 - utilization) headroom:
  the plan's KV figure is the conservative one.

Roofline of one decode step at batch B, every sequence at the same context C (default max_model_len / 2):
    HBM time   = (weights read: all layer weights, scales, norms and the lm_head shard; the embedding reads only
                  B rows and is left out) + B x C x KV bytes per token) / HBM bandwidth
    compute    = 2 B x layer parameters / (FP8 or BF16 peak) + (2 B x lm_head shard parameters
                 + 4 B x (query heads / N) x head_dim x C x layers) / BF16 peak     (attention runs in BF16)
    collectives (N > 1) = (2 x layers + 1) all-reduces of B x hidden x 2 bytes (after o_proj and down_proj, and
                 the vocab-parallel embedding), each latency + 2 (N - 1) / N x bytes / link bandwidth, and one
                 gather of the BF16 logit shards to rank 0: latency + (N - 1) x B x vocab shard x 2 bytes / link
    step       = max(HBM time, compute) + collectives (no overlap);  tokens/s = B / step.
Prefill of a P-token prompt runs in chunks of max_num_batched_tokens, as n4's scheduler does; per chunk of n
tokens after s already done: 2 n x layer parameters at the weights' peak, the causal attention of its queries
4 x (query heads / N) x head_dim x layers x (s+1 + ... + s+n) and, in the last chunk, one row of lm_head at the
BF16 peak; the HBM time reads the weights once and the prefix's KV; the collectives are as above with B = n.
The peaks are the dense ones; real kernels reach a fraction of them (see `n4 bench kernels`).
"""
from __future__ import annotations

import argparse
import json

from benchmarks.roofline import GPUS, GiB, Roofline
from model.config import ModelConfig, get_config
from model.quant_config import KV_CACHE_DTYPES

BLOCK_SIZE = 16              # n4's default --block-size
MODEL_DTYPE_BYTES = 2        # BF16: embedding, lm_head, norms, activations, the "auto" KV cache
SCALE_BYTES = 4              # fp32 weight scale per output row
LOGIT_BYTES = 4              # fp32 logits
BATCH_SIZES = (1, 16, 64)
PREFILL_PROMPT = 4096


def non_torch_reserve(tp: int) -> int:
    """CUDA context, cuBLAS workspaces and, with TP, NCCL communicators: memory held outside torch (assumed)."""
    return (2 if tp == 1 else 4) * GiB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (nemotron-4-15b, nemotron-4-340b, ...) or checkpoint dir")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel size: GPUs the model is split across (must divide the KV heads)")
    p.add_argument("--gpu", required=True, help=f"GPU type: {', '.join(GPUS)}")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: BF16 KV cache; fp8 (= fp8_e4m3): FP8 E4M3")
    p.add_argument("--weight-dtype", default="fp8", choices=("fp8", "bf16"),
                   help="linear-layer weights: fp8 (1 byte + fp32 per-channel scales) or bf16")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of each GPU n4 may use")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (prefill chunk size and activation reserve), as n4 serve")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step, as n4 serve")
    p.add_argument("--context", type=int, default=None,
                   help="context of every sequence in the decode projection (default: max_model_len / 2)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help=f"prompt length of the prefill projection (default: {PREFILL_PROMPT}, at most max_model_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def run(args: argparse.Namespace) -> None:
    result = make_plan(args.model, tp=args.tp, gpu=args.gpu, kv_cache_dtype=args.kv_cache_dtype,
                       weight_dtype=args.weight_dtype, max_model_len=args.max_model_len,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       context=args.context, prompt_len=args.prompt_len)
    print(json.dumps(result, indent=2) if args.json else render(result))


# ---- the arithmetic ------------------------------------------------------------------------------------------

def _check(cfg: ModelConfig, tp: int, gpu: str, weight_dtype: str, max_model_len: int, utilization: float,
           max_num_batched_tokens: int, max_num_seqs: int) -> Roofline:
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be a positive integer, got {tp!r}")
    valid = [n for n in range(1, cfg.num_key_value_heads + 1)
             if cfg.num_key_value_heads % n == 0 and cfg.intermediate_size % n == 0]
    if cfg.num_key_value_heads % tp:
        raise ValueError(f"--tp {tp} does not divide the model's {cfg.num_key_value_heads} KV heads (each rank holds "
                         f"whole KV heads); use one of {', '.join(map(str, valid))}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"--tp {tp} does not divide the model's intermediate size ({cfg.intermediate_size}); "
                         f"use one of {', '.join(map(str, valid))}")
    if weight_dtype not in ("fp8", "bf16"):
        raise ValueError(f"--weight-dtype must be fp8 or bf16, got {weight_dtype!r}")
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if max_model_len < 1 or max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_model_len} must be in [1, {cfg.max_position_embeddings}] (the "
                         f"model's max_position_embeddings)")
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError("--max-num-batched-tokens and --max-num-seqs must be positive")
    return GPUS[gpu]


def _bigger(cfg: ModelConfig, tp: int, fp8: bool, kv_fp8: bool = True, *extra: str) -> str:
    """What would make room, for an error message."""
    ways = ([f"a larger --tp (at most {cfg.num_key_value_heads})"] if tp < cfg.num_key_value_heads else []) + \
        ([] if fp8 else ["--weight-dtype fp8"]) + ([] if kv_fp8 else ["--kv-cache-dtype fp8"]) + \
        ["a larger GPU", *extra]
    return ", ".join(ways[:-1]) + " or " + ways[-1] if len(ways) > 1 else ways[0]


def make_plan(model: str, *, tp: int, gpu: str, kv_cache_dtype: str = "auto", weight_dtype: str = "fp8",
              max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
              max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, context: int | None = None,
              prompt_len: int | None = None) -> dict:
    """Every figure of the plan, as a JSON-ready dict (bytes, seconds, FLOPs; rendered by `render`)."""
    cfg = get_config(model)
    # `is None`, not `or`: --max-model-len 0 is bad input to reject, not a request for the default
    max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
    roof = _check(cfg, tp, gpu, weight_dtype, max_model_len, gpu_memory_utilization, max_num_batched_tokens,
                  max_num_seqs)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    kv_fp8 = kv_cache_dtype != "auto"
    context = max_model_len // 2 if context is None else context
    prompt_len = min(PREFILL_PROMPT, max_model_len) if prompt_len is None else prompt_len
    if not 0 < context <= max_model_len:
        raise ValueError(f"--context {context} must be in [1, --max-model-len {max_model_len}]")
    if not 0 < prompt_len <= max_model_len:
        raise ValueError(f"--prompt-len {prompt_len} must be in [1, --max-model-len {max_model_len}]")

    h, inter, layers, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    q_heads, kv_heads = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp   # of one rank
    vocab_rows = -(-cfg.vocab_size // tp)
    fp8 = weight_dtype == "fp8"

    # -- weights of one rank
    qkv_rows = (q_heads + 2 * kv_heads) * d
    layer_params = h * qkv_rows + q_heads * d * h + 2 * h * (inter // tp)   # qkv, o, up, down
    linear_params = layers * layer_params
    linear_bytes = linear_params * (1 if fp8 else MODEL_DTYPE_BYTES)
    # one scale per output row: qkv's rows, o's and down's full hidden (row-parallel), up's shard
    scale_bytes = layers * SCALE_BYTES * (qkv_rows + h + inter // tp + h) if fp8 else 0
    norm_bytes = (2 * layers + 1) * 2 * h * MODEL_DTYPE_BYTES   # two LayerNorm1P a layer + final; weight + bias
    vocab_bytes = vocab_rows * h * MODEL_DTYPE_BYTES            # each of embedding and lm_head
    weights = linear_bytes + scale_bytes + norm_bytes + 2 * vocab_bytes
    decode_read = linear_bytes + scale_bytes + norm_bytes + vocab_bytes   # the embedding reads B rows only

    # -- memory for the KV cache
    kv_per_token = 2 * layers * kv_heads * d * (1 if kv_fp8 else MODEL_DTYPE_BYTES)
    usable = gpu_memory_utilization * roof.memory_bytes
    activations = (max_num_batched_tokens * (4 * h + 3 * (inter // tp)) * MODEL_DTYPE_BYTES
                   + max_num_seqs * cfg.vocab_size * LOGIT_BYTES)
    reserve = non_torch_reserve(tp) + activations
    kv_budget = usable - weights - reserve
    if kv_budget <= 0:
        raise ValueError(f"{model} does not fit: {weight_dtype} weights need {weights / 1e9:.2f} GB per GPU at TP={tp} "
                         f"plus a {reserve / 1e9:.2f} GB reserve, but --gpu-memory-utilization "
                         f"{gpu_memory_utilization} of one {gpu} gives {usable / 1e9:.2f} GB; use "
                         f"{_bigger(cfg, tp, fp8)}")
    kv_blocks = int(kv_budget // (kv_per_token * BLOCK_SIZE))
    kv_tokens = kv_blocks * BLOCK_SIZE
    if kv_tokens < max_model_len:
        raise ValueError(f"{model} at TP={tp} on {gpu} leaves {kv_budget / 1e9:.2f} GB per GPU for the KV cache: "
                         f"{kv_tokens} tokens, fewer than one --max-model-len {max_model_len} sequence; use "
                         f"{_bigger(cfg, tp, fp8, kv_fp8, 'a shorter --max-model-len')}")

    peak_w = roof.fp8_flops if fp8 else roof.bf16_flops
    attn_per_query_ctx = 4 * q_heads * d * layers     # QK^T and PV, 2 FLOPs a multiply-add each, per key
    lm_head_per_row = 2 * vocab_rows * h

    def collectives(tokens: int, gather_rows: int) -> tuple[int, float]:
        """(number of collectives, seconds) of one forward over `tokens` tokens, `gather_rows` of them to logits."""
        if tp == 1:
            return 0, 0.0
        count = 2 * layers + 1
        link = roof.link_bytes_per_s
        all_reduce = roof.collective_latency_s + 2 * (tp - 1) / tp * tokens * h * MODEL_DTYPE_BYTES / link
        seconds = count * all_reduce
        if gather_rows:
            count += 1
            seconds += roof.collective_latency_s + (tp - 1) * gather_rows * vocab_rows * MODEL_DTYPE_BYTES / link
        return count, seconds

    # -- decode
    decode = []
    for batch in BATCH_SIZES:
        kv_read = batch * context * kv_per_token
        hbm_s = (decode_read + kv_read) / roof.hbm_bytes_per_s
        flops = 2 * batch * linear_params + batch * lm_head_per_row + batch * context * attn_per_query_ctx
        compute_s = (2 * batch * linear_params / peak_w
                     + (batch * lm_head_per_row + batch * context * attn_per_query_ctx) / roof.bf16_flops)
        n_coll, comm_s = collectives(batch, batch)
        step = max(hbm_s, compute_s) + comm_s
        decode.append({"batch": batch, "context": context, "bytes_read": decode_read + kv_read,
                       "kv_bytes_read": kv_read, "flops": flops, "hbm_s": hbm_s, "compute_s": compute_s,
                       "collectives": n_coll, "collective_s": comm_s, "step_s": step,
                       "bound": "memory" if hbm_s >= compute_s else "compute", "tokens_per_s": batch / step,
                       "tokens_per_s_per_seq": 1 / step, "fits_kv": batch * context <= kv_tokens,
                       "within_max_num_seqs": batch <= max_num_seqs})

    # -- prefill, in chunks as the scheduler runs it
    chunks, done, prefill_flops = [], 0, 0
    while done < prompt_len:
        n = min(max_num_batched_tokens, prompt_len - done)
        last = done + n == prompt_len
        attn = attn_per_query_ctx * n * (2 * done + n + 1) // 2   # queries done+1 .. done+n, causal
        head = lm_head_per_row if last else 0
        compute_s = 2 * n * linear_params / peak_w + (attn + head) / roof.bf16_flops
        hbm_s = (decode_read + done * kv_per_token) / roof.hbm_bytes_per_s
        n_coll, comm_s = collectives(n, 1 if last else 0)
        chunks.append({"tokens": n, "compute_s": compute_s, "hbm_s": hbm_s, "collectives": n_coll,
                       "collective_s": comm_s, "time_s": max(compute_s, hbm_s) + comm_s})
        prefill_flops += 2 * n * linear_params + attn + head
        done += n
    prefill_s = sum(c["time_s"] for c in chunks)
    # FLOPs per prompt token over all GPUs, without lm_head (one row per prompt): REFERENCE.md's figure
    per_token_all = (2 * linear_params * tp * prompt_len
                     + 4 * cfg.num_attention_heads * d * layers * prompt_len * (prompt_len + 1) // 2) / prompt_len

    hardware = {f: {"value": getattr(roof, f), "kind": roof.kind(f)}
                for f in ("hbm_bytes_per_s", "bf16_flops", "fp8_flops", "memory_bytes", "link_bytes_per_s",
                          "collective_latency_s")}
    return {
        "model": model, "tp": tp, "gpu": gpu, "gpu_name": roof.name, "weight_dtype": weight_dtype,
        "kv_cache_dtype": "fp8" if kv_fp8 else "bf16", "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization, "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs, "block_size": BLOCK_SIZE,
        "architecture": {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
                         "num_attention_heads": cfg.num_attention_heads,
                         "num_key_value_heads": cfg.num_key_value_heads, "head_dim": d, "vocab_size": cfg.vocab_size,
                         "query_heads_per_gpu": q_heads, "kv_heads_per_gpu": kv_heads,
                         "layer_params_total": linear_params * tp,
                         "params_total": linear_params * tp + 2 * cfg.vocab_size * h + (2 * layers + 1) * 2 * h},
        "hardware": hardware,
        "memory": {"linear_weight_bytes": linear_bytes, "scale_bytes": scale_bytes, "norm_bytes": norm_bytes,
                   "embedding_bytes": vocab_bytes, "lm_head_bytes": vocab_bytes, "weights_bytes": weights,
                   "decode_read_bytes": decode_read,
                   "usable_bytes": usable, "non_torch_reserve_bytes": non_torch_reserve(tp),
                   "activation_reserve_bytes": activations, "kv_budget_bytes": kv_budget},
        "kv": {"bytes_per_token": kv_per_token, "blocks": kv_blocks, "tokens": kv_tokens,
               "full_length_sequences": kv_tokens // max_model_len, "concurrency": kv_tokens / max_model_len},
        "decode": decode,
        "prefill": {"prompt_len": prompt_len, "chunks": chunks, "flops_per_gpu": prefill_flops, "time_s": prefill_s,
                    "tokens_per_s": prompt_len / prefill_s, "gflop_per_token_all_gpus": per_token_all / 1e9},
        "assumptions": _assumptions(roof, tp, fp8, context, max_model_len),
    }


def _assumptions(roof: Roofline, tp: int, fp8: bool, context: int, max_model_len: int) -> list[str]:
    notes = [
        f"decode: every sequence at {context} tokens of context"
        + (" (max_model_len / 2)" if context == max_model_len // 2 else "")
        + "; the KV write of the new token and the embedding rows are left out",
        "lm_head and embedding in BF16 (n4 never quantizes them; lm_head is in every FP8 checkpoint's ignored_layers)"
        if fp8 else "all weights in BF16",
        "FP8 weights: one fp32 scale per output row; activations quantized on the fly (cost left out)" if fp8 else
        "linear layers at the BF16 peak",
        "attention and lm_head at the BF16 peak; peaks are dense datasheet/measured ceilings, not what kernels reach",
        (f"reserve: {non_torch_reserve(tp) // GiB} GiB outside torch (assumed, from vLLM's profile) + one step's "
         f"activations (computed)"),
        "step time = max(HBM, compute) + collectives: no overlap of communication with compute",
    ]
    if tp > 1:
        notes.append(f"collectives: ring over NVSwitch, latency {roof.collective_latency_s * 1e6:.0f} us each "
                     f"(assumed) + 2(N-1)/N x bytes / {roof.link_bytes_per_s / 1e9:.0f} GB/s (NVLink 4 per direction, "
                     f"datasheet); BF16 activations and logit shards")
    return notes


# ---- the table ------------------------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB ({x / GiB:.2f} GiB)"


def render(p: dict) -> str:
    a, m, kv, pre = p["architecture"], p["memory"], p["kv"], p["prefill"]
    tp = p["tp"]
    hw = p["hardware"]
    rows: list[tuple[str, str, str]] = []

    def section(title: str) -> None:
        rows.append((title, "", ""))

    def row(label: str, value: str, kind: str = "computed") -> None:
        rows.append(("  " + label, value, kind))

    section(f"Hardware: {p['gpu_name']} ({p['gpu']}), per GPU")
    row("HBM bandwidth", f"{hw['hbm_bytes_per_s']['value'] / 1e12:.2f} TB/s", hw["hbm_bytes_per_s"]["kind"])
    row("BF16 dense peak", f"{hw['bf16_flops']['value'] / 1e12:.0f} TFLOP/s", hw["bf16_flops"]["kind"])
    row("FP8 dense peak", f"{hw['fp8_flops']['value'] / 1e12:.0f} TFLOP/s", hw["fp8_flops"]["kind"])
    row("memory (as CUDA reports it)", _gb(hw["memory_bytes"]["value"]), hw["memory_bytes"]["kind"])
    if tp > 1:
        row("NVLink per direction", f"{hw['link_bytes_per_s']['value'] / 1e9:.0f} GB/s", hw["link_bytes_per_s"]["kind"])
        row("latency per collective", f"{hw['collective_latency_s']['value'] * 1e6:.0f} us",
            hw["collective_latency_s"]["kind"])

    section(f"Weights per GPU ({a['layer_params_total'] / 1e9:.2f} B layer params, {a['params_total'] / 1e9:.2f} B "
            f"in all; {a['query_heads_per_gpu']} query + {a['kv_heads_per_gpu']} KV heads per GPU)")
    wname = "FP8, 1 B/param" if p["weight_dtype"] == "fp8" else "BF16, 2 B/param"
    row(f"layer weights ({wname}, " + (f"1/{tp} of each)" if tp > 1 else "whole)"), _gb(m["linear_weight_bytes"]))
    if m["scale_bytes"]:
        row("FP8 weight scales (fp32 per output row)", _gb(m["scale_bytes"]))
    row("LayerNorm1P weights + biases (replicated)", _gb(m["norm_bytes"]))
    row("embedding (BF16" + (f", 1/{tp} of the vocab)" if tp > 1 else ")"), _gb(m["embedding_bytes"]))
    row("lm_head (BF16" + (f", 1/{tp} of the vocab)" if tp > 1 else ")"), _gb(m["lm_head_bytes"]))
    row("total weights", _gb(m["weights_bytes"]))
    row("read per decode step (all but the embedding)", _gb(m["decode_read_bytes"]))

    section("KV cache per GPU")
    row(f"usable ({p['gpu_memory_utilization']} x memory)", _gb(m["usable_bytes"]))
    row("reserve outside torch (CUDA, cuBLAS, NCCL)", _gb(m["non_torch_reserve_bytes"]), "assumed")
    row(f"reserve for activations ({p['max_num_batched_tokens']} tokens, logits of {p['max_num_seqs']} seqs)",
        _gb(m["activation_reserve_bytes"]))
    row("left for the KV cache", _gb(m["kv_budget_bytes"]))
    row(f"KV bytes per token ({p['kv_cache_dtype'].upper()})",
        f"{kv['bytes_per_token']} B ({kv['bytes_per_token'] / 1024:g} KiB)")
    row(f"capacity ({p['block_size']}-token blocks)", f"{kv['tokens']:,} tokens")
    row(f"full-length sequences ({p['max_model_len']} tokens)", f"{kv['full_length_sequences']:,} "
        f"({kv['concurrency']:.1f}x)")

    lines = []
    width = max(len(r[0]) for r in rows if r[1]) + 2
    vwidth = max(len(r[1]) for r in rows if r[1])
    head = (f"n4 plan: {p['model']} at TP={tp} on {tp} x {p['gpu']}, {p['weight_dtype'].upper()} weights, "
            f"{p['kv_cache_dtype'].upper()} KV cache, max_model_len {p['max_model_len']}, "
            f"gpu_memory_utilization {p['gpu_memory_utilization']}")
    lines += [head, ""]
    for label, value, kind in rows:
        lines.append(label if not value else f"{label:<{width}}{value:>{vwidth}}  [{kind}]")

    ctx = p["decode"][0]["context"]
    lines += ["", f"Decode roofline per step, every sequence at {ctx} tokens of context [computed]"]
    hdr = (f"  {'batch':>5} {'GB read':>8} {'HBM ms':>8} {'compute ms':>10} {'collectives':>12} {'comm ms':>8} "
           f"{'step ms':>8} {'bound':>7} {'tok/s':>9} {'tok/s/seq':>9}")
    lines.append(hdr)
    for r in p["decode"]:
        flag = "" if r["fits_kv"] else "  (contexts exceed the KV capacity)"
        lines.append(f"  {r['batch']:>5} {r['bytes_read'] / 1e9:>8.2f} {r['hbm_s'] * 1e3:>8.2f} "
                     f"{r['compute_s'] * 1e3:>10.2f} {r['collectives']:>12} {r['collective_s'] * 1e3:>8.2f} "
                     f"{r['step_s'] * 1e3:>8.2f} {r['bound']:>7} {r['tokens_per_s']:>9.1f} "
                     f"{r['tokens_per_s_per_seq']:>9.1f}{flag}")

    lines += ["", (f"Prefill roofline, one {pre['prompt_len']}-token prompt in chunks of "
                   f"{p['max_num_batched_tokens']} [computed]")]
    lines.append(f"  {'chunk':>5} {'tokens':>7} {'compute ms':>10} {'HBM ms':>8} {'comm ms':>8} {'time ms':>8}")
    for i, c in enumerate(pre["chunks"]):
        lines.append(f"  {i + 1:>5} {c['tokens']:>7} {c['compute_s'] * 1e3:>10.2f} {c['hbm_s'] * 1e3:>8.2f} "
                     f"{c['collective_s'] * 1e3:>8.2f} {c['time_s'] * 1e3:>8.2f}")
    lines.append(f"  total {pre['time_s'] * 1e3:.1f} ms ({pre['tokens_per_s']:,.0f} prompt tokens/s); "
                 f"{pre['gflop_per_token_all_gpus']:.1f} GFLOP per prompt token over all GPUs (2 x layer params + "
                 f"causal attention, lm_head left out)")

    lines += ["", "Assumptions:"] + [f"  - {n}" for n in p["assumptions"]]
    lines.append("  - kinds: measured = on that GPU (REFERENCE.md); datasheet = NVIDIA's; reported = CUDA's total in a "
                 "public log; assumed = a stated choice; computed = here, from the above")
    return "\n".join(lines)
