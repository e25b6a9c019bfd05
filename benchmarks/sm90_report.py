"""What the Triton kernels the engine launches look like compiled for Hopper (sm_90), no GPU needed.

    python -m sdrt.benchmarks.sm90_report --models sd15            # SD 1.5 at 512²
    python -m sdrt.benchmarks.sm90_report --models sd15,sd21 --out /tmp/sm90
    python -m sdrt.benchmarks.sm90_report --models sdxl,sdxl-turbo --name sm90_report_sdxl

A compile report, not a measurement: nothing runs on a GPU. For each model,
``launches.record_launches`` runs the engine's real networks at the model's real size on meta
tensors with a fake sm_90 Triton driver (the UNet at batch 2 with CFG, 1 for the Turbo models,
with the family's conditioning; the VAE decoder; each of the family's text encoders: SDXL has
two), once per conv path (``fused``: sdrt's GroupNorm+SiLU+conv kernel; ``unfused``: sdrt's
group_norm then cuDNN: ``ConvPathChooser`` may take either per shape on a GPU, so both are
covered). SDXL's VAE, which the pipeline decodes in float32 (``force_upcast``), is walked in
float32, in float16 (a VAE with ``force_upcast`` false) and in bfloat16 (``--vae-dtype
bf16``). Every distinct kernel
specialisation is compiled by the real Triton compiler and ptxas, into a fresh Triton cache
unless ``--warm-cache``, and its cubin read with the ``cuobjdump`` that ships in Triton's
wheel (``triton/backends/nvidia/bin``).

One row per distinct compiled kernel (identical specialisations launched by several layers,
networks, models or conv paths are one row; ``launches`` counts them). Columns:

- ``op``, ``kernel``, ``spec``: the sdrt op, the Triton kernel, its constexprs and warps /
  pipeline stages; ``example``: the op's first tensor argument at one launch (shape@strides);
  the JSON also has ``by model``: each model's first example and number of launches;
- ``regs``: registers a thread (255 is the ceiling: beyond it, spills);
- ``stack``: the stack frame in bytes (cuobjdump STACK); non-zero means spilled registers or
  local arrays, i.e. local-memory traffic; ``spill``: LDL + STL instructions in the SASS;
- ``smem``: dynamic shared memory in bytes (Triton's metadata);
- ``wgmma``: Hopper's warpgroup MMA: ``async`` when some ``wgmma.wait_group N`` keeps N > 0
  groups in flight (the MMA overlaps the next loads), ``sync`` when every wait drains to 0,
  ``-`` when none (FMA or mma.sync);
- ``cp.async``: LDGSTS instructions (asynchronous global→shared copies: a software
  pipeline); ``tma``: UTMALDG / UBLKCP (Tensor Memory Accelerator copies);
- ``ld2``: scalar 2-byte global loads (LDG.E.U16/S16) in the SASS: one fp16 element per
  instruction, a sign that Triton could not prove the addresses contiguous and aligned;
  ``ld16``: 16-byte global loads (LDG.E.128, 8 fp16 elements each). Counts are static
  instructions in the binary, not executions;
- ``compile_s``: wall seconds of the first launch of this specialisation (Triton's front
  end, LLVM and ptxas; from disk when the cache is warm); ``cpu_s``: the CPU seconds of the
  same (this process and ptxas), which other work on a shared machine does not inflate;
- ``clean``: no stack frame and at most ``MAX_SCALAR_LOADS`` scalar 2-byte loads.

Per model: the distinct kernels, how many are clean, and the first-compile seconds (Σ
compile_s and Σ cpu_s over them: the cold start a user waits through before the first
image, compiling one kernel at a time as the engine's warm-up does, on this machine).
Networks that fail to run are listed with their error. Writes ``NAME.json`` and ``NAME.md``
(``--name``, default ``sm90_report``) under ``--out`` (default ``benchmarks/results``).
"""
import argparse
import collections
import concurrent.futures
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from sdrt.benchmarks.launches import (CONV_PATHS, MODEL_SIZES, UNET_BATCH, model_networks,
                                      record_launches, uses_guidance, vae_upcast)

MAX_SCALAR_LOADS = 8
KIND = ("compile report: made on a CPU with a fake sm_90 driver; no kernel ran and nothing here "
        "was measured on a GPU (compile seconds are this machine's)")
# Networks whose kernels depend on the conv path: the text encoders have no convolution.
_CONV_NETWORKS = ("unet", "vae_decoder")
COLUMNS = ["op", "kernel", "spec", "example", "used in", "launches", "regs", "stack", "spill",
           "smem", "wgmma", "cp.async", "tma", "ld2", "ld16", "compile_s", "cpu_s", "clean"]
SUMMARY_COLUMNS = ["model", "image", "unet batch", "kernels", "clean", "with stack",
                   "first_compile_s", "first_compile_cpu_s"]


def _tool(name):
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _sass_ops(sass):
    """Counter of SASS opcodes (with modifiers) in ``cuobjdump -sass`` output."""
    return collections.Counter(re.findall(
        r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)", sass))


def analyse(compiled):
    """Resource use and instruction mix of one CompiledKernel's cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ops = _sass_ops(sass)

    def count(pattern):
        return sum(n for op, n in ops.items() if re.fullmatch(pattern, op))

    ptx = compiled.asm.get("ptx", "")
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    has_wgmma = count(r"HGMMA.*") > 0 or "wgmma.mma_async" in ptx
    return {
        "regs": int(usage.get("REG", 0)),
        "stack": int(usage.get("STACK", 0)),
        "spill": count(r"(LDL|STL)(\..*)?"),
        "smem": int(compiled.metadata.shared),
        "wgmma": ("async" if any(waits) else "sync") if has_wgmma else "-",
        "cp.async": count(r"LDGSTS(\..*)?"),
        "tma": count(r"(UTMALDG|UBLKCP)(\..*)?"),
        "ld2": count(r"LDG(\.[A-Z0-9_]+)*\.(U16|S16)(\..*)?"),
        "ld16": count(r"LDG(\.[A-Z0-9_]+)*\.128(\..*)?"),
    }


def _spec(launch):
    consts = ", ".join(f"{k}={v}" for k, v in launch.constants)
    return f"{consts}; warps={launch.num_warps} stages={launch.num_stages}"


def _example(launch):
    for _, v in launch.op_args:
        if hasattr(v, "shape"):
            return f"{'×'.join(map(str, v.shape))}@{','.join(map(str, v.stride))}"
    return ""


def walks(model):
    """(label, network, VAE dtype or None) of each walk a report makes of ``model``: its
    networks (``launches.model_networks``); a VAE the pipeline decodes in float32 (SDXL's,
    ``force_upcast``) is walked in float32 (``vae_decoder fp32``: what runs by default), in
    float16 (``vae_decoder fp16``: a VAE with ``force_upcast`` false, e.g. a fixed fp16 SDXL
    VAE) and in bfloat16 (``vae_decoder bf16``: ``--vae-dtype bf16``), since the fused
    convolution runs only in fp16/bf16."""
    out = []
    for network in model_networks(model):
        if network == "vae_decoder" and vae_upcast(model):
            out += [(f"vae_decoder {name}", network, dtype) for name, dtype in
                    (("fp32", torch.float32), ("fp16", torch.float16),
                     ("bf16", torch.bfloat16))]
        else:
            out.append((network, network, None))
    return out


def collect(models, paths=CONV_PATHS, cache_dir=None):
    """(rows, per-model summaries, errors) for ``models``; see the module docstring."""
    groups = {}          # Launch.key → {"launch", "uses", "launches", "compile_s"}
    per_model = collections.defaultdict(set)
    errors = []
    for model in models:
        for path in paths:
            for label, network, vae_dtype in walks(model):
                if path != paths[0] and network not in _CONV_NETWORKS:
                    continue  # no convolution: the same launches under every conv path
                try:
                    launches = record_launches(model, (network,), conv_path=path,
                                               cache_dir=cache_dir, vae_dtype=vae_dtype)
                except Exception as e:  # a network that does not run is a finding, reported
                    errors.append({"model": model, "conv path": path, "network": label,
                                   "error": f"{type(e).__name__}: {e}"})
                    continue
                for la in launches:
                    g = groups.setdefault(la.key, {"launch": la, "uses": set(), "launches": 0,
                                                   "compile_s": 0.0, "cpu_s": 0.0,
                                                   "by model": {}})
                    mine = g["by model"].setdefault(model, {"example": _example(la),
                                                            "launches": 0})
                    mine["launches"] += 1
                    g["uses"].add(f"{model} {label}" + (f" {path}" if network in
                                                        _CONV_NETWORKS else ""))
                    g["launches"] += 1
                    g["compile_s"] = max(g["compile_s"], la.compile_s)
                    g["cpu_s"] = max(g["cpu_s"], la.compile_cpu_s)
                    per_model[model].add(la.key)
    # cuobjdump runs as a child process: two at a time overlap its start-up.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        analyses = dict(zip(groups, pool.map(lambda g: analyse(g["launch"].compiled),
                                             groups.values())))
    rows = {}
    for key, g in groups.items():
        la = g["launch"]
        row = {"op": la.op, "kernel": la.kernel, "spec": _spec(la), "example": _example(la),
               "used in": ", ".join(sorted(g["uses"])), "launches": g["launches"],
               **analyses[key], "compile_s": round(g["compile_s"], 2),
               "cpu_s": round(g["cpu_s"], 2), "by model": g["by model"]}
        row["clean"] = row["stack"] == 0 and row["ld2"] <= MAX_SCALAR_LOADS
        rows[key] = row
    summaries = []
    for model in models:
        mine = [rows[k] for k in per_model[model]]
        summaries.append({"model": model, "image": MODEL_SIZES[model],
                          "unet batch": UNET_BATCH if uses_guidance(model) else 1,
                          "kernels": len(mine),
                          "clean": sum(r["clean"] for r in mine),
                          "with stack": sum(r["stack"] > 0 for r in mine),
                          "first_compile_s": round(sum(r["compile_s"] for r in mine), 1),
                          "first_compile_cpu_s": round(sum(r["cpu_s"] for r in mine), 1)})
    order = sorted(rows.values(), key=lambda r: (r["op"], r["kernel"], r["spec"]))
    return order, summaries, errors


def problems(rows, errors=()):
    """What the report's judge (tests/test_sm90_report.py) refuses, one line each."""
    out = [f"{e['model']} {e['network']} ({e['conv path']} convs) does not run: {e['error']}"
           for e in errors]
    for r in rows:
        if r["stack"]:
            out.append(f"{r['kernel']} [{r['spec']}] has a {r['stack']}-byte stack frame "
                       f"({r['regs']} registers, {r['spill']} spill instructions)")
        if r["ld2"] > MAX_SCALAR_LOADS:
            out.append(f"{r['kernel']} [{r['spec']}] has {r['ld2']} scalar 2-byte loads "
                       f"(at most {MAX_SCALAR_LOADS})")
    return out


def _markdown(rows, summaries, errors, notes):
    from sdrt.benchmarks.common import markdown_table
    parts = ["# sdrt kernels compiled for sm_90", "", *notes, "", "## Per model", "",
             markdown_table(summaries, SUMMARY_COLUMNS), ""]
    if errors:
        parts += ["## Networks that did not run", "",
                  markdown_table(errors, ["model", "network", "conv path", "error"]), ""]
    parts += ["## Kernels", "", markdown_table(rows, COLUMNS), ""]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sd15,sd21",
                    help=f"comma-separated, from {', '.join(MODEL_SIZES)}")
    ap.add_argument("--paths", default=",".join(CONV_PATHS), help="conv paths to cover")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="sm90_report",
                    help="file stem of the report (default %(default)s: NAME.json, NAME.md)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use Triton's default cache instead of a fresh one (compile_s then "
                         "measures cache loads, not compiles)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    paths = tuple(p for p in args.paths.split(",") if p)
    for m in models:
        if m not in MODEL_SIZES:
            ap.error(f"unknown model {m}; choose from {', '.join(MODEL_SIZES)}")
    import torch
    import triton
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cold:
        rows, summaries, errors = collect(models, paths, None if args.warm_cache else cold)
    wall = time.perf_counter() - start
    found = problems(rows, errors)
    from sdrt.benchmarks.common import cpu_name
    notes = [f"**{KIND}.**", "",
             f"triton {triton.__version__}, torch {torch.__version__}, {cpu_name()}, "
             f"{os.cpu_count()} CPUs; {'warm' if args.warm_cache else 'cold'} Triton cache; "
             f"{wall:.0f} s wall.",
             f"clean: no stack frame and at most {MAX_SCALAR_LOADS} scalar 2-byte loads.",
             f"{len(found)} problem(s)" + (":" if found else ".")] + [f"- {p}" for p in found]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"kind": KIND, "triton": triton.__version__, "torch": torch.__version__,
               "cpu": cpu_name(), "cpus": os.cpu_count(), "models": models,
               "conv_paths": list(paths), "cold_cache": not args.warm_cache,
               "wall_s": round(wall, 1), "summary": summaries, "errors": errors,
               "problems": found, "kernels": rows}
    json_path, md_path = out / f"{args.name}.json", out / f"{args.name}.md"
    json_path.write_text(json.dumps(payload, indent=1))
    md_path.write_text(_markdown(rows, summaries, errors, notes))
    from sdrt.benchmarks.common import markdown_table
    print(markdown_table(summaries, SUMMARY_COLUMNS))
    for p in found:
        print("-", p)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
