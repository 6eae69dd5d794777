"""Ahead-of-time sm_90 compilation of Triton kernels on a machine without a GPU, and a harness that records the
kernel launches a public wrapper makes so that they can be compiled exactly as the GPU would see them.

- `aot_compile_sm90(jobs)` compiles jobs (kernel, signature, constexprs, divisibility attrs, launch options) for
  sm_90 in a subprocess without TRITON_INTERPRET, using the ptxas/cuobjdump bundled with the Triton wheel, and
  reports shared memory, local (spill/stack) bytes, registers, wgmma use and the SASS opcode counts.
  N4_AOT_TRITON_PATH (or the `triton_path` argument) puts another Triton (e.g. a `pip install --target` of the GPU
  machine's 3.6.0) first on the subprocess's PYTHONPATH, so the same jobs can be compiled by another version.
- `capture_launches()` (TRITON_INTERPRET=1 only) patches the interpreter's `InterpretedFunction.run`, which every
  `kernel[grid](...)` call goes through, to record the launch instead of running it; outputs stay as the wrapper
  allocated them. Inside it, `kernels.*` modules see `interpreting() == False` (what a GPU run sees, so the
  interpreter-only workarounds UPCAST / DOT_UPCAST / SOFT_E4M3 are off and the constexprs are the GPU's), except
  in the wrappers' `_check*` / `check_*` input validation, where True keeps CPU tensors acceptable.
  `torch.matmul` (the BF16 MLP's down projection after its Triton launch) returns an uninitialized tensor of the
  right shape instead of spending minutes on real-sized CPU matmuls.
- `launch_to_job(launch)` turns a recorded launch into a compile job with Triton's own launch-time
  specialization (`native_specialize_impl`, as `JITFunction.run` uses it): tensors -> '*bf16' etc. with
  tt.divisibility 16 when the data pointer is 16-byte aligned, ints -> i32/i64 (divisible by 16 -> the attr,
  == 1 -> constexpr 1), None -> constexpr None, floats -> fp32, bools -> u1.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[2]
SM90_SHARED_BYTES = 227 * 1024  # H100/H200: 228 KiB per SM, 227 KiB usable by one CTA

# Works with Triton 3.6 and 3.9 (same ASTSource/GPUTarget/compile API). Each job compiles on its own: a failure
# is reported with its error text and does not stop the others.
_AOT_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for job in json.loads(open(sys.argv[1]).read()):
    res = {"label": job["label"], "triton": triton.__version__}
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        ce = job["constexprs"]
        sig = {n: "constexpr" if n in ce else job["types"].get(n, "i32") for n in fn.arg_names}
        exact = job.get("exact_attrs", False)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in ce and (n in job["divisible"] or (not exact and sig[n].startswith("*")))}
        options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"], **job.get("options", {})}
        k = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        ops = {}
        for op in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M):
            ops[op] = ops.get(op, 0) + 1
        local = re.search(r"LOCAL:(\d+)", usage)
        regs = re.search(r"REG:(\d+)", usage)
        res.update({"shared": k.metadata.shared, "local": int(local.group(1)), "regs": int(regs.group(1)),
                    "wgmma": "wgmma.mma_async" in k.asm["ptx"],
                    "setmaxnreg": "setmaxnreg" in k.asm["ptx"], "tma": "cp.async.bulk.tensor" in k.asm["ptx"],
                    "cp_async_waits": sorted({int(n) for n in
                                              re.findall(r"cp\.async\.wait_group\s+(\d+)", k.asm["ptx"])}),
                    "sass_ops": ops})
    except Exception as e:
        res["error"] = (type(e).__name__ + ": " + str(e))[-3000:]
    results.append(res)
print(json.dumps(results))
"""


def _triton_dir(triton_path: str | None) -> Path:
    if triton_path:
        return Path(triton_path) / "triton"
    return Path(triton.__file__).parent


def aot_compile_sm90(jobs: list[dict], raise_on_error: bool = True, triton_path: str | None = None,
                     workers: int | None = None, timeout: int = 3600) -> list[dict]:
    """Compile kernels for sm_90 in subprocesses. Each job: module, kernel, types (non-constexpr args -> '*bf16',
    'i32', 'fp32'...; missing ones default to i32), constexprs, divisible (args the launcher sees as multiples of
    16; pointers are added unless exact_attrs), num_warps, num_stages, optional options (e.g. enable_fp_fusion),
    label. Returns per job, in order: shared bytes, local (spill/stack) bytes, registers, whether wgmma is used,
    sass_ops (SASS opcode -> count in the cubin, predicates dropped), cp_async_waits (the distinct N of the PTX's
    cp.async.wait_group N: N > 0 where a ring of shared-memory buffers keeps copy groups in flight while a tile is
    computed; only 0 where every wait drains all copies), the Triton version, or error (the exception
    text; raised as a test failure when raise_on_error)."""
    triton_path = triton_path if triton_path is not None else os.environ.get("N4_AOT_TRITON_PATH") or None
    bin_dir = _triton_dir(triton_path) / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip(f"no bundled ptxas/cuobjdump under {bin_dir}")
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in (triton_path, str(REPO), env.get("PYTHONPATH")) if p])
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    chunks = [jobs[i::workers] for i in range(workers)]  # round-robin: similar kernels spread over workers
    procs, files = [], []
    for chunk in chunks:
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="n4_aot_jobs_", delete=False) as f:
            json.dump(chunk, f)
        files.append(f.name)
        procs.append(subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, f.name], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for name in files:
            os.unlink(name)
    results: list[dict] = [{}] * len(jobs)
    for w, out in enumerate(outs):
        for j, res in enumerate(out):
            results[w + j * workers] = res
    if raise_on_error:
        errors = [r for r in results if "error" in r]
        assert not errors, "sm_90 compile failed:\n" + "\n".join(f"{r['label']}: {r['error']}" for r in errors)
    return results


# ------------------------------------------------------------------------------------------------ launch capture

@dataclass
class Launch:
    fn: object                     # the kernel's Python function
    grid: tuple
    args: dict                     # parameter name -> value, in declaration order (defaults applied)
    options: dict                  # num_warps, num_stages, enable_fp_fusion, ...
    label: str = ""


@dataclass
class Capture:
    launches: list[Launch] = field(default_factory=list)
    label: str = ""                # attached to launches recorded from now on


def _gpu_view_interpreting() -> bool:
    """interpreting() as a GPU run sees it (False), except inside input validation (`_check*`, `check_*`), where True
    keeps the CPU tensors of the capture acceptable."""
    caller = sys._getframe(1).f_code.co_name
    return caller.startswith(("_check", "check_"))


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch instead of running it (needs TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    import kernels.triton_utils as tu
    cap = Capture()
    original_run = InterpretedFunction.run
    original_matmul = torch.matmul

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return
        sig = inspect.signature(self.fn)
        call_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
        options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
        bound = sig.bind(*args, **call_kwargs)
        bound.apply_defaults()
        g = grid(bound.arguments) if callable(grid) else grid
        cap.launches.append(Launch(self.fn, tuple(g), dict(bound.arguments), options, cap.label))
        return

    def matmul_shape_only(a, b, *, out=None):
        shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        return torch.empty(shape, dtype=a.dtype, device=a.device)

    # Every kernels module is imported first: one imported inside the capture would bind the patched function (its
    # `from kernels.triton_utils import interpreting` reads the patched module attribute) and keep it afterwards.
    import kernels
    for info in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"kernels.{info.name}")
    original_interpreting = tu.interpreting  # kernels.triton_utils is among the patched modules itself
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("kernels.") and getattr(m, "interpreting", None) is original_interpreting]
    InterpretedFunction.run = run
    torch.matmul = matmul_shape_only
    for m in patched:
        m.interpreting = _gpu_view_interpreting
    try:
        yield cap
    finally:
        InterpretedFunction.run = original_run
        torch.matmul = original_matmul
        for m in patched:
            m.interpreting = original_interpreting


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann in ("tl.constexpr", "triton.language.constexpr", "constexpr") or ann is triton.language.constexpr


def launch_to_job(launch: Launch) -> dict:
    """A recorded launch -> an `aot_compile_sm90` job with Triton's launch-time specialization."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = inspect.signature(launch.fn).parameters
    types, constexprs, divisible = {}, {}, []
    for name, value in launch.args.items():
        if _is_constexpr(params[name]):
            constexprs[name] = value.value if isinstance(value, triton.language.constexpr) else value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":            # an int equal to 1, or None
            constexprs[name] = key
        else:
            types[name] = ty
            if key == "D":
                divisible.append(name)
    opts = dict(launch.options)
    num_warps = opts.pop("num_warps", 4)
    num_stages = opts.pop("num_stages", 3)
    return {"module": launch.fn.__module__, "kernel": launch.fn.__name__, "types": types, "constexprs": constexprs,
            "divisible": divisible, "exact_attrs": True, "num_warps": num_warps, "num_stages": num_stages,
            "options": opts, "label": launch.label}


def job_key(job: dict) -> str:
    return json.dumps({k: v for k, v in job.items() if k != "label"}, sort_keys=True)


def dedupe_jobs(jobs: list[dict]) -> list[dict]:
    """Identical compile jobs once; the label lists (up to 4 of) the launches that share it."""
    seen: dict[str, dict] = {}
    for job in jobs:
        key = job_key(job)
        if key in seen:
            seen[key]["uses"].append(job["label"])
        else:
            seen[key] = dict(job, uses=[job["label"]])
    out = []
    for job in seen.values():
        uses = job.pop("uses")
        job["label"] = "; ".join(uses[:4]) + (f" (+{len(uses) - 4} more)" if len(uses) > 4 else "")
        job["num_uses"] = len(uses)
        out.append(job)
    return out
