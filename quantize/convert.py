"""`n4 quantize`: a BF16/FP16/FP32 HF Nemotron checkpoint -> an FP8 checkpoint in model/quant.py's format.

Order of work: check the arguments and the output path, open and validate the input (headers only), calibrate
when asked (the only step that loads the model), plan every output tensor and shard, then stream: each input
tensor is read a block of rows at a time from the memory-mapped input, quantized (or copied) and written at its
planned offset. Everything goes into a staging directory next to OUT that becomes OUT by a rename only once it is
complete; any failure or interrupt removes it, and an existing OUT (with --overwrite) is replaced only then.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.errors import CheckpointError
from model.quant import (
    FP8_DTYPE,
    FP8_MAX,
    INPUT_SCALE,
    K_SCALE,
    QUANT_METHOD,
    V_SCALE,
    WEIGHT_SCALE,
    fp8_scale,
    quantize_weight_fp8,
)
from quantize import calibrate as calib
from quantize import signals
from quantize.progress import Progress, format_bytes
from quantize.source import PASSTHROUGH_SUFFIXES, SourceCheckpoint, expected_shapes
from quantize.writer import ShardWriter, TensorSpec, plan_shards, write_index

log = logging.getLogger(__name__)

WEIGHT_SCHEMES = ("per-tensor", "per-channel")
ACTIVATION_SCHEMES = ("dynamic", "static")
DEFAULT_IGNORE = ("lm_head",)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Elements per block of rows read, converted and written at once. The reads are views of the mapped file (no
# copy); the working set is a few fp32 copies of one block (its fp32 values, the scaled and the clamped ones, the
# E4M3 result): ~50 MB at 4 Mi elements, whatever the tensor's size. Measured on tests/quantize/test_memory.py's
# 1.19 GB checkpoint (per-channel, 2 CPUs): 1 Mi elements 14 MB / 21 s, 4 Mi 54 MB / 12 s, 16 Mi 213 MB / 13 s.
BLOCK_ELEMENTS = 1 << 22
_LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                   "mlp.down_proj")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_NOT_COPIED_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class QuantizeOptions:
    model: str
    output: str
    weight_scheme: str = "per-tensor"
    activation_scheme: str = "dynamic"
    calibration_data: str | None = None
    num_calibration_samples: int = calib.DEFAULT_NUM_SAMPLES
    calibration_seq_len: int = calib.DEFAULT_SEQ_LEN
    kv_cache_scales: bool = False
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"--weight-scheme must be one of {WEIGHT_SCHEMES}, got {self.weight_scheme!r}")
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"--activation-scheme must be one of {ACTIVATION_SCHEMES}, "
                             f"got {self.activation_scheme!r}")
        if self.needs_calibration and not self.calibration_data:
            what = "--activation-scheme static" if self.activation_scheme == "static" else "--kv-cache-scales"
            raise ValueError(f"{what} needs --calibration-data FILE (text or JSONL) to measure activations on")
        if self.calibration_data and not self.needs_calibration:
            raise ValueError("--calibration-data is only used with --activation-scheme static or --kv-cache-scales")
        for name in ("num_calibration_samples", "calibration_seq_len", "max_shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    @property
    def needs_calibration(self) -> bool:
        return self.activation_scheme == "static" or self.kv_cache_scales


@dataclass(frozen=True)
class _Job:
    """One input tensor and what it becomes: the tensor itself (FP8 when `quantize`, else copied byte for byte),
    its weight scale when quantized, and precomputed fp32 scalars (input/k/v scales) that share its shard."""
    source: str
    outputs: tuple[TensorSpec, ...]
    quantize: bool
    scalars: dict[str, torch.Tensor]


def quantize_checkpoint(options: QuantizeOptions) -> str:
    """Write the FP8 checkpoint of options.model to options.output; returns the output path."""
    _check_output(options)
    if options.calibration_data:
        calib.check_calibration_file(options.calibration_data)
    with SourceCheckpoint.open(options.model) as source:
        ignored = resolve_ignored(options.ignore, source.config.num_hidden_layers)
        calibration = _calibrate(options, source) if options.needs_calibration else None
        jobs = _plan_jobs(source, ignored, options, calibration)
        shards = plan_shards([list(job.outputs) for job in jobs], options.max_shard_size)
        extra_files = _files_to_copy(options.model)
        _check_free_space(options.output, sum(s.size for s in shards) +
                          sum(os.path.getsize(os.path.join(options.model, f)) for f in extra_files))
        with _staging_dir(options.output, options.overwrite) as staging:
            _write_shards(staging, shards, jobs, source, options)
            if len(shards) > 1:
                write_index(staging, shards)
            _write_config(staging, source.hf_config, options, ignored)
            for name in extra_files:
                shutil.copyfile(os.path.join(options.model, name), os.path.join(staging, name))
    log.info("wrote %s: %d shard(s), %s; weights %s, activations %s%s", options.output, len(shards),
             format_bytes(sum(s.size for s in shards)), options.weight_scheme, options.activation_scheme,
             ", KV-cache scales" if options.kv_cache_scales else "")
    return options.output


def return_freed_memory_promptly() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system when freed.

    The conversion allocates and frees blocks of ~16 MB over and over, at sizes that vary with each tensor's row
    length. glibc's default (a threshold that rises to 32 MB once mapped chunks are freed) then serves them from the
    heap, which fragments and stays resident: 295 MB peak above baseline on the 1.19 GB test checkpoint
    (per-channel) instead of 54 MB, at the same speed. A process-wide setting, so the CLI calls it, not the
    library; a no-op without glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def resolve_ignored(patterns: tuple[str, ...] | list[str], num_layers: int) -> list[str]:
    """The linear modules kept unquantized, as exact module names in model order (vLLM's `ignored_layers`). A
    pattern names a module or any prefix of module names at a dot ("model.layers.3", "model.layers.0.mlp").
    lm_head is always among them: n4 runs it in the model dtype."""
    modules = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(num_layers) for m in _LINEAR_MODULES]
    ignored = {"lm_head"}
    for pattern in patterns:
        hits = [m for m in modules if m == pattern or m.startswith(pattern + ".")]
        if not hits:
            raise ValueError(f"--ignore {pattern!r} matches no linear module (names look like lm_head, "
                             f"model.layers.0.self_attn.q_proj, model.layers.0.mlp)")
        ignored.update(hits)
    for i in range(num_layers):
        qkv = [f"model.layers.{i}.self_attn.{p}_proj" for p in ("q", "k", "v")]
        if 0 < sum(m in ignored for m in qkv) < 3:
            raise ValueError(f"--ignore: q_proj, k_proj and v_proj of layer {i} run as one fused layer; ignore all "
                             f"three or none of them")
    return [m for m in modules if m in ignored]


def _check_output(options: QuantizeOptions) -> None:
    if not options.output:
        # realpath("") is the working directory but rename(..., "") fails: refused here, not after converting.
        raise ValueError("--output must name a directory, got an empty path")
    output, model = os.path.realpath(options.output), os.path.realpath(options.model)
    if output == model or model.startswith(output + os.sep):
        raise ValueError(f"--output {options.output} would replace the input checkpoint {options.model}")
    parent = os.path.dirname(os.path.abspath(options.output))
    if not os.path.isdir(parent):
        raise ValueError(f"--output {options.output}: the directory {parent} does not exist")
    if os.path.lexists(options.output) and not options.overwrite:
        raise ValueError(f"--output {options.output} already exists; pass --overwrite to replace it (it is replaced "
                         f"only once the new checkpoint is complete)")


def _check_free_space(output: str, needed: int) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise ValueError(f"not enough free space in {parent}: the output needs {format_bytes(needed)}, "
                         f"{format_bytes(free)} free")


def _calibrate(options: QuantizeOptions, source: SourceCheckpoint) -> calib.Calibration:
    samples = calib.read_samples(options.calibration_data, options.num_calibration_samples)
    max_len = min(options.calibration_seq_len, source.config.max_position_embeddings)
    tokens = calib.tokenize(samples, options.model, max_len, source.config.vocab_size)
    if not tokens:
        raise ValueError(f"--calibration-data {options.calibration_data}: no sample encodes to any token")
    if len(tokens) < options.num_calibration_samples:
        log.warning("calibrating on %d samples (%s has no more); asked for %d", len(tokens),
                    options.calibration_data, options.num_calibration_samples)
    log.info("calibrating on %d samples (%d tokens); the model is loaded in float32 on the CPU", len(tokens),
             sum(map(len, tokens)))
    calibration = calib.calibrate(options.model, tokens)
    _check_calibration_finite(calibration)
    return calibration


def _check_calibration_finite(calibration: calib.Calibration) -> None:
    """inf/nan activations (from inf/nan in a tensor that is copied rather than quantized: embeddings, norms, an
    ignored linear) would become inf/nan input_scale / k_scale / v_scale: a checkpoint every loader, n4's first,
    refuses or runs as garbage. Refused here instead, naming where it first shows up."""
    amaxes = [(f"the input of {name}", amax) for name, amax in calibration.input_amax.items()]
    amaxes += [(f"K of layer {layer}", amax) for layer, amax in sorted(calibration.k_amax.items())]
    amaxes += [(f"V of layer {layer}", amax) for layer, amax in sorted(calibration.v_amax.items())]
    bad = [where for where, amax in amaxes if not torch.isfinite(amax).all()]
    if bad:
        raise CheckpointError(f"calibration measured inf or nan values in {bad[0]}" +
                              (f" (and {len(bad) - 1} more places)" if len(bad) > 1 else "") +
                              "; the checkpoint has inf or nan weights and may be corrupt")


def _plan_jobs(source: SourceCheckpoint, ignored: list[str], options: QuantizeOptions,
               calibration: calib.Calibration | None) -> list[_Job]:
    """One job per input tensor, in model order (then any passthrough buffers)."""
    shapes = expected_shapes(source.config)
    quantized = {f"model.layers.{i}.{m}" for i in range(source.config.num_hidden_layers) for m in _LINEAR_MODULES}
    quantized -= set(ignored)
    names = list(shapes) + [n for n in source.tensors if n.endswith(PASSTHROUGH_SUFFIXES)]
    jobs = []
    for name in names:
        tensor = source.tensors[name]
        module = name.removesuffix(".weight")
        scalars = _scalars_for(module, options, calibration)
        if module in quantized:
            scale_shape = (tensor.shape[0], 1) if options.weight_scheme == "per-channel" else ()
            outputs = [TensorSpec(name, FP8_DTYPE, tensor.shape),
                       TensorSpec(f"{module}.{WEIGHT_SCALE}", torch.float32, scale_shape)]
            if options.activation_scheme == "static":
                scalars = {f"{module}.{INPUT_SCALE}": fp8_scale(calibration.input_amax[module]), **scalars}
        else:
            outputs = [TensorSpec(name, tensor.dtype, tensor.shape)]
        outputs += [TensorSpec(n, torch.float32, ()) for n in scalars]
        jobs.append(_Job(name, tuple(outputs), module in quantized, scalars))
    return jobs


def _scalars_for(module: str, options: QuantizeOptions, calibration: calib.Calibration | None) -> dict:
    """The KV-cache scales of a layer travel with its v_proj (quantized or not)."""
    if not (options.kv_cache_scales and module.endswith(".self_attn.v_proj")):
        return {}
    attn = module.removesuffix(".v_proj")
    layer = int(module.split(".")[2])
    return {f"{attn}.{K_SCALE}": fp8_scale(calibration.k_amax[layer]),
            f"{attn}.{V_SCALE}": fp8_scale(calibration.v_amax[layer])}


def _write_shards(staging: str, shards, jobs: list[_Job], source: SourceCheckpoint,
                  options: QuantizeOptions) -> None:
    shard_of = {t.name: i for i, shard in enumerate(shards) for t in shard.tensors}
    jobs_by_shard: list[list[_Job]] = [[] for _ in shards]
    for job in jobs:
        jobs_by_shard[shard_of[job.source]].append(job)
    progress = Progress(sum(len(job.outputs) for job in jobs), sum(s.size - len(s.header) for s in shards),
                        enabled=options.progress)
    for shard, shard_jobs in zip(shards, jobs_by_shard):
        with ShardWriter(staging, shard) as writer:
            for job in shard_jobs:
                _run_job(job, source, writer, progress, options.weight_scheme == "per-channel")
    progress.close()


def _run_job(job: _Job, source: SourceCheckpoint, writer: ShardWriter, progress: Progress,
             per_channel: bool) -> None:
    def write(name: str, data: torch.Tensor) -> None:
        progress.advance(nbytes=writer.write(name, data))

    if not job.quantize:
        for start, stop in _row_blocks(source.tensors[job.source].shape):
            write(job.source, source.read_rows(job.source, start, stop))
    else:
        scale = (_quantize_per_channel if per_channel else _quantize_per_tensor)(job.source, source, write)
        write(job.outputs[1].name, scale)
    for name, value in job.scalars.items():
        write(name, value)
    progress.advance(items=len(job.outputs))


def _quantize_per_channel(name: str, source: SourceCheckpoint, write) -> torch.Tensor:
    """Each block of rows through quantize_weight_fp8 (a row's scale depends on that row only)."""
    scales = []
    for start, stop in _row_blocks(source.tensors[name].shape):
        q, scale = quantize_weight_fp8(source.read_rows(name, start, stop), per_channel=True)  # [rows, in], [rows, 1]
        _check_finite(source, name, scale)
        write(name, q)
        scales.append(scale)
    return torch.cat(scales)  # [out, 1]


def _quantize_per_tensor(name: str, source: SourceCheckpoint, write) -> torch.Tensor:
    """Two passes over blocks of rows: the tensor's amax, then q = e4m3(clamp(w / scale, +-448)). This is
    quantize_weight_fp8 split into blocks (max and element-wise ops are exact, so the bytes are the same;
    tests/quantize check it), so that no fp32 copy of a whole tensor is ever made."""
    blocks = list(_row_blocks(source.tensors[name].shape))
    amax = torch.zeros((), dtype=torch.float32)
    for start, stop in blocks:
        amax = torch.maximum(amax, source.read_rows(name, start, stop).float().abs().amax())
    _check_finite(source, name, amax)
    scale = fp8_scale(amax)  # fp32 []
    for start, stop in blocks:
        w = source.read_rows(name, start, stop).float()                     # [rows, in] fp32
        write(name, (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))     # [rows, in] e4m3
    return scale


def _row_blocks(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of dim 0 covering about BLOCK_ELEMENTS elements each (one range for a scalar)."""
    if not shape:
        yield 0, 1
        return
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def _check_finite(source: SourceCheckpoint, name: str, values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        raise CheckpointError(f"{source.tensors[name].file}: tensor {name!r} has inf or nan values; the checkpoint "
                              f"may be corrupt")


def _write_config(staging: str, hf_config: dict, options: QuantizeOptions, ignored: list[str]) -> None:
    config = dict(hf_config)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "activation_scheme": options.activation_scheme,
        "ignored_layers": ignored,
        "weight_scheme": options.weight_scheme,  # n4's record; the scale's shape says the same to a reader
    }
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _files_to_copy(model: str) -> list[str]:
    """Every top-level file but the weights, their index and config.json: tokenizer files, generation_config.json,
    README, license. Subdirectories are not copied."""
    names = []
    for name in sorted(os.listdir(model)):
        if name == "config.json" or name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        if os.path.isfile(os.path.join(model, name)):
            names.append(name)
        else:
            log.info("not copying %s: only top-level files are copied", os.path.join(model, name))
    return names


@contextlib.contextmanager
def _staging_dir(output: str, overwrite: bool) -> Iterator[str]:
    """A fresh directory next to `output`, renamed to `output` when the block completes and deleted when it does
    not (exception or KeyboardInterrupt)."""
    parent, base = os.path.split(os.path.abspath(output))
    staging = tempfile.mkdtemp(prefix=f".{base}.n4-quantize-", dir=parent)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; OUT gets the usual permissions
        yield staging
        _sync_tree(staging)
        with signals.shielded():  # an interrupt between its two renames would leave no OUT at all
            _publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: str, output: str, overwrite: bool) -> None:
    """Rename `staging` to `output`. An existing output is first moved aside and deleted only after the rename,
    so that at every moment one complete checkpoint is at `output` or the old one is recoverable."""
    backup = None
    if os.path.lexists(output):
        if not overwrite:
            raise ValueError(f"--output {output} appeared while converting; pass --overwrite to replace it")
        backup = staging + ".old"
        os.rename(output, backup)
    try:
        os.rename(staging, output)
    except BaseException:
        if backup:
            os.rename(backup, output)
        raise
    _fsync_path(os.path.dirname(os.path.abspath(output)))
    if backup:  # best effort: the new checkpoint is in place whatever happens here
        if os.path.isdir(backup) and not os.path.islink(backup):
            shutil.rmtree(backup, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(backup)
        if os.path.lexists(backup):
            log.warning("could not remove the replaced output, now at %s", backup)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_tree(staging: str) -> None:
    """Flush every file of `staging` (config.json, the index and copied tokenizer files as well as the shards) and
    its directory entries to disk before the rename publishes it: the rename is made durable by syncing OUT's
    parent, and without this a crash just after it could leave an OUT that looks complete but has an empty
    config.json or tokenizer.model (delayed allocation). Shards are already synced by ShardWriter; syncing a
    clean file again costs nothing."""
    for name in os.listdir(staging):
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            _fsync_path(path)
    _fsync_path(staging)


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (opened read-only: Linux syncs through any descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
