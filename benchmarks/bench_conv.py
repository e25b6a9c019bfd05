"""GroupNorm → SiLU → conv2d (+ add): sdrt's fused Triton kernel against the unfused paths.

At every distinct ResNet-block convolution of SD 1.5's UNet (batch 2, as with classifier-free
guidance, 64×64 latent) and VAE decoder (512×512), plus each network's norm_out → conv_out,
with shapes derived from ``engine/configs.py``, it times:

- ``fused``: ``group_norm_silu_conv2d``'s Triton path (statistics kernels + implicit GEMM);
- ``torch``: F.group_norm → F.silu → F.conv2d (cuDNN) → ``+ add``, channels_last, what an
  eager diffusers model runs;
- ``sdrt_gn+cudnn``: sdrt's ``group_norm`` (GroupNorm+SiLU) → F.conv2d → ``+ add``, the
  other path ``ConvPathChooser`` can pick.

Each is the median of CUDA-event-timed repeats after a warm-up, L2 flushed before each repeat
(``benchmarks.common.cuda_time``: inside a UNet step the weights are not in L2 either), cuDNN
free to pick its algorithm (``cudnn.benchmark``). Reported per shape: ms, TFLOP/s
(2·N·Ho·Wo·Cout·Cin·KH·KW) and % of the measured matmul rate in the same dtype; the fused
kernel's first call (Triton compile included) separately; and per network the sum over its
convolutions (shape time × how often the shape occurs). ``--sweep`` also times a few block
configs per shape, to tune ``_CONV_TABLE``.

    python benchmarks/bench_conv.py [--dtype fp16|bf16] [--sweep] [--list]

Writes benchmarks/results/bench_conv_<dtype>_<gpu>.{json,md}. Needs a CUDA GPU (``--list``
prints the shapes without one).
"""
import argparse
import collections
import dataclasses

import torch
import torch.nn.functional as F

from sdrt.benchmarks.common import (ceilings, cuda_time, device_info, first_call_ms,
                                    require_cuda, write_report)
from sdrt.engine.configs import model_config

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class ConvShape:
    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int
    stride: int
    padding: int
    groups: int
    eps: float
    add: str | None     # None, "channel" (time embedding N×C×1×1) or "full" (residual)

    @property
    def out_size(self):
        return tuple((size + 2 * self.padding - self.k) // self.stride + 1
                     for size in (self.h, self.w))

    @property
    def flops(self):
        ho, wo = self.out_size
        return 2 * self.n * ho * wo * self.cout * self.cin * self.k * self.k

    def label(self):
        return (f"{self.n}×{self.cin}×{self.h}×{self.w} → {self.cout}, {self.k}×{self.k}"
                f"{'' if self.stride == 1 else f' s{self.stride}'}, add={self.add}")


def _resnet(cin, cout, res, n, groups, eps, temb):
    """The two GroupNorm→SiLU→conv3×3 of a ResnetBlock2D: + time embedding, + residual."""
    return [ConvShape(n, cin, res, res, cout, 3, 1, 1, groups, eps, "channel" if temb else None),
            ConvShape(n, cout, res, res, cout, 3, 1, 1, groups, eps, "full")]


def unet_convs(cfg, batch, latent):
    """(where, ConvShape) for every GroupNorm→SiLU→conv in the UNet, in execution order."""
    ch, layers = cfg["block_out_channels"], cfg["layers_per_block"]
    g, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    convs, res, out = [], latent, ch[0]
    for i, c in enumerate(ch):                               # down path
        for j in range(layers):
            convs += [(f"down{i}.resnet{j}", s)
                      for s in _resnet(out if j == 0 else c, c, res, batch, g, eps, True)]
        out = c
        res = res // 2 if i < len(ch) - 1 else res
    for j in range(2):                                       # mid block
        convs += [(f"mid.resnet{j}", s) for s in _resnet(ch[-1], ch[-1], res, batch, g, eps, True)]
    rch, prev = ch[::-1], ch[-1]
    for i, c in enumerate(rch):                              # up path, with skip concatenation
        skip_in = rch[min(i + 1, len(rch) - 1)]
        for j in range(layers + 1):
            cin = (prev if j == 0 else c) + (skip_in if j == layers else c)
            convs += [(f"up{i}.resnet{j}", s) for s in _resnet(cin, c, res, batch, g, eps, True)]
        prev = c
        res = res * 2 if i < len(rch) - 1 else res
    convs.append(("conv_out", ConvShape(batch, ch[0], res, res, cfg["out_channels"], 3, 1, 1,
                                        g, eps, None)))
    return convs


def vae_decoder_convs(cfg, size, batch=1, eps=1e-6):
    """(where, ConvShape) for every GroupNorm→SiLU→conv in the VAE decoder."""
    ch, layers, g = cfg["block_out_channels"], cfg["layers_per_block"], cfg["norm_num_groups"]
    res = size // 2 ** (len(ch) - 1)
    rch = ch[::-1]
    convs = []
    for j in range(2):
        convs += [(f"mid.resnet{j}", s) for s in _resnet(rch[0], rch[0], res, batch, g, eps, False)]
    prev = rch[0]
    for i, c in enumerate(rch):
        for j in range(layers + 1):
            convs += [(f"up{i}.resnet{j}", s)
                      for s in _resnet(prev if j == 0 else c, c, res, batch, g, eps, False)]
        prev = c
        res = res * 2 if i < len(rch) - 1 else res
    convs.append(("conv_out", ConvShape(batch, ch[0], res, res, cfg["out_channels"], 3, 1, 1,
                                        g, eps, None)))
    return convs


def distinct(convs):
    """{ConvShape: [where, ...]} in first-seen order."""
    seen = collections.OrderedDict()
    for where, shape in convs:
        seen.setdefault(shape, []).append(where)
    return seen


def sd15_shapes():
    cfg = model_config("sd15")
    return {"unet": distinct(unet_convs(cfg["unet"], batch=2, latent=cfg["unet"]["sample_size"])),
            "vae_decoder": distinct(vae_decoder_convs(cfg["vae"], size=cfg["vae"]["sample_size"]))}


# -- the paths ---------------------------------------------------------------------------------
def _inputs(s, dtype):
    def rand(*size, mean=0.0, std=1.0):
        return mean + std * torch.randn(*size, device="cuda", dtype=dtype)

    ho, wo = s.out_size
    cl = torch.channels_last
    add = {None: None, "channel": lambda: rand(s.n, s.cout, 1, 1),
           "full": lambda: rand(s.n, s.cout, ho, wo).to(memory_format=cl)}[s.add]
    return dict(x=rand(s.n, s.cin, s.h, s.w, mean=-0.3, std=1.0).to(memory_format=cl),
                norm_weight=rand(s.cin, mean=1.0, std=0.1), norm_bias=rand(s.cin, std=0.1),
                num_groups=s.groups,
                conv_weight=rand(s.cout, s.cin, s.k, s.k, std=(s.cin * s.k * s.k) ** -0.5)
                .to(memory_format=cl),
                conv_bias=rand(s.cout, std=0.1), eps=s.eps, stride=s.stride, padding=s.padding,
                add=add() if add else None)


def _torch_path(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, *, eps, stride,
                padding, add):
    h = F.silu(F.group_norm(x, num_groups, norm_weight, norm_bias, eps))
    y = F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)
    return y if add is None else y + add


def _call(fn, i, **extra):
    return fn(i["x"], i["norm_weight"], i["norm_bias"], i["num_groups"], i["conv_weight"],
              i["conv_bias"], eps=i["eps"], stride=i["stride"], padding=i["padding"],
              add=i["add"], **extra)


def _sweep_configs(base):
    return [dataclasses.replace(base, block_m=bm, block_n=bn, block_k=bk, num_warps=nw,
                                num_stages=ns)
            for bm, bn, bk, nw, ns in [(64, 64, 32, 4, 3), (64, 128, 64, 4, 3),
                                       (128, 64, 64, 4, 3), (128, 128, 32, 8, 3),
                                       (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                                       (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]]


def bench_shape(s, dtype, peak, sweep):
    """One row: each path's ms, TFLOP/s and % of ``peak``; optionally the block-config sweep."""
    from sdrt.kernels.conv_autotune import group_norm_then_conv2d
    from sdrt.kernels.group_norm_silu_conv2d import (_group_norm_silu_conv2d_triton, conv_config,
                                                     group_norm_silu_conv2d_reference)

    i = _inputs(s, dtype)
    fused = lambda: _call(_group_norm_silu_conv2d_triton, i)  # noqa: E731
    row = {"first_call_ms": first_call_ms(fused)}
    err = (fused().float() - _call(group_norm_silu_conv2d_reference, i).float()).abs().max()
    row["max_abs_err"] = err.item()
    paths = {"fused": fused, "torch": lambda: _call(_torch_path, i),
             "gn_cudnn": lambda: _call(group_norm_then_conv2d, i)}
    for name, fn in paths.items():
        ms = cuda_time(fn).median_ms
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = s.flops / (ms * 1e9)
        row[f"{name}_pct_peak"] = 100 * row[f"{name}_tflops"] / peak
    row["fused_speedup"] = min(row["torch_ms"], row["gn_cudnn_ms"]) / row["fused_ms"]
    if sweep:
        ho, wo = s.out_size
        best = None
        for cfg in _sweep_configs(conv_config(s.cin, s.cout, ho * wo)):
            try:
                ms = cuda_time(lambda: _call(_group_norm_silu_conv2d_triton, i, config=cfg),
                               warmup=3, repeats=20).median_ms
            except Exception:  # noqa: BLE001 - a config may not fit in shared memory: skip it
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is not None:
            c = best[1]
            row["sweep_best_ms"] = best[0]
            row["sweep_best_config"] = (f"{c.block_m}/{c.block_n}/{c.block_k} "
                                        f"w{c.num_warps} s{c.num_stages}")
    return row


COLUMNS = ["shape", "count", "fused_ms", "fused_tflops", "fused_pct_peak", "torch_ms",
           "torch_pct_peak", "gn_cudnn_ms", "gn_cudnn_pct_peak", "fused_speedup",
           "first_call_ms", "max_abs_err"]
SWEEP_COLUMNS = ["shape", "fused_ms", "sweep_best_ms", "sweep_best_config"]
PATHS = ("fused", "torch", "gn_cudnn")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--sweep", action="store_true", help="also time a few block configs")
    parser.add_argument("--list", action="store_true", help="print the shapes and exit")
    args = parser.parse_args(argv)

    shapes = sd15_shapes()
    if args.list:
        for net, table in shapes.items():
            print(f"{net}: {len(table)} distinct shapes")
            for s, where in table.items():
                print(f"  {s.label():48s} ×{len(where):2d}  {', '.join(where[:3])}"
                      f"{' …' if len(where) > 3 else ''}")
        return
    require_cuda("bench_conv")

    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its best algorithm per shape
    info, ceiling = device_info(), ceilings()
    peak = ceiling[f"matmul_{args.dtype}_tflops"]
    sections, totals = {}, []
    for net, table in shapes.items():
        rows, total = [], collections.Counter()
        for s, where in table.items():
            row = {"shape": s.label(), "count": len(where), "where": ", ".join(where),
                   **dataclasses.asdict(s), **bench_shape(s, dtype, peak, args.sweep)}
            rows.append(row)
            for path in PATHS:
                total[path] += row[f"{path}_ms"] * len(where)
            total["best_per_shape"] += min(row["fused_ms"], row["gn_cudnn_ms"]) * len(where)
            print(f"{net:12s} {s.label():48s} fused {row['fused_ms']:.3f} ms "
                  f"({row['fused_pct_peak']:.0f}% peak), torch {row['torch_ms']:.3f}, "
                  f"gn_cudnn {row['gn_cudnn_ms']:.3f}", flush=True)
        sections[f"{net} ({args.dtype})"] = (rows, COLUMNS)
        if args.sweep:
            sections[f"{net}: block-config sweep"] = (rows, SWEEP_COLUMNS)
        totals.append({"network": net, **{f"{k}_ms": v for k, v in total.items()}})
    sections["Sum over each network's convolutions"] = (
        totals, ["network", "fused_ms", "torch_ms", "gn_cudnn_ms", "best_per_shape_ms"])
    notes = [f"{args.dtype}; % peak is of the measured {args.dtype} matmul rate "
             f"({peak:.0f} TFLOP/s)",
             "fused: sdrt Triton statistics + implicit-GEMM kernel; torch: F.group_norm, F.silu, "
             "F.conv2d (cuDNN), + add; gn_cudnn: sdrt group_norm kernel, F.conv2d, + add; "
             "all channels_last",
             "fused_speedup: the faster unfused path's time over the fused kernel's; "
             "best_per_shape: what ConvPathChooser would run (fused or gn_cudnn per shape)",
             "first_call_ms: the fused kernel's first call, Triton compile included"]
    paths = write_report(f"bench_conv_{args.dtype}", info, ceiling, sections, notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
