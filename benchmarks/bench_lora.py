"""What loading, switching and unloading a LoRA costs (``engine/lora.py``), at SD 1.5 size.

The SD 1.5 UNet and text encoder are built from the real configs (``engine/configs.py``) with
random weights; the LoRA is a random kohya-layout file of rank 16 (fp16, as kohya saves)
over every attention projection (q, k, v, out), feed-forward layer and proj_in/proj_out of
the UNet and every attention and MLP layer of the text encoder. Each operation is timed as the
median of several repeats after a warm-up:

- ``load (file)``: read the file, check and map its keys, keep the originals, patch;
- ``load (state dict)``: the same from tensors already in memory (what a server that keeps
  its adapters in memory pays);
- ``set_scale``: recompute the patched weights from the originals at a new scale;
- ``switch A → B``: ``unload(A)`` then ``load(B)``, B from memory; and the same in one pass,
  ``load(B, replace=A)``, which recomputes the weights both patch once, from the originals
  already kept;
- ``load B on top of A``: two adapters stacked (A's weights recomputed with both);
- ``unload``: copy the originals back.

Every patch is a pass over the touched weights. A float32 weight on the CPU gets the original
copied in (8 B per element) and one ``addmm`` per adapter reading and writing it in place
(8 B, plus 2·r flops): 16 B per element for one adapter. Keeping the originals (first load)
copies them (8 B), restoring them (unload) copies them back (8 B). The report
states the achieved rate against the CPU's measured copy bandwidth (bytes read + written).

    python -m sdrt.benchmarks.bench_lora [--repeats 5] [--threads N]

Writes ``benchmarks/results/lora_switch_cpu.json`` and ``.md``.
"""
import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdrt.benchmarks.common import (copy_bandwidth_gbs, cpu_name, default_results_dir,
                                    markdown_table, package_versions)
from sdrt.engine.configs import model_config
from sdrt.engine.loading import build
from sdrt.engine.lora import LoraManager

RANK = 16
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PATCH_BYTES, COPY_BYTES = 16, 8  # per float32 element (see the module docstring)


def sd15_models():
    """SD 1.5's UNet and text encoder, float32 on the CPU, random weights."""
    cfg = model_config("sd15")
    models = {}
    g = torch.Generator().manual_seed(0)
    for component in ("unet", "text_encoder"):
        m = build(component, cfg[component]).to_empty(device="cpu").eval()
        with torch.no_grad():
            for p in m.parameters():
                p.requires_grad_(False)
                p.normal_(0.0, 0.02, generator=g)
        models[component] = m
    return models


def random_kohya(models, seed):
    """A kohya-layout rank-16 LoRA over every target layer: {key: fp16 tensor}."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, prefix, targets in (("unet", "lora_unet_", UNET_TARGETS),
                                       ("text_encoder", "lora_te_", TEXT_TARGETS)):
        for name, m in models[component].named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name.endswith(targets):
                continue
            stem = prefix + name.replace(".", "_")
            w = m.weight
            state[f"{stem}.lora_down.weight"] = (
                torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5).half()
            state[f"{stem}.lora_up.weight"] = (
                torch.randn(w.shape[0], RANK, *([1, 1] if w.dim() == 4 else []),
                            generator=g) * 0.01).half()
            state[f"{stem}.alpha"] = torch.tensor(float(RANK) / 2, dtype=torch.float16)
    return state


def timed(fn, setup=None, *, warmup, repeats):
    """Median, p20 and p80 wall ms of ``fn()`` over ``repeats``; ``setup()`` runs untimed
    before each call (warm-up calls included)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3],
            "repeats": repeats}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    models = sd15_models()
    build_s = time.perf_counter() - t0
    state_a, state_b = random_kohya(models, 1), random_kohya(models, 2)
    manager = LoraManager(models, family="sd1")
    tmp = tempfile.mkdtemp(prefix="bench-lora-")
    path_a = os.path.join(tmp, "style_a.safetensors")
    save_file(state_a, path_a)
    file_mb = os.path.getsize(path_a) / 1e6
    # A's keys as read back from the file: the same tensors the file load sees.
    state_a = load_file(path_a)

    def unload_all():
        manager.unload()

    run = dict(warmup=args.warmup, repeats=args.repeats)
    rows = []

    def record(op, timing, bytes_per_element):
        nbytes = bytes_per_element * touched
        rows.append({"operation": op, **{k: round(v, 2) if isinstance(v, float) else v
                                         for k, v in timing.items()},
                     "bytes_moved_GB": round(nbytes / 1e9, 2),
                     "achieved_GBs": round(nbytes / (timing["median_ms"] * 1e-3) / 1e9, 2)})
        print(f"{op:32s} {timing['median_ms']:9.1f} ms")

    manager.load(state_a, name="a")
    layers = len(manager.layers("a"))
    touched = sum(manager.modules[c].get_submodule(m).weight.numel()
                  for c, m in manager.layers("a"))
    manager.unload()

    record("load (file)", timed(lambda: manager.load(path_a, name="a"), unload_all, **run),
           COPY_BYTES + PATCH_BYTES)
    record("load (state dict)", timed(lambda: manager.load(state_a, name="a"), unload_all,
                                      **run), COPY_BYTES + PATCH_BYTES)
    manager.unload()
    manager.load(state_a, name="a")
    scales = iter([0.5, 1.0] * (run["warmup"] + run["repeats"]))
    record("set_scale", timed(lambda: manager.set_scale("a", next(scales)), **run),
           PATCH_BYTES)

    def switch():
        manager.unload("a")
        manager.load(state_b, name="b")

    def back_to_a():
        manager.unload()
        manager.load(state_a, name="a")
    record("switch A → B (unload A, load B)", timed(switch, back_to_a, **run),
           2 * COPY_BYTES + PATCH_BYTES)
    record("switch A → B (load B, replace=A)",
           timed(lambda: manager.load(state_b, name="b", replace="a"), back_to_a, **run),
           PATCH_BYTES)
    record("load B on top of A", timed(lambda: manager.load(state_b, name="b"), back_to_a,
                                       **run), PATCH_BYTES + 8)  # a second addmm pass

    def load_a():
        manager.unload()
        manager.load(state_a, name="a")
    record("unload", timed(unload_all, load_a, **run), COPY_BYTES)
    manager.unload()

    copy_gbs = copy_bandwidth_gbs(256 << 20, device="cpu")
    for r in rows:
        r["fraction_of_copy_bw"] = round(r["achieved_GBs"] / copy_gbs, 2)
    info = {"device": f"CPU: {cpu_name()}", "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), **package_versions(("torch", "safetensors", "numpy")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    setup = {"model": "SD 1.5 UNet + text encoder (configs.SD15), random weights, float32",
             "lora": f"kohya layout, rank {RANK}, fp16 file, {layers} layers "
                     f"(UNet {', '.join(UNET_TARGETS)}; text encoder {', '.join(TEXT_TARGETS)})",
             "lora_file_MB": round(file_mb, 1), "patched_weights": layers,
             "patched_elements_M": round(touched / 1e6, 1),
             "originals_held_MB": round(touched * 4 / 1e6, 1),
             "cpu_copy_GBs": round(copy_gbs, 2), "model_build_s": round(build_s, 1)}
    report = {"info": info, "setup": setup, "results": rows,
              "notes": ["Wall time on a shared CPU (other jobs were running): a bound on the "
                        "cost, not a tuned figure.",
                        "bytes_moved counts, per patched float32 element, 16 B for a patch "
                        "(original read, weight written, addmm reading and writing the "
                        "weight; 8 B more per further adapter), 8 B to keep or to restore an "
                        "original. unload + load restores A's originals, keeps them again and "
                        "patches B; load(replace=A) only patches B."]}
    out = Path(args.out) if args.out else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_switch_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    columns = ["operation", "median_ms", "p20_ms", "p80_ms", "repeats", "bytes_moved_GB",
               "achieved_GBs", "fraction_of_copy_bw"]
    md = ["# LoRA load / switch / unload, SD 1.5 size, CPU", "",
          f"{info['device']}, {info['threads']} torch threads; torch {info['torch']}, "
          f"safetensors {info['safetensors']}, Python {info['python']}; {info['date']}.", "",
          *(f"- {k}: {v}" for k, v in setup.items()), "",
          markdown_table(rows, columns), "", *(f"- {n}" for n in report["notes"]), ""]
    (out / "lora_switch_cpu.md").write_text("\n".join(md))
    print(f"wrote {out / 'lora_switch_cpu.json'} and .md")


if __name__ == "__main__":
    main()
