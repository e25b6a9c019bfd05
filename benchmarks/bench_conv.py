"""GroupNorm → SiLU → conv2d (+ add): sdrt's fused Triton kernel against the unfused paths.

The calls are the engine's own: ``benchmarks.launches.record_launches`` runs SD 1.5's UNet
(batch 2, as with classifier-free guidance, 64×64 latent) and VAE decoder (512×512), or those of
the ``--models`` named (SDXL: UNet batch 2 at 128×128 latents, VAE decoder at 1024×1024 as an
fp16 VAE runs it), on the meta device, with the weights converted as
``engine.layers.use_conv_chooser`` converts them on a GPU (channels_last), and records every
``group_norm_silu_conv2d`` call with its tensors' shapes and strides. Each distinct call is
benchmarked with inputs of exactly those shapes and strides (x, weights, ``add``), so the
layouts timed are the layouts the engine runs. For each it times:

- ``fused``: ``group_norm_silu_conv2d``'s Triton path (statistics kernels + implicit GEMM);
- ``torch``: F.group_norm → F.silu → F.conv2d (cuDNN) → ``+ add``, what an eager diffusers
  model runs;
- ``sdrt_gn+cudnn``: sdrt's ``group_norm`` (GroupNorm+SiLU) → F.conv2d → ``+ add``, the
  other path ``ConvPathChooser`` can pick.

Each is the median of CUDA-event-timed repeats after a warm-up, L2 flushed before each repeat
(``benchmarks.common.cuda_time``: inside a UNet step the weights are not in L2 either), cuDNN
free to pick its algorithm (``cudnn.benchmark``). Reported per call: ms, TFLOP/s
(2·N·Ho·Wo·Cout·Cin·KH·KW) and % of the measured matmul rate in the same dtype; the fused
kernel's first call (Triton compile included) separately; and per network the sum over its
convolutions (call time × how often the call occurs). ``--sweep`` also times
``group_norm_silu_conv2d.SWEEP_CONFIGS`` per call, to tune ``_CONV_TABLE``.

    python -m sdrt.benchmarks.bench_conv [--dtype fp16|bf16] [--sweep] [--list]
                                         [--models sd15 sdxl ...]

Writes benchmarks/results/bench_conv_<dtype>_<gpu>.{json,md}. Needs a CUDA GPU (``--list``
prints the calls without one; the walk compiles the engine's kernels for sm_90 on the way,
which a later run on a Hopper GPU finds in Triton's cache). Run it in a process without
TRITON_INTERPRET.
"""
import argparse
import collections
import dataclasses

import torch
import torch.nn.functional as F

from sdrt.benchmarks.common import (ceilings, cuda_time, device_info, first_call_ms,
                                    require_cuda, write_report)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
NETWORKS = ("unet", "vae_decoder")
# Models whose calls can be benchmarked (launches.MODEL_SIZES: 512², 768², 1024², 512²).
MODELS = ("sd15", "sd21", "sdxl", "sdxl-turbo")


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One distinct ``group_norm_silu_conv2d`` call of the engine: shapes and strides."""
    x_shape: tuple
    x_stride: tuple
    weight_shape: tuple
    weight_stride: tuple
    has_bias: bool
    add_shape: tuple | None
    add_stride: tuple | None
    groups: int
    eps: float
    stride: int
    padding: int

    @classmethod
    def of(cls, op_call):
        a = op_call.arg
        x, w, add = a("x"), a("conv_weight"), a("add")
        return cls(x.shape, x.stride, w.shape, w.stride, a("conv_bias") is not None,
                   None if add is None else add.shape, None if add is None else add.stride,
                   a("num_groups"), a("eps"), a("stride"), a("padding"))

    @property
    def out_size(self):
        k = self.weight_shape[2:]
        return tuple((size + 2 * self.padding - kk) // self.stride + 1
                     for size, kk in zip(self.x_shape[2:], k))

    @property
    def flops(self):
        n, cin = self.x_shape[:2]
        cout, _, kh, kw = self.weight_shape
        ho, wo = self.out_size
        return 2 * n * ho * wo * cout * cin * kh * kw

    @property
    def add_kind(self):
        if self.add_shape is None:
            return None
        return "channel" if self.add_shape[2:] == (1, 1) else "full"

    def fields(self):
        """The report row's description of the call: sizes (the names gpu_session's
        ``SHAPE_KEYS`` read) and layouts."""
        n, cin, h, w = self.x_shape
        cout, _, k, _ = self.weight_shape
        return dict(n=n, cin=cin, h=h, w=w, cout=cout, k=k, stride=self.stride,
                    padding=self.padding, groups=self.groups, eps=self.eps, add=self.add_kind,
                    x_layout=_layout(self.x_shape, self.x_stride),
                    weight_layout=_layout(self.weight_shape, self.weight_stride),
                    add_layout=None if self.add_shape is None
                    else _layout(self.add_shape, self.add_stride))

    def label(self):
        n, cin, h, w = self.x_shape
        cout, _, kh, kw = self.weight_shape
        layouts = (f"x {_layout(self.x_shape, self.x_stride)}, "
                   f"w {_layout(self.weight_shape, self.weight_stride)}")
        if self.add_kind == "full":
            layouts += f", add {_layout(self.add_shape, self.add_stride)}"
        return (f"{n}×{cin}×{h}×{w} → {cout}, {kh}×{kw}"
                f"{'' if self.stride == 1 else f' s{self.stride}'}, add={self.add_kind}, "
                + layouts)


def _layout(shape, stride):
    """"channels_last", "contiguous" or the strides."""
    t = torch.empty_strided(shape, stride, device="meta")
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.is_contiguous():
        return "contiguous"
    return str(stride)


def engine_convs(model="sd15"):
    """{network: {ConvCall: count}} of every GroupNorm+SiLU+conv the engine's UNet and VAE
    decoder make, in first-call order, from the launch recorder.

    SDXL's VAE decodes in float32 by default (``force_upcast``), where the fused kernel does
    not run (cuDNN does the convolutions); its calls here are those of an fp16 VAE
    (``force_upcast`` false, a fixed fp16 SDXL VAE), the one a fused kernel can serve."""
    from sdrt.benchmarks.launches import op_calls, record_launches
    calls = op_calls(record_launches(model, networks=NETWORKS, conv_path="fused",
                                     vae_dtype=torch.float16))
    table = {net: collections.Counter() for net in NETWORKS}
    for c in calls:
        if c.op == "group_norm_silu_conv2d":
            table[c.network][ConvCall.of(c)] += 1
    return table


# -- the paths ---------------------------------------------------------------------------------
def _inputs(s, dtype, seed=0):
    """Random inputs with exactly the call's shapes and strides; non-zero-mean x."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(shape, stride=None, mean=0.0, std=1.0):
        stride = stride or torch.empty(shape, device="meta").stride()
        t = torch.empty_strided(shape, stride, device="cuda", dtype=dtype)
        return t.copy_(mean + std * torch.randn(shape, device="cuda", generator=gen))

    cin = s.x_shape[1]
    cout, _, kh, kw = s.weight_shape
    return dict(x=rand(s.x_shape, s.x_stride, mean=-0.3),
                norm_weight=rand((cin,), mean=1.0, std=0.1), norm_bias=rand((cin,), std=0.1),
                num_groups=s.groups,
                conv_weight=rand(s.weight_shape, s.weight_stride, std=(cin * kh * kw) ** -0.5),
                conv_bias=rand((cout,), std=0.1) if s.has_bias else None, eps=s.eps,
                stride=s.stride, padding=s.padding,
                add=None if s.add_shape is None else rand(s.add_shape, s.add_stride))


def _torch_path(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, *, eps, stride,
                padding, add):
    h = F.silu(F.group_norm(x, num_groups, norm_weight, norm_bias, eps))
    y = F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)
    return y if add is None else y + add


def _call(fn, i, **extra):
    return fn(i["x"], i["norm_weight"], i["norm_bias"], i["num_groups"], i["conv_weight"],
              i["conv_bias"], eps=i["eps"], stride=i["stride"], padding=i["padding"],
              add=i["add"], **extra)


def bench_shape(s, dtype, peak, sweep):
    """One row: each path's ms, TFLOP/s and % of ``peak``; optionally the block-config sweep."""
    from sdrt.kernels.conv_autotune import group_norm_then_conv2d
    from sdrt.kernels.group_norm_silu_conv2d import (_group_norm_silu_conv2d_triton,
                                                     group_norm_silu_conv2d_reference,
                                                     sweep_configs)

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
        for cfg in sweep_configs(s.x_shape[1], s.weight_shape[0], ho * wo):
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
    parser.add_argument("--list", action="store_true", help="print the calls and exit")
    parser.add_argument("--models", nargs="+", default=["sd15"], choices=MODELS,
                        help="whose calls (default sd15)")
    args = parser.parse_args(argv)
    if not args.list:
        require_cuda("bench_conv")

    convs = {}  # "model network" → {ConvCall: count}
    for model in args.models:
        for net, table in engine_convs(model).items():
            convs[f"{model} {net}"] = table
    if args.list:
        for net, table in convs.items():
            print(f"{net}: {sum(table.values())} calls, {len(table)} distinct")
            for s, count in table.items():
                print(f"  ×{count:2d}  {s.label()}")
        return

    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its best algorithm per shape
    info, ceiling = device_info(), ceilings()
    peak = ceiling[f"matmul_{args.dtype}_tflops"]
    sections, totals = {}, []
    for net, table in convs.items():
        rows, total = [], collections.Counter()
        for s, count in table.items():
            row = {"shape": s.label(), "count": count, **s.fields(),
                   **bench_shape(s, dtype, peak, args.sweep)}
            rows.append(row)
            for path in PATHS:
                total[path] += row[f"{path}_ms"] * count
            total["best_per_shape"] += min(row["fused_ms"], row["gn_cudnn_ms"]) * count
            print(f"{net:12s} {s.label():72s} fused {row['fused_ms']:.3f} ms "
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
             "calls and layouts (x, weights, add) recorded from the engine's modules "
             "(benchmarks/launches.py); weights channels_last as use_conv_chooser stores them",
             "fused: sdrt Triton statistics + implicit-GEMM kernel; torch: F.group_norm, F.silu, "
             "F.conv2d (cuDNN), + add; gn_cudnn: sdrt group_norm kernel, F.conv2d, + add; "
             "all three on the same tensors",
             "fused_speedup: the faster unfused path's time over the fused kernel's; "
             "best_per_shape: what ConvPathChooser would run (fused or gn_cudnn per shape)",
             "first_call_ms: the fused kernel's first call, Triton compile included",
             "block configs: _CONV_TABLE rows not yet tuned on a GPU (tuned_on is None) unless "
             "the table says otherwise"]
    paths = write_report(f"bench_conv_{args.dtype}", info, ceiling, sections, notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
