"""sdrt against diffusers, end to end, on the same random-weight model and the same latents.

For each model (SD 1.5 at 512², SD 2.1 at 768², SD-Turbo-style 1 step without CFG) a
random-weight model with the real config is written once, in diffusers format, to a cache
folder; then each system runs in a fresh process (so cold start and peak memory are its own):

- ``diffusers``: StableDiffusionPipeline, eager, SDPA attention;
- ``diffusers-compile``: the same with ``torch.compile`` on the UNet and VAE decoder,
  channels_last (compile time reported);
- ``sdrt-torch``: sdrt's static runtime (CUDA graphs) over the plain-PyTorch ops;
- ``sdrt-triton``: the same over sdrt's Triton kernels.

Measured per system: UNet iterations per second (from the difference of the 50- and 20-step
latencies, which cancels text encoding and decoding), end-to-end latency at each step count
(median of CUDA-synchronised repeats), time to first image from process start (weights load,
compile or capture included), peak GPU memory, and the max abs difference of the image from
diffusers' on the same latents. Writes JSON + markdown (with an ablation table) and a bar chart
PNG under benchmarks/results/, named after the GPU.

    python -m sdrt.benchmarks.bench_pipeline [--models sd15] [--systems ...] [--repeats N]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYSTEMS = ("diffusers", "diffusers-compile", "sdrt-torch", "sdrt-triton")
MODELS = {
    # name: (sdrt config name, image side, step counts, guidance scale)
    "sd15": ("sd15", 512, (50, 20), 7.5),
    "sd21": ("sd21", 768, (50, 20), 7.5),
    "sd-turbo": ("sd-turbo", 512, (1,), 0.0),
}
PROMPT = "a photograph of a red fox in the snow, highly detailed"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt-bench"


# -- the random-weight models -----------------------------------------------------------------

def write_model(cache: Path, name: str) -> Path:
    """The model's diffusers folder, written once with random weights (fp16) and the real
    config; speed does not depend on the weights' values."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.engine.configs import model_config
    from sdrt.engine.tokenizer import write_clip_tokenizer
    folder = cache / name
    if (folder / "model_index.json").is_file():
        return folder
    cfg = model_config(MODELS[name][0])
    schedulers = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
                  "EulerDiscreteScheduler": EulerDiscreteScheduler}
    sched_cfg = dict(cfg["scheduler"])
    scheduler = schedulers[sched_cfg.pop("_class_name")].from_config(sched_cfg)
    tok_dir = tempfile.mkdtemp()
    write_clip_tokenizer(tok_dir, pad_token=cfg["pad_token"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(torch.float16)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# -- one system, in its own process -------------------------------------------------------------

def _load(system, folder, side, steps, guidance, compile_mode):
    """The system's pipeline as ``run(steps, latents, output_type) -> images`` and the seconds
    spent compiling or capturing (None where nothing is)."""
    import torch
    if system.startswith("diffusers"):
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16,
                                                       safety_checker=None).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        build = None
        if system == "diffusers-compile":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)

        def run(n, latents, output_type="np"):
            out = pipe(PROMPT, height=side, width=side, num_inference_steps=n,
                       guidance_scale=guidance, latents=latents, output_type=output_type)
            return out.images
        if system == "diffusers-compile":
            t0 = time.perf_counter()
            for n in steps:  # compile (and autotune) before anything is timed
                run(n, None)
            torch.cuda.synchronize()
            build = time.perf_counter() - t0
        return run, build

    os.environ["SDRT_BACKEND"] = "torch" if system == "sdrt-torch" else "auto"
    from sdrt.engine import Pipeline
    pipe = Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float16)
    t0 = time.perf_counter()
    for n in steps:
        pipe.compile(side, side, batch_size=1, num_inference_steps=n, guidance=guidance > 1)
    torch.cuda.synchronize()
    build = time.perf_counter() - t0

    def run(n, latents, output_type="np"):
        return pipe(PROMPT, height=side, width=side, num_inference_steps=n,
                    guidance_scale=guidance, latents=latents, seed=0, output_type=output_type)
    return run, build


def worker(system, model, folder, out_dir, repeats, compile_mode):
    """Measure one system on one model; writes ``{system}.json`` and ``{system}.npy``."""
    import torch

    from sdrt.benchmarks.common import cuda_time
    _, side, steps, guidance = MODELS[model]
    torch.cuda.reset_peak_memory_stats()
    run, build = _load(system, folder, side, steps, guidance, compile_mode)
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float16).to("cuda")
    image = np.asarray(run(steps[0], latents), dtype=np.float32)
    torch.cuda.synchronize()
    first_image_at = time.time()
    np.save(Path(out_dir) / f"{system}.npy", image)
    latency = {str(n): cuda_time(lambda n=n: run(n, latents), warmup=2, repeats=repeats,
                                 flush_l2=False).median_ms for n in steps}
    result = {"system": system, "model": model, "side": side, "latency_ms": latency,
              "build_s": build, "first_image_at": first_image_at,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    if len(steps) == 2:  # UNet calls per second, with text encoding and decode cancelled out
        (a, b) = steps
        result["unet_it_s"] = (a - b) / ((latency[str(a)] - latency[str(b)]) * 1e-3)
    (Path(out_dir) / f"{system}.json").write_text(json.dumps(result))


# -- the parent: orchestration and report ---------------------------------------------------------

def _text(output) -> str:
    """A child's captured output: TimeoutExpired may carry bytes even with ``text=True``."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def measure(model, systems, cache, repeats, compile_mode, timeout):
    folder = write_model(cache, model)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for system in systems:
            started = time.time()
            cmd = [sys.executable, "-m", "sdrt.benchmarks.bench_pipeline", "--worker", system,
                   "--models", model, "--folder", str(folder), "--out-dir", out_dir,
                   "--repeats", str(repeats), "--compile-mode", compile_mode]
            try:
                proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
            except subprocess.TimeoutExpired as e:  # the child was killed; keep the other rows
                tail = _text(e.stderr or e.stdout).strip().splitlines()[-2:]
                rows.append({"model": model, "system": system,
                             "error": " / ".join([f"timed out after {timeout} s"] + tail)})
                continue
            path = Path(out_dir) / f"{system}.json"
            if proc.returncode != 0 or not path.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                rows.append({"model": model, "system": system, "error": " / ".join(tail)})
                continue
            r = json.loads(path.read_text())
            r["first_image_s"] = r.pop("first_image_at") - started
            rows.append(r)
        reference = Path(out_dir) / "diffusers.npy"
        ref = np.load(reference) if reference.is_file() else None
        for r in rows:
            image = Path(out_dir) / f"{r['system']}.npy"
            if ref is not None and image.is_file() and "error" not in r:
                r["max_abs_diff_vs_diffusers"] = float(np.abs(np.load(image) - ref).max())
    return rows


def flatten(rows):
    """One markdown/JSON row per system, with the latencies as columns and ratios to diffusers."""
    base = {r["model"]: r for r in rows if r["system"] == "diffusers" and "error" not in r}
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "latency_ms"}
        for n, ms in r.get("latency_ms", {}).items():
            row[f"{n} steps ms"] = ms
        b = base.get(r["model"])
        if b and "unet_it_s" in r and "unet_it_s" in b:
            row["it/s vs diffusers"] = r["unet_it_s"] / b["unet_it_s"]
        out.append(row)
    return out


def ablation(rows):
    """Each optimisation's gain in end-to-end latency at the first step count, in the order
    they stack: diffusers eager → torch.compile; eager → sdrt graphs (torch ops) → Triton."""
    by = {(r["model"], r["system"]): r for r in rows if "error" not in r}
    steps = {m: MODELS[m][2][0] for m, _ in by}
    chain = [("diffusers", "diffusers-compile", "torch.compile (max-autotune), channels_last"),
             ("diffusers", "sdrt-torch", "sdrt modules, static shapes, CUDA graphs"),
             ("sdrt-torch", "sdrt-triton", "sdrt Triton kernels")]
    out = []
    for model in sorted(steps):
        n = steps[model]
        for a, b, what in chain:
            if (model, a) in by and (model, b) in by:
                ta = by[(model, a)]["latency_ms"][str(n)]
                tb = by[(model, b)]["latency_ms"][str(n)]
                out.append({"model": model, "from": a, "to": b, "change": what,
                            "ms before": ta, "ms after": tb, "speed-up": ta / tb})
    return out


def bar_chart(rows, path):
    """A horizontal bar per (model, system): end-to-end latency at its first step count."""
    from PIL import Image, ImageDraw
    bars = [(f"{r['model']} {r['system']} ({MODELS[r['model']][2][0]} steps)",
             next(iter(r["latency_ms"].values()))) for r in rows if "error" not in r]
    if not bars:
        return None
    width, row_h, label_w = 900, 28, 330
    img = Image.new("RGB", (width, row_h * len(bars) + 40), "white")
    draw = ImageDraw.Draw(img)
    top = max(v for _, v in bars)
    draw.text((10, 8), "end-to-end latency, ms (shorter is better)", fill="black")
    for i, (label, v) in enumerate(bars):
        y = 34 + i * row_h
        draw.text((10, y + 6), label, fill="black")
        length = int((width - label_w - 90) * v / top)
        color = (214, 96, 44) if "sdrt" in label else (90, 120, 170)
        draw.rectangle([label_w, y + 4, label_w + length, y + row_h - 6], fill=color)
        draw.text((label_w + length + 6, y + 6), f"{v:.1f}", fill="black")
    img.save(path)
    return path


def report(rows, info, ceiling, results_dir=None):
    from sdrt.benchmarks.common import RESULTS_DIR, gpu_slug, write_report
    results_dir = Path(results_dir or RESULTS_DIR)
    flat = flatten(rows)
    columns = ["model", "system"] + sorted({k for r in flat for k in r if k.endswith("steps ms")},
                                           key=lambda k: -int(k.split()[0])) + \
        ["unet_it_s", "it/s vs diffusers", "first_image_s", "build_s", "peak_memory_gib",
         "max_abs_diff_vs_diffusers", "error"]
    abl = ablation(rows)
    paths = write_report("bench_pipeline", info, ceiling, {
        "Side by side (fp16, batch 1, same latents)": (flat, columns),
        "Ablation": (abl, ["model", "change", "from", "to", "ms before", "ms after",
                           "speed-up"]),
    }, notes=["UNet it/s = (50 − 20) / (t50 − t20): one 'it' is one UNet call (a batch of 2 "
              "with CFG).",
              "first_image_s: from process start to the first image (imports, weights load, "
              "compile or capture included)."], results_dir=results_dir)
    png = bar_chart(rows, results_dir / f"bench_pipeline_{gpu_slug(info['gpu'])}.png")
    return paths + ((png,) if png else ())


def main(argv=None):
    p = argparse.ArgumentParser(prog="sdrt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sd21,sd-turbo")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--timeout", type=int, default=540, help="seconds per system")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = a.models.split(",")
    systems = a.systems.split(",")
    unknown = [m for m in models if m not in MODELS] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown model or system: {', '.join(unknown)}")
    if a.worker:
        worker(a.worker, models[0], a.folder, a.out_dir, a.repeats, a.compile_mode)
        return 0
    from sdrt.benchmarks.common import ceilings, device_info, require_cuda
    require_cuda("bench_pipeline")
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        rows += measure(model, systems, cache, a.repeats, a.compile_mode, a.timeout)
    for path in report(rows, device_info(), ceilings()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
