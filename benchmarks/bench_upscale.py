"""What an upscale model costs (``engine/upscaler.py``): the networks A1111's hires fix and
ComfyUI's ImageUpscaleWithModel run most, at their released configs with random weights.

- ``esrgan-x4``: RRDBNet, 64 features, 23 blocks, growth 32, ×4 (4x-UltraSharp,
  RealESRGAN_x4plus, ESRGAN_4x: one config);
- ``real-esrgan-x2``: the same network behind a 2× pixel-unshuffle (RealESRGAN_x2plus);
- ``compact-x4``: SRVGGNetCompact, 64 features, 32 convs, ×4 (realesr-general-x4v3);
- ``span-x4``: SPAN, 48 features, ×4 (4x-ClearRealityV1), its convs fused as it runs.

Each at a 512² input (a hires fix from 512²; the ×4 models write 2048²) and a 1024² one
(A1111's Extras on a 1024² picture), fp16: the whole picture in one pass, channels-last (the
engine's path), in NCHW (what channels-last buys), and in the default 512-pixel tiles with 32
pixels of context (what tiling costs: the context is computed twice). Every conv's FLOPs are
counted by hooks on one pass (2 · Cout · Cin · k² · H_out · W_out each); the report states the
rate against the measured fp16 matrix-product ceiling, and the peak memory of a pass.

    python -m sdrt.benchmarks.bench_upscale [--models esrgan-x4,compact-x4] [--sizes 512,1024]
    python -m sdrt.benchmarks.bench_upscale --dry-run   # CPU, tiny networks: measures nothing

Writes ``bench_upscale_<gpu>.json`` and ``.md`` under ``default_results_dir()``.
"""
import argparse

import torch
from torch import nn

from sdrt.benchmarks.common import (ceilings, device_info, host_info, time_on, write_report)
from sdrt.engine.upscaler import Conv3XC, Upscaler, network, ready
from sdrt.engine.upscaler_config import UpscalerConfig

MODELS = {
    "esrgan-x4": UpscalerConfig("esrgan", 3, 64, 23, 32, 2, 1, 4),
    "real-esrgan-x2": UpscalerConfig("real-esrgan", 3, 64, 23, 32, 2, 2, 2),
    "compact-x4": UpscalerConfig("compact", 3, 64, 32, 0, 0, 1, 4),
    "span-x4": UpscalerConfig("span", 3, 48, 6, scale=4),
}
# Dry runs: the same code path on networks and pictures small enough for a CPU.
DRY = {"esrgan-x4": UpscalerConfig("esrgan", 3, 8, 1, 4, 2, 1, 4),
       "real-esrgan-x2": UpscalerConfig("real-esrgan", 3, 8, 1, 4, 2, 2, 2),
       "compact-x4": UpscalerConfig("compact", 3, 8, 2, 0, 0, 1, 4),
       "span-x4": UpscalerConfig("span", 3, 8, 6, scale=4)}
TILE, TILE_PAD = 512, 32  # the engine's defaults


def build(cfg: UpscalerConfig, device, dtype) -> Upscaler:
    net = network(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return Upscaler(ready(net.to(device, dtype).eval()), cfg, "bench")


def conv_flops(up: Upscaler, x) -> float:
    """FLOPs of one whole-picture pass, counted over its convs."""
    total = [0.0]

    def hook(m, _, out):  # a Conv3XC runs as one 3x3 conv (its trained convs do not run)
        cin, taps = (m.sk.in_channels, 9) if isinstance(m, Conv3XC) else \
            (m.in_channels, m.kernel_size[0] * m.kernel_size[1])
        total[0] += 2 * cin * taps * out.numel()
    inner = {id(c) for m in up.net.modules() if isinstance(m, Conv3XC) for c in m.modules()
             if c is not m}
    handles = [m.register_forward_hook(hook) for m in up.net.modules()
               if isinstance(m, (nn.Conv2d, Conv3XC)) and id(m) not in inner]
    with torch.inference_mode():
        up._forward(x)
    for h in handles:
        h.remove()
    return total[0]


def peak_mb(fn, device) -> float:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def bench(models, sizes, device, dtype, repeats, dry_run):
    rows = []
    for name in models:
        cfg = (DRY if dry_run else MODELS)[name]
        up = build(cfg, device, dtype)
        for side in sizes:
            x = torch.rand(1, 3, side, side, device=device).to(dtype)
            flops = conv_flops(up, x)
            cl = x.contiguous(memory_format=torch.channels_last)
            tiled = Upscaler(up.net, cfg, "bench", TILE if not dry_run else side // 2,
                             TILE_PAD if not dry_run else 4)
            # (label, the weights' memory format while timed, the pass)
            variants = [("whole, channels-last", torch.channels_last, lambda: up._forward(cl)),
                        (f"tiles {tiled.tile} + {tiled.tile_pad}", torch.channels_last,
                         lambda: tiled.run(x))]
            if device == "cuda":
                variants.append(("whole, NCHW", torch.contiguous_format,
                                 lambda: up._forward(x)))
            for label, layout, fn in variants:
                up.net.to(memory_format=layout)
                with torch.inference_mode():
                    mem = peak_mb(fn, device)
                    t = time_on(device, fn, warmup=2 if dry_run else 3,
                                repeats=2 if dry_run else repeats)
                rows.append({"model": name, "input": f"{side}²",
                             "output": f"{side * cfg.scale}²", "path": label,
                             "ms": round(t.median_ms, 3),
                             "p20_ms": round(t.p20_ms, 3), "p80_ms": round(t.p80_ms, 3),
                             "conv_tflops": round(flops / 1e12, 3),
                             "tflop_s": round(flops / (t.median_ms * 1e-3) / 1e12, 2),
                             "output_mpix_s": round((side * cfg.scale) ** 2 /
                                                    (t.median_ms * 1e-3) / 1e6, 2),
                             "peak_mb": None if mem is None else round(mem)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.bench_upscale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    p.add_argument("--sizes", default="512,1024", help="input sides (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny networks on the CPU: checks the code path, measures nothing")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if a.dry_run:
        device, dtype, sizes = "cpu", torch.float32, [16, 24]
        info, ceiling = host_info(), ceilings("cpu", copy_bytes=1 << 22, matmul_n=256)
    else:
        from sdrt.benchmarks.common import require_cuda
        require_cuda("bench_upscale")
        device, dtype = "cuda", torch.float16
        sizes = [int(s) for s in a.sizes.split(",")]
        info, ceiling = device_info(), ceilings()
    rows = bench(models, sizes, device, dtype, a.repeats, a.dry_run)
    peak = ceiling["matmul_fp16_tflops"]
    for r in rows:
        r["of_fp16_ceiling"] = f"{100 * r['tflop_s'] / peak:.0f}%" if peak else None
    columns = ["model", "input", "output", "path", "ms", "p20_ms", "p80_ms", "conv_tflops",
               "tflop_s", "of_fp16_ceiling", "output_mpix_s", "peak_mb"]
    notes = ["fp16; one image; median of CUDA-event timings after warm-up (L2 not flushed)",
             "tiles: the engine's default tiling, each tile's 32-pixel context computed again"]
    if a.dry_run:
        notes.insert(0, "dry run on the CPU with tiny networks: not a measurement")
    paths = write_report("bench_upscale", info, ceiling,
                         {"Upscale models": (rows, columns)}, notes)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
