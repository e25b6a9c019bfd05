"""Timing and reporting shared by sdrt's benchmarks. GPU only; nothing here runs at import.

- ``cuda_time``: median of many CUDA-event timings after a warm-up, optionally with L2 flushed
  before each repeat so inputs come from device memory rather than the cache.
- ``ceilings``: the two measured roofs, device-to-device copy bandwidth (bytes read + written)
  and the fp16/bf16 matrix-product rate, against which achieved numbers are stated.
- ``device_info``: GPU, driver and library versions, recorded with every result.
- ``write_report``: JSON + markdown, named after the GPU, under ``default_results_dir()``:
  ``benchmarks/results/`` unless ``SDRT_RESULTS_DIR`` names another folder (``gpu_session``
  sets it for the benchmarks it runs).

``host_time``, ``host_info`` and ``ceilings(device="cpu", ...)`` are the same measurements on
the CPU, for dry runs of the GPU scripts: they check the code path, and their numbers are no
measurement of anything that matters.
"""
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sdrt.kernels.conv_autotune import HEAD_START_CYCLES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DRY_RUN_LABEL = "dry run, not a measurement"
# Zeroed between timed repeats when flushing: larger than any L2 so far (H100 50 MB, H200 60).
_FLUSH_BYTES = 256 << 20


def default_results_dir() -> Path:
    """Where reports go: ``$SDRT_RESULTS_DIR`` if set (read at each call), else RESULTS_DIR."""
    return Path(os.environ.get("SDRT_RESULTS_DIR") or RESULTS_DIR)


def require_cuda(what: str) -> None:
    """Exit with a clear message when there is no CUDA GPU to measure."""
    if not torch.cuda.is_available():
        sys.exit(f"{what}: needs a CUDA GPU and none is visible; nothing was measured.")


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    flush_l2: bool


def cuda_time(fn, *, warmup: int = 25, repeats: int = 100, flush_l2: bool = True) -> Timing:
    """Time ``fn()`` on the current stream with CUDA events: the median of ``repeats`` runs.

    ``warmup`` untimed calls first (JIT compilation, autotuning, allocator growth). With
    ``flush_l2`` an L2-sized buffer is zeroed before each repeat, outside the timed region.
    Then the GPU sleeps ~1 ms, also outside it, so that the CPU enqueues ``fn``'s kernels ahead
    of the GPU: the events time the GPU's work, not Python's launch overhead (which CUDA-graph
    replay does not pay). A ``fn`` that synchronises with the host still includes its gaps.
    """
    for _ in range(warmup):
        fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        torch.cuda._sleep(HEAD_START_CYCLES)  # the CPU gets ahead of the GPU
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], repeats, flush_l2)


def host_time(fn, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """``cuda_time``'s CPU counterpart for dry runs: median wall time of ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], repeats, False)


def time_on(device: str, fn, *, warmup: int, repeats: int) -> Timing:
    """``cuda_time`` (L2 not flushed) on a CUDA device, ``host_time`` on the CPU."""
    if torch.device(device).type == "cuda":
        return cuda_time(fn, warmup=warmup, repeats=repeats, flush_l2=False)
    return host_time(fn, warmup=warmup, repeats=repeats)


def first_call_ms(fn) -> float:
    """Wall time of one synchronised call: for a Triton kernel's first call, its JIT compile
    (or load from Triton's cache). Reported apart from steady-state time."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Device-to-device copy rate in GB/s, counting the bytes read and the bytes written."""
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    t = time_on(device, lambda: dst.copy_(src), warmup=5, repeats=30)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(dtype=torch.float16, n: int = 8192, device: str = "cuda") -> float:
    """Rate of an n×n×n matrix product through torch (cuBLAS) on random data, in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_on(device, lambda: a @ b, warmup=5, repeats=30)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def ceilings(device: str = "cuda", copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict:
    """The measured roofs: copy bandwidth and fp16/bf16 matrix-product rates. On the CPU
    (dry runs, small sizes) the same code path, labelled as no measurement."""
    out = {"copy_gbs": copy_bandwidth_gbs(copy_bytes, device),
           "matmul_fp16_tflops": matmul_tflops(torch.float16, matmul_n, device),
           "matmul_bf16_tflops": matmul_tflops(torch.bfloat16, matmul_n, device)}
    if torch.device(device).type != "cuda":
        out["label"] = DRY_RUN_LABEL
    return out


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    import numpy
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def device_info() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2 ** 30, 1),
        "driver": _driver_version(),
        **_versions(),
    }


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the CPU benchmarks' reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(dists) -> dict:
    """Python's version and each named distribution's (None where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def host_info() -> dict:
    """``device_info``'s fields for a dry run on the CPU: the GPU is named as none."""
    return {"gpu": f"CPU ({DRY_RUN_LABEL})", "compute_capability": None, "multiprocessors": None,
            "memory_gib": None, "driver": None, "processor": platform.processor() or platform.machine(),
            **_versions()}


def run_group(cmd, timeout, *, env=None, cwd=None, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE):
    """Run ``cmd`` as the leader of a new process group and wait at most ``timeout`` seconds;
    past that, kill the whole group (a benchmark's workers and torch.compile's compile pool
    with it, not only the child). Returns (exit status, or None when it timed out; stdout;
    stderr), the outputs as text when piped."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=True,
                            preexec_fn=os.setpgrp)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except BaseException:  # the timeout, or this process being interrupted: no orphans left
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        if sys.exc_info()[0] is subprocess.TimeoutExpired:
            return None, out, err
        raise


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(name: str, info: dict, ceiling: dict, sections: dict, notes: list = (),
                 results_dir: Path = None) -> tuple:
    """Write ``{name}_{gpu}.json`` and ``.md`` under ``results_dir`` (default:
    ``default_results_dir()``). ``sections`` maps a title to (rows, columns).

    Returns the two paths.
    """
    results_dir = Path(results_dir) if results_dir is not None else default_results_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{name}_{gpu_slug(info['gpu'])}"
    payload = {"benchmark": name, "device": info, "ceilings": ceiling,
               "notes": list(notes),
               "sections": {title: rows for title, (rows, _) in sections.items()}}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    md = [f"# {name} on {info['gpu']}", "",
          f"driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}, "
          f"triton {info['triton']}, numpy {info.get('numpy')}, {info['date']}", "",
          *([f"**{ceiling['label']}**", ""] if "label" in ceiling else []),
          f"Measured ceilings: copy {ceiling['copy_gbs']:.0f} GB/s (read + write), "
          f"matmul fp16 {ceiling['matmul_fp16_tflops']:.0f} TFLOP/s, "
          f"bf16 {ceiling['matmul_bf16_tflops']:.0f} TFLOP/s.", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    for title, (rows, columns) in sections.items():
        md += [f"## {title}", "", markdown_table(rows, columns), ""]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(md))
    return json_path, md_path
