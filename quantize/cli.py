"""`n4 quantize` (registered by n4/cli.py). Heavy imports (torch, the model) stay inside the command, so that
`n4 --help` stays fast."""
from __future__ import annotations

import re

from quantize import signals

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

_DESCRIPTION = """\
Convert a BF16/FP16/FP32 HF Nemotron checkpoint into an FP8 one (E4M3 weights with fp32 scales; HF
quantization_config quant_method "fp8", the layout vLLM reads). Weight-only conversion streams: tensors are read
from the memory-mapped input and written one block at a time, so memory use stays far below the checkpoint's
size. Calibration (--activation-scheme static, --kv-cache-scales) is different: it loads the whole model in
float32 on the CPU (4 bytes per parameter) and runs it over the calibration text.
The output is written into a hidden directory next to --output and renamed to it only when complete."""


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as HF's max_shard_size; KiB/MiB/GiB binary); a bare number is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


def add_commands(sub) -> None:
    p = sub.add_parser("quantize", help="convert a BF16 HF Nemotron checkpoint to FP8 (offline)",
                       description=_DESCRIPTION)
    p.add_argument("--model", required=True, metavar="IN", help="input HF checkpoint directory (BF16/FP16/FP32)")
    p.add_argument("--output", required=True, metavar="OUT", help="output checkpoint directory (must not exist)")
    p.add_argument("--weight-scheme", choices=["per-tensor", "per-channel"], default="per-tensor",
                   help="one fp32 weight scale per tensor, or one per output channel ([out, 1])")
    p.add_argument("--activation-scheme", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic: activation scales computed at run time; static: calibrated input_scale per "
                        "linear layer (needs --calibration-data; loads the whole model in memory)")
    p.add_argument("--calibration-data", metavar="FILE", default=None,
                   help="calibration text: a text file (one sample per non-blank line) or .jsonl "
                        "({\"text\": ...} per line)")
    p.add_argument("--num-calibration-samples", type=int, default=128, metavar="N",
                   help="samples read from the calibration file (default 128)")
    p.add_argument("--calibration-seq-len", type=int, default=512, metavar="TOKENS",
                   help="each sample is truncated to this many tokens (default 512)")
    p.add_argument("--kv-cache-scales", action="store_true",
                   help="calibrate self_attn.k_scale / v_scale for an FP8 KV cache (needs --calibration-data; "
                        "loads the whole model in memory)")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], metavar="MODULE",
                   help="linear modules (or name prefixes such as model.layers.0) kept unquantized; lm_head is "
                        "always kept (default: lm_head)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output file (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (only once the new checkpoint is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args) -> None:
    from quantize.convert import QuantizeOptions, quantize_checkpoint, return_freed_memory_promptly

    options = QuantizeOptions(
        model=args.model, output=args.output, weight_scheme=args.weight_scheme,
        activation_scheme=args.activation_scheme, calibration_data=args.calibration_data,
        num_calibration_samples=args.num_calibration_samples, calibration_seq_len=args.calibration_seq_len,
        kv_cache_scales=args.kv_cache_scales, ignore=tuple(args.ignore), max_shard_size=parse_size(args.max_shard_size),
        overwrite=args.overwrite, progress=not args.no_progress)
    return_freed_memory_promptly()
    # Ctrl-C and SIGTERM unwind as KeyboardInterrupt, so the staging directory is removed on the way out.
    restore_signals = signals.install()
    try:
        quantize_checkpoint(options)
    finally:
        restore_signals()
