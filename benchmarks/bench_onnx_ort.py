"""ONNX Runtime on the CPU: sdrt's plain ONNX export against the same export after ONNX
Runtime's Stable Diffusion optimizer (``sdrt export onnx --optimize ort --target cpu``).

The model is SD 1.5's real architecture with random weights (``engine.tiny.write_model`` of
``configs.model_config("sd15")``), exported once at a small static size; the optimized copy is
the same files through ``export.onnx_optimize.optimize_folder``. Each network runs in one
onnxruntime session per variant, in this process, on fresh non-zero-mean inputs: warm-up
calls, then the median (and min, max) of timed calls, the two variants interleaved call by
call so that a neighbour's load on a shared machine hits both alike. The CPU target keeps
only the fusions whose operators the CPU provider has (LayerNorm, SkipLayerNorm, GELU,
attention); the CUDA target's GroupNorm/BiasSplitGelu/NhwcConv do not run on a CPU.

    python -m sdrt.benchmarks.bench_onnx_ort --size 128 --repeats 5

Writes ``onnx_ort_cpu.json`` and ``.md`` under ``benchmarks/results/`` (``--out`` moves them).
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings

import numpy as np

from sdrt.benchmarks.common import cpu_name, default_results_dir, package_versions
from sdrt.export.onnx_manifest import FILES, MODELS, read_manifest

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64}


def _feeds(session, rng):
    """Random inputs at the session's static shapes; ids in CLIP's vocabulary."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 49408, shape).astype(np.int64)
        elif i.name == "timestep":
            feeds[i.name] = np.asarray(rng.uniform(1, 999), dtype=_NUMPY[i.type]).reshape(shape)
        else:
            feeds[i.name] = (0.3 + rng.standard_normal(shape)).astype(_NUMPY[i.type])
    return feeds


def _session(path, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - t0


def measure(folders, warmup, repeats, threads):
    """{network: {variant: {median_ms, min_ms, max_ms, session_s}}}, variants interleaved."""
    rng = np.random.default_rng(0)
    results = {}
    for name in MODELS:
        sessions = {v: _session(os.path.join(f, FILES[name]), threads)
                    for v, f in folders.items()}
        feeds = _feeds(sessions["plain"][0], rng)
        times = {v: [] for v in folders}
        for i in range(warmup + repeats):
            for v, (session, _) in sessions.items():
                t0 = time.perf_counter()
                session.run(None, feeds)
                if i >= warmup:
                    times[v].append((time.perf_counter() - t0) * 1e3)
        results[name] = {v: {"median_ms": statistics.median(t), "min_ms": min(t),
                             "max_ms": max(t), "session_s": round(sessions[v][1], 2)}
                         for v, t in times.items()}
        print(name, {v: round(r["median_ms"], 1) for v, r in results[name].items()}, flush=True)
    return results


def markdown(report):
    lines = ["# ONNX Runtime on the CPU: plain export vs --optimize ort --target cpu", "",
             f"SD 1.5 architecture, random weights, {report['size']}×{report['size']} pixels "
             f"(latents {report['size'] // 8}×{report['size'] // 8}), static shapes: UNet "
             "batch 2 (both guidance halves), the others batch 1. CPU: "
             f"{report['cpu']}, {report['threads'] or 'default'} threads. Median of "
             f"{report['repeats']} calls after {report['warmup']} warm-up calls, the two "
             "variants interleaved.", "",
             "| network | plain, ms: median (min–max) | optimized, ms: median (min–max) | "
             "speed-up (medians) | fused by ORT |",
             "| --- | ---: | ---: | ---: | --- |"]
    span = lambda r: f"{r['median_ms']:.0f} ({r['min_ms']:.0f}–{r['max_ms']:.0f})"
    for name in MODELS:
        r = report["results"][name]
        fused = ", ".join(f"{n} {op}" for op, n in report["fused"][name].items() if n)
        lines.append(f"| {name} | {span(r['plain'])} | {span(r['optimized'])} | "
                     f"{r['plain']['median_ms'] / r['optimized']['median_ms']:.2f}× | "
                     f"{fused or '-'} |")
    if report.get("note"):
        lines += ["", report["note"]]
    lines += ["", f"Export {report['export_seconds']} s; ORT optimizer "
              f"{report['optimize_seconds']} s. Versions: " +
              ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    p.add_argument("--out", default=None, help="results folder")
    p.add_argument("--note", default="", help="a sentence for the report (the machine's load)")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from sdrt.engine.configs import model_config
    from sdrt.engine.tiny import write_model
    from sdrt.export import export_onnx
    from sdrt.export.onnx_optimize import optimize_folder
    work = tempfile.mkdtemp(prefix="bench-onnx-ort-")
    try:
        model = os.path.join(work, "sd15")
        write_model(model, model_config("sd15"))
        t0 = time.perf_counter()
        plain = os.path.join(work, "plain")
        export_onnx(model, plain, height=a.size, width=a.size)
        export_s = time.perf_counter() - t0
        shutil.rmtree(model)  # 4 GB of safetensors no longer needed
        optimized = os.path.join(work, "optimized")
        shutil.copytree(plain, optimized)
        t0 = time.perf_counter()
        manifest = optimize_folder(optimized, read_manifest(optimized), "cpu", fp16=False,
                                   check=False)
        optimize_s = time.perf_counter() - t0
        results = measure({"plain": plain, "optimized": optimized}, a.warmup, a.repeats,
                          a.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "bench_onnx_ort", "size": a.size, "warmup": a.warmup,
              "repeats": a.repeats, "threads": a.threads, "cpu": cpu_name(),
              "versions": package_versions(["onnxruntime", "onnx", "torch", "numpy"]),
              "export_seconds": round(export_s, 1), "optimize_seconds": round(optimize_s, 1),
              "load_average": os.getloadavg(), "note": a.note,
              "fused": manifest["optimized"]["fused"], "results": results}
    out = a.out or default_results_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "onnx_ort_cpu.json"), "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(out, "onnx_ort_cpu.md"), "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
