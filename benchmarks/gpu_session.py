"""One command for a lent GPU: environment and ceilings, the GPU tests, the kernel and conv
benchmarks with the block-table sweep, and the SD 1.5 pipeline against diffusers; SDXL's
kernels, convs and pipelines (base 1024², Turbo 512²) as extras for a second call.

    python -m sdrt.benchmarks.gpu_session --out DIR [--budget SECONDS] [--stage env,tests,...]
                                          [--dry-run]

Each stage runs as a child process (its own process group) under its own time limit, cut to
what is left of ``--budget``; a stage that does not fit is skipped. Everything lands in DIR at
most 7 files, rewritten as soon as each stage ends, so a run stopped at the device's limit
keeps every stage that finished:

- ``session.json``: every stage's status, seconds, limit, command and results (the benchmarks'
  own JSON reports, the test counts and failures), the environment and the ceilings;
- ``session.md``: the same as a summary, with the benchmarks' markdown tables;
- ``session.log``: every child's output;
- ``pytest-gpu.xml``: the GPU tests' JUnit report;
- ``conv_sweep_best.json``: the fastest block configuration per fused-conv shape, from
  ``bench_conv --sweep``, with the GPU it was measured on;
- ``bench_pipeline.png``: the pipeline bar chart;
- ``triton-cache.tar.gz``: Triton's compiled kernels (``*.json``, ``*.cubin``, ``*.so``),
  to carry into the next device call (see benchmarks/README.md).

Stages, in order (``--stage`` picks some; the extras run only when the budget still allows):

- ``env`` (a): GPU, driver, CUDA, torch, triton and numpy versions; the two ceilings (device
  copy GB/s, fp16/bf16 matmul TFLOP/s); one kernel's first call with an empty Triton cache (the
  compile seconds a cold start pays);
- ``tests`` (b): ``pytest -m gpu`` (tests that need diffusers skip where it is missing);
- ``kernels`` (c): ``bench_kernels --models sd15``;
- ``conv`` (c): ``bench_conv --sweep``, and the best block configuration per shape;
- ``pipeline`` (d): ``bench_pipeline``, SD 1.5 512², sdrt (Triton + CUDA graphs) against
  diffusers eager when diffusers is installed (else against sdrt on the PyTorch ops);
- extras: ``kernels-sweep`` (``bench_kernels --ops attention --sweep``: the attention block
  table against ``attention.SWEEP_BLOCKS`` at each SD 1.5 shape, the fastest per shape in its
  report), ``pipeline-compile`` (diffusers + torch.compile max-autotune, SD 1.5),
  ``pipeline-sd21`` (SD 2.1 768²), ``pipeline-inpaint`` (SD 1.5 512² inpainting, 50 and 20
  steps at strength 1: sdrt's inpainting plan against diffusers' StableDiffusionInpaintPipeline
  eager, the same UNet), ``pipeline-controlnet`` (SD 1.5 512², 50 and 20 steps with one
  random-weight SD 1.5 ControlNet: sdrt's plan with the ControlNet in its captured loop
  against diffusers' StableDiffusionControlNetPipeline eager), ``pipeline-ip-adapter`` (SD 1.5
  512², 50 and 20 steps with a random-weight plain IP-Adapter and ViT-H/14 image encoder:
  sdrt's plan with the image tokens in its buffers against diffusers' load_ip_adapter eager),
  ``upscale`` (``bench_upscale``: the ESRGAN family's and SPAN's released configs at 512² and
  1024² inputs, fp16, whole picture vs NCHW vs tiled, conv TFLOP/s and peak memory),
  and SDXL's four (``--stage sdxl`` names them all):
  ``kernels-sdxl`` (bench_kernels at SDXL's shapes: 128² latents, head dim 64, the 1024² VAE
  decoder's float32 GroupNorms), ``conv-sdxl`` (bench_conv --sweep over SDXL's UNet and fp16
  VAE decoder convs), ``pipeline-sdxl`` (SDXL 1024², 50 and 20 steps with CFG) and
  ``pipeline-sdxl-turbo`` (512², 4 and 1 steps without CFG), each sdrt (Triton + CUDA graphs)
  against diffusers' StableDiffusionXLPipeline eager (else against sdrt on the PyTorch ops);
  Turbo also with the VAE in bf16 (``sdrt-triton-bf16vae``) instead of float32.

Named extras keep their floors in reserve as core stages do; extras not named take only what
the core stages leave. ``--stage env,sdxl --budget 540`` fits one device call: the SDXL
stages' limits add up to more than the budget, so each is cut to leave the later ones their
floors (``pipeline-sdxl`` then has about 240 s, its floor).

The per-stage limits are estimates for an H100/H200 with a warm Triton cache, not
measurements. ``--dry-run`` runs the same stages on the CPU with tiny shapes in about two
minutes on a shared 2-core machine (ceilings on small CPU tensors, the kernel probe under
Triton's interpreter, the GPU tests collected and skipped, bench_kernels' and bench_conv's
command lines with each stage's model, the pipelines on tiny models of the same families:
SD 1.x, SDXL, SDXL-Turbo; not ``pipeline-compile`` nor ``pipeline-sd21``, whose CPU forms
would repeat ``pipeline``'s): a check that this script works, labelled "dry run, not a
measurement" everywhere, and no figure from it is a result.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from sdrt.benchmarks import common

REPO = Path(__file__).resolve().parent.parent
# Triton records absolute paths in its cache, so a carried cache must come back to the same
# path on every machine: a fixed one under /tmp rather than one inside the checkout.
DEFAULT_TRITON_CACHE = Path("/tmp/sdrt-triton-cache")
DEFAULT_CARRIED_CACHE = REPO / ".gpu-carry" / "triton-cache.tar.gz"
CACHE_SUFFIXES = (".json", ".cubin", ".so")  # what a cache hit reads; not the IR dumps
FILES = {"json": "session.json", "md": "session.md", "log": "session.log",
         "junit": "pytest-gpu.xml", "conv_best": "conv_sweep_best.json",
         "chart": "bench_pipeline.png", "cache": "triton-cache.tar.gz"}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    limit_s: int        # its own time limit on a GPU (an estimate, see the module docstring)
    floor_s: int        # run only if at least this much is left for it
    extra: bool = False  # runs only when named, or when the budget allows after the others
    model: str = "sd15"  # the model whose shapes or pipeline the stage measures
    dry: bool = True    # runs in a dry run (an extra whose CPU form checks nothing new: not)
    setup_s: int = 40   # pipeline stages: kept for writing the random-weight model (estimate)

    @property
    def kind(self) -> str:
        """What it runs: "env", "tests", "kernels", "conv", "upscale" or "pipeline" (its
        name's first word: ``kernels-sdxl`` is a ``kernels`` stage for another model)."""
        return self.name.split("-")[0]


STAGES = (
    Stage("env", "(a) environment, ceilings, cold compile of one kernel", 60, 20),
    Stage("tests", "(b) pytest -m gpu", 150, 60),
    Stage("kernels", "(c) bench_kernels, SD 1.5 shapes", 90, 40),
    Stage("conv", "(c) bench_conv --sweep, SD 1.5 shapes", 120, 50),
    Stage("pipeline", "(d) SD 1.5 512² pipeline: sdrt vs diffusers eager", 200, 120),
    Stage("kernels-sweep", "bench_kernels --ops attention --sweep, SD 1.5 shapes", 150, 60,
          extra=True),
    Stage("pipeline-compile", "diffusers + torch.compile (max-autotune), SD 1.5", 400, 240,
          extra=True, dry=False),
    Stage("pipeline-sd21", "SD 2.1 768² pipeline: sdrt vs diffusers eager", 240, 150,
          extra=True, model="sd21", dry=False),
    # SDXL (``--stage sdxl`` names these four): a second device call's worth.
    Stage("kernels-sdxl", "bench_kernels, SDXL 1024² shapes (128² latents)", 120, 50,
          extra=True, model="sdxl"),
    Stage("conv-sdxl", "bench_conv --sweep, SDXL UNet and 1024² VAE decoder", 180, 60,
          extra=True, model="sdxl"),
    Stage("pipeline-sdxl", "SDXL 1024² pipeline: sdrt vs diffusers eager", 420, 240,
          extra=True, model="sdxl", setup_s=90),
    Stage("pipeline-sdxl-turbo", "SDXL-Turbo 512², 4 and 1 steps: sdrt vs diffusers eager",
          240, 150, extra=True, model="sdxl-turbo", setup_s=90),
    Stage("pipeline-inpaint", "SD 1.5 512² inpainting: sdrt's plan vs diffusers eager", 200,
          120, extra=True, model="sd15-inpaint"),
    Stage("pipeline-controlnet", "SD 1.5 512² with one ControlNet: sdrt's plan vs diffusers "
          "eager", 220, 130, extra=True, model="sd15-controlnet", setup_s=60),
    Stage("pipeline-ip-adapter", "SD 1.5 512² with an IP-Adapter: sdrt's plan vs diffusers "
          "eager", 220, 130, extra=True, model="sd15-ip-adapter", setup_s=70),
    Stage("upscale", "bench_upscale: ESRGAN ×4, Real-ESRGAN ×2, compact ×4, SPAN ×4 at 512² "
          "and 1024²",
          150, 60, extra=True, model="esrgan"),
)
BY_NAME = {s.name: s for s in STAGES}
DRY_BUDGET_S = 240
# Names for several stages at once.
GROUPS = {"sdxl": ("kernels-sdxl", "conv-sdxl", "pipeline-sdxl", "pipeline-sdxl-turbo")}
DRY_FLOOR_S = 5


def floor(stage: Stage, dry_run: bool) -> int:
    return DRY_FLOOR_S if dry_run else stage.floor_s


def stage_timeout(todo: list, i: int, left: float, named: set, dry_run: bool) -> int:
    """The time limit of ``todo[i]`` with ``left`` seconds of the budget left: its own limit,
    cut so that every later core stage, and every later extra named on the command line,
    keeps its floor in reserve (a named extra itself keeps them too); an extra that was not
    named takes what is left."""
    st = todo[i]
    keeps = not st.extra or st.name in named
    reserve = sum(floor(s, dry_run) for s in todo[i + 1:] if not s.extra or s.name in named)
    return int(min(st.limit_s, left - (reserve if keeps else 0)))


def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


# -- what each stage runs ------------------------------------------------------------------------

def stage_command(stage: Stage, work: Path, dry_run: bool, timeout: int) -> tuple:
    """(argv, extra environment) of the stage's child process."""
    py = [sys.executable]
    if stage.name == "env":
        cmd = py + ["-m", "sdrt.benchmarks.gpu_session", "--child-env", str(work / "env.json")]
        # An empty cache of its own: the kernel's first call is a cold compile.
        env = {"TRITON_CACHE_DIR": str(work / "cold-triton-cache")}
        if dry_run:
            cmd.append("--dry-run")
            env.update(TRITON_INTERPRET="1", SDRT_BACKEND="triton")
        return cmd, env
    if stage.name == "tests":
        return py + ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                     f"--junitxml={work / FILES['junit']}"], {}
    # bench_kernels and bench_conv have no CPU path that fits a dry run (bench_conv --list
    # compiles every conv kernel for sm_90: minutes on a CPU): their command lines, with the
    # stage's model (an unknown one is refused before --help), are checked. Each stage
    # reports into a folder of its own (work / stage name).
    if stage.kind == "kernels":
        cmd = py + ["-m", "sdrt.benchmarks.bench_kernels", "--models", stage.model]
        if stage.name == "kernels-sweep":
            cmd += ["--ops", "attention", "--sweep"]
        if dry_run:
            return cmd + ["--help"], {}
        return cmd, {"SDRT_RESULTS_DIR": str(work / stage.name)}
    if stage.kind == "upscale":
        cmd = py + ["-m", "sdrt.benchmarks.bench_upscale"]
        return cmd + ["--dry-run"] * dry_run, {"SDRT_RESULTS_DIR": str(work / stage.name)}
    if stage.kind == "conv":
        cmd = py + ["-m", "sdrt.benchmarks.bench_conv", "--models", stage.model]
        if dry_run:
            return cmd + ["--help"], {}
        return cmd + ["--sweep"], {"SDRT_RESULTS_DIR": str(work / stage.name)}
    # the pipeline stages: bench_pipeline into one folder, so the report grows stage by stage
    model = stage.model
    if stage.name == "pipeline-compile":
        systems = ["diffusers-compile"]
    elif _has_diffusers():
        systems = ["diffusers", "sdrt-triton"]
    else:
        systems = ["sdrt-torch", "sdrt-triton"]
    if stage.name == "pipeline-sdxl-turbo":
        # At 1 step the VAE's float32 decode weighs most: time the bf16 VAE too, last (the
        # rows before it are kept if the stage's limit cuts it).
        systems.append("sdrt-triton-bf16vae")
    args = ["--out-dir", str(work / "pipeline"), "--cache", str(work / "models")]
    if dry_run:  # the model's tiny stand-in of the same family (bench_pipeline's)
        args += ["--dry-run", "--models", model, "--systems", "sdrt-torch"]
    else:
        # diffusers runs first and leaves the reference image; each system may take what is
        # left after the random-weight model is written (``setup_s`` kept for that).
        args += ["--models", model, "--systems", ",".join(systems), "--repeats", "3",
                 "--timeout", str(max(30, timeout - stage.setup_s))]
    return py + ["-m", "sdrt.benchmarks.bench_pipeline"] + args, {}


def _read_reports(folder: Path, prefix: str) -> dict:
    """The benchmark's JSON report(s) and markdown found in ``folder``."""
    found = {"reports": [], "markdown": []}
    for path in sorted(folder.glob(f"{prefix}*.json")):
        found["reports"].append(json.loads(path.read_text()))
    for path in sorted(folder.glob(f"{prefix}*.md")):
        found["markdown"].append(path.read_text())
    return found


def _junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems, skips = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                problems.append({"test": name, tag: (el.get("message") or "")[:500]})
        for el in case.findall("skipped"):
            reason = (el.get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
    return {**counts, "problems": problems, "skip_reasons": skips}


def _parse_block_config(text: str) -> dict:
    """bench_conv's '128/64/32 w4 s3' → block_m, block_n, block_k, num_warps, num_stages."""
    blocks, warps, stages = text.split()
    m, n, k = (int(v) for v in blocks.split("/"))
    return {"block_m": m, "block_n": n, "block_k": k, "num_warps": int(warps[1:]),
            "num_stages": int(stages[1:])}


SHAPE_KEYS = ("n", "cin", "h", "w", "cout", "k", "stride", "padding", "groups", "eps", "add")


def conv_sweep_best(reports: list) -> dict:
    """From bench_conv's report: per shape, the fastest swept block configuration, the
    current table's time and the best time, with the GPU and versions they were measured on."""
    rows = []
    for report in reports:
        for title, section in report.get("sections", {}).items():
            if "sweep" in title:
                continue  # the sweep section repeats the shape rows
            for r in section:
                if r.get("sweep_best_config"):
                    rows.append({"shape": {k: r.get(k) for k in SHAPE_KEYS},
                                 "label": r.get("shape"), "network": title.split(" (")[0],
                                 "best": _parse_block_config(r["sweep_best_config"]),
                                 "best_ms": r.get("sweep_best_ms"),
                                 "table_ms": r.get("fused_ms")})
    device = reports[0].get("device", {}) if reports else {}
    return {"measured_on": {k: device.get(k) for k in ("gpu", "driver", "cuda", "torch",
                                                        "triton", "date")},
            "shapes": rows}


def collect(stage: Stage, work: Path, out: Path) -> dict:
    """The stage's results, read from what its child wrote; artefacts copied into ``out``."""
    if stage.name == "env":
        path = work / "env.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    if stage.name == "tests":
        path = work / FILES["junit"]
        if not path.is_file():
            return {}
        (out / FILES["junit"]).write_bytes(path.read_bytes())
        return _junit_summary(path)
    if stage.kind == "kernels":
        return _read_reports(work / stage.name, "bench_kernels")
    if stage.kind == "upscale":
        return _read_reports(work / stage.name, "bench_upscale")
    if stage.kind == "conv":
        found = _read_reports(work / stage.name, "bench_conv")
        # One file for every conv stage that has run (SD 1.5's and SDXL's shapes).
        best = conv_sweep_best([r for s in STAGES if s.kind == "conv"
                                for r in _read_reports(work / s.name, "bench_conv")["reports"]])
        if best["shapes"]:
            _write_atomic(out / FILES["conv_best"], json.dumps(best, indent=1) + "\n")
            found["sweep_best_file"] = FILES["conv_best"]
        return found
    folder = work / "pipeline"
    found = _read_reports(folder, "bench_pipeline")
    for png in folder.glob("bench_pipeline*.png"):
        (out / FILES["chart"]).write_bytes(png.read_bytes())
    return found


# -- the stage children that are part of this file ----------------------------------------------

def child_env(path: Path, dry_run: bool) -> None:
    """Stage (a), in its own process: versions, ceilings, and one cold kernel compile."""
    import torch

    from sdrt.kernels import group_norm
    if dry_run:
        info, ceiling = common.host_info(), common.ceilings("cpu", 1 << 20, 128)
        device, shape, dtype = "cpu", (1, 32, 4, 4), torch.float32
    else:
        common.require_cuda("gpu_session")
        info, ceiling = common.device_info(), common.ceilings()
        device, shape, dtype = "cuda", (2, 320, 64, 64), torch.float16  # SD 1.5's first level
    x = (-2.3 + 0.5 * torch.randn(shape, device=device)).to(dtype)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    b = torch.randn(shape[1], device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = []
    for _ in range(2):  # the first call compiles (the cache is empty), the second does not
        t0 = time.perf_counter()
        group_norm(x, 32, w, b, 1e-5, "silu")
        sync()
        calls.append(time.perf_counter() - t0)
    compile_probe = {"kernel": f"group_norm+silu {'x'.join(map(str, shape))} {dtype}",
                     "first_call_s": calls[0], "second_call_s": calls[1],
                     "triton_cache": "empty at start"}
    if dry_run:
        compile_probe["note"] = "interpreted (TRITON_INTERPRET=1): nothing is compiled"
    path.write_text(json.dumps({"device": info, "ceilings": ceiling,
                                "cold_compile": compile_probe}, default=str))


# -- the session ------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def restore_triton_cache(tar_path: Path, cache: Path) -> int:
    """Unpack a carried cache into ``cache``; the number of files it now holds."""
    if tar_path and tar_path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as tar:
            # "data": no absolute paths, links out of the folder or device files.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(cache, **safe)
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0


def pack_triton_cache(cache: Path, tar_path: Path) -> int:
    """The cache's compiled kernels and launchers, packed with paths relative to ``cache``."""
    files = sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix in CACHE_SUFFIXES) \
        if cache.is_dir() else []
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(cache)))
    os.replace(tmp, tar_path)
    return len(files)


def _log_tail(path: Path, start: int, lines: int = 8) -> list:
    """The last lines a stage wrote to the log (from byte ``start``)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read().decode(errors="replace").strip().splitlines()[-lines:]


def _cell(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def summary_markdown(session: dict) -> str:
    title = "GPU session" + (f" ({common.DRY_RUN_LABEL})" if session["dry_run"] else "")
    md = [f"# {title}", "", f"Started {session['started']}, budget {session['budget_s']} s, "
          f"{session['elapsed_s']:.0f} s used.", ""]
    if session["dry_run"]:
        md += [f"**{common.DRY_RUN_LABEL}**: the CPU, tiny shapes; no figure here is a result.",
               ""]
    env = session["stages"].get("env", {}).get("results", {})
    if env.get("device"):
        d = env["device"]
        md += [f"{d.get('gpu')}: driver {d.get('driver')}, CUDA {d.get('cuda')}, torch "
               f"{d.get('torch')}, triton {d.get('triton')}, numpy {d.get('numpy')}.", ""]
    if env.get("ceilings"):
        c = env["ceilings"]
        md += [f"Ceilings: copy {c['copy_gbs']:.0f} GB/s (read + write), matmul fp16 "
               f"{c['matmul_fp16_tflops']:.0f} TFLOP/s, bf16 {c['matmul_bf16_tflops']:.0f} "
               "TFLOP/s.", ""]
    md += ["First compile (seconds):", ""]
    for what, value in session["first_compile"].items():
        md.append(f"- {what}: {_cell(value)}")
    md += ["", f"Triton cache: {session['triton_cache']}.", "",
           "| stage | what | status | seconds | limit s | note |", "|---|---|---|---|---|---|"]
    for name, st in session["stages"].items():
        md.append(f"| {name} | {st['what']} | {st['status']} | {_cell(st.get('seconds'))} | "
                  f"{_cell(st.get('timeout_s'))} | {st.get('note', '')} |")
    for name, st in session["stages"].items():
        if st.get("tail"):
            md += ["", f"{name} ({st['status']}), its last output:", "", "```", *st["tail"], "```"]
    tests = session["stages"].get("tests", {}).get("results", {})
    if "tests" in tests:
        md += ["", "## GPU tests", "", f"{tests['passed']} passed, {tests['failures']} failed, "
               f"{tests['errors']} errors, {tests['skipped']} skipped."]
        md += [f"- {p['test']}: {p.get('failure', p.get('error', ''))[:300]}"
               for p in tests["problems"]]
        md += [f"- skipped ×{n}: {reason}" for reason, n in tests["skip_reasons"].items()]
    for name, st in session["stages"].items():
        for text in st.get("results", {}).get("markdown", []):
            md += ["", f"## {name}: report", ("\n" + text).replace("\n# ", "\n### ")
                   .replace("\n## ", "\n#### ")]
    return "\n".join(md) + "\n"


def first_compile(stages: dict) -> dict:
    """Compile and capture seconds, gathered from the stages that measured them."""
    out = {}
    probe = stages.get("env", {}).get("results", {}).get("cold_compile")
    if probe:
        out[f"cold Triton compile, {probe['kernel']} (first call)"] = probe["first_call_s"]
    for name in (s.name for s in STAGES if s.kind == "kernels"):
        for report in stages.get(name, {}).get("results", {}).get("reports", []):
            rows = report.get("sections", {}).get("Kernels", [])  # other sections repeat them
            firsts = [r["sdrt_first_call_ms"] for r in rows if r.get("sdrt_first_call_ms")]
            if firsts:
                out[f"bench_kernels ({name}, {BY_NAME[name].model}): Σ sdrt kernels' first "
                    "calls (session cache)"] = sum(firsts) / 1e3
    for name in (s.name for s in STAGES if s.kind == "pipeline"):
        for report in stages.get(name, {}).get("results", {}).get("reports", []):
            for rows in report.get("sections", {}).values():
                for r in rows:
                    if r.get("build_s") is not None and "system" in r:
                        out[f"{r['model']} {r['system']}: build (compile, capture)"] = r["build_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.gpu_session",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the results (on the device machine: $OUT)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"seconds for all stages (default 480; {DRY_BUDGET_S} with --dry-run)")
    p.add_argument("--stage", default=None,
                   help=f"comma-separated, from {', '.join(BY_NAME)}, or a group "
                        f"({', '.join(GROUPS)}) (default: all, the extras only if the budget "
                        "allows)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same stages on the CPU with tiny shapes; measures nothing")
    p.add_argument("--triton-cache", default=str(DEFAULT_TRITON_CACHE),
                   help="TRITON_CACHE_DIR for every stage (default %(default)s)")
    p.add_argument("--carried-cache", default=str(DEFAULT_CARRIED_CACHE),
                   help="a triton-cache.tar.gz from an earlier session, unpacked first if it "
                        "exists (default %(default)s)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--child-env", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_env:
        child_env(Path(a.child_env), a.dry_run)
        return 0
    if not a.out:
        p.error("--out is required")
    names = [n for name in (a.stage.split(",") if a.stage else [])
             for n in GROUPS.get(name, (name,))]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown stage: {', '.join(unknown)} (stages: {', '.join(BY_NAME)}; "
                f"groups: {', '.join(GROUPS)})")
    budget = a.budget or (DRY_BUDGET_S if a.dry_run else 480)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # Scratch outside DIR: only the files above come back from the device.
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sdrt-gpu-session-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(a.triton_cache)
    t_start = time.monotonic()
    restored = restore_triton_cache(Path(a.carried_cache), cache)

    session = {"dry_run": a.dry_run, "label": common.DRY_RUN_LABEL if a.dry_run else None,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "budget_s": budget, "elapsed_s": 0.0, "files": [],
               "triton_cache": f"{cache}, {restored} files at start"
                               + (f" (unpacked from {a.carried_cache})"
                                  if Path(a.carried_cache).is_file() else ""),
               "first_compile": {}, "stages": {}}
    todo = [BY_NAME[n] for n in dict.fromkeys(names)] if names else list(STAGES)
    named = set(names)
    for st in todo:
        session["stages"][st.name] = {"what": st.what, "status": "pending"}

    def save():
        session["elapsed_s"] = time.monotonic() - t_start
        session["first_compile"] = first_compile(session["stages"])
        session["files"] = sorted(f for f in FILES.values() if (out / f).is_file())
        _write_atomic(out / FILES["json"], json.dumps(session, indent=1, default=str) + "\n")
        _write_atomic(out / FILES["md"], summary_markdown(session))

    save()
    # Stopped from outside (SIGTERM): unwind, so that run_group kills the running stage's
    # process group; every finished stage is already in DIR.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    if a.dry_run:  # the CPU's code paths, also on a machine that has a GPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(out / FILES["log"], "a", buffering=1) as log:
        for i, st in enumerate(todo):
            left = budget - (time.monotonic() - t_start)
            record = session["stages"][st.name]
            timeout = stage_timeout(todo, i, left, named, a.dry_run)
            if a.dry_run and not st.dry:
                record.update(status="skipped", note="an extra: GPU only, not in a dry run")
            elif st.name == "pipeline-compile" and not _has_diffusers():
                record.update(status="skipped", note="needs diffusers (carry its wheel)")
            elif timeout < floor(st, a.dry_run):
                record.update(status="skipped", note=f"budget: {left:.0f} s left")
            else:
                cmd, extra_env = stage_command(st, work, a.dry_run, timeout)
                log.write(f"\n===== {st.name}: {' '.join(cmd)} (limit {timeout} s)\n")
                log.flush()
                t0, log_from = time.monotonic(), log.tell()
                status, _, _ = common.run_group(cmd, timeout, env={**env, **extra_env},
                                                cwd=REPO, stdout=log, stderr=log)
                record.update(seconds=time.monotonic() - t0, timeout_s=timeout,
                              command=" ".join(cmd), returncode=status,
                              status=("timeout" if status is None else
                                      "ok" if status == 0 else "failed"))
                try:
                    record["results"] = collect(st, work, out)
                except (OSError, ValueError, ET.ParseError) as e:  # a half-written report
                    record["note"] = f"results unreadable: {e}"
                if status != 0:
                    record["tail"] = _log_tail(out / FILES["log"], log_from)
                if a.dry_run:
                    record["label"] = common.DRY_RUN_LABEL
                if st.name != "env":  # what the stage compiled, ready to carry to the next call
                    session["triton_cache"] = (f"{cache}, {restored} files at start; "
                                               f"{pack_triton_cache(cache, out / FILES['cache'])}"
                                               f" packed into {FILES['cache']}")
            save()
            print(f"{st.name:18s} {record['status']:8s} {record.get('seconds', 0):6.0f} s  "
                  f"{record.get('note', '')}", flush=True)
    print(f"wrote {', '.join(session['files'])} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
