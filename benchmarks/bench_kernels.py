"""sdrt's Triton kernels against what diffusers runs today, at every distinct shape of a model.

    python -m sdrt.benchmarks.bench_kernels                  # SD 1.5 at 512², SD 2.1 at 768²
    python -m sdrt.benchmarks.bench_kernels --models sdxl    # SDXL at 1024² (128² latents)
    python -m sdrt.benchmarks.bench_kernels --ops attention --repeats 200
    python -m sdrt.benchmarks.bench_kernels --models sd15 --ops attention --sweep

GPU only: without CUDA it exits with a message. For each distinct (op, shape, dtype), in the
dtype the engine runs it (fp16; the float32 GroupNorms of SDXL's upcast VAE decoder):

- sdrt: ``group_norm`` (+ SiLU), ``layer_norm``, ``geglu``, ``attention`` from sdrt.kernels,
  writing into a preallocated ``out`` as the engine will;
- baseline, as diffusers does it: ``F.group_norm`` then ``F.silu``; ``F.layer_norm``;
  ``a, g = h.chunk(2, -1); a * F.gelu(g)``; ``F.scaled_dot_product_attention`` with each of
  its flash / efficient / cuDNN backends tried and the fastest kept.

Each is timed as the median of CUDA-event timings after warm-up, with L2 flushed before every
repeat (``common.cuda_time``). Reported: the time, achieved GB/s (the fewest bytes the op must
move: inputs read once, output written once) and TFLOP/s, the share of the roofline (the floor
max(bytes / measured copy bandwidth, FLOPs / measured matmul rate) over the time), the
speed-up over the baseline, the first-call (compile) time apart, and the largest difference
between the two outputs. Where the attention kernel splits the head dim in two pieces (SD
1.5's 40, 80, 160: ``attention.pieces``), ``padded_d_ms`` times the same kernel with the head
dim padded to the next power of two instead; where it splits the cross path's keys (77 = 64 +
16), ``padded_keys_ms`` times it with them padded to 128: one run says what each split buys.
``--sweep`` also times each attention shape at every block configuration of
``attention.sweep_blocks`` (the table's first, then ``SWEEP_BLOCKS``) and reports the fastest
(``sweep_best_config``, ``sweep_best_ms``; every config's time under ``sweep_ms``): what the
block table should hold on this GPU. Per network, Σ count × time gives the op's share of one call.

Shapes, layouts and call counts come from one walk of the engine's own modules at the model's
size (``launches.record_launches``: meta tensors, every launch recorded, nothing computed),
not from a hand list: UNet batch 2 (CFG; 1 for SDXL-Turbo) with the family's conditioning,
VAE decoder, the family's text encoders (SDXL: two); the unfused conv path,
so every ResNet GroupNorm+SiLU is a group_norm call. Not benchmarked: the VAE's single-head
attention (head dim 512 runs ``F.scaled_dot_product_attention`` in sdrt too) and CLIP's
causal attention (sdrt's kernel takes no mask): neither launches a Triton kernel.

Writes ``benchmarks/results/bench_kernels_<gpu>.json`` and ``.md``.
"""
import argparse
import collections
import dataclasses
import functools
import importlib
import math

import torch
import torch.nn.functional as F

from sdrt.benchmarks import common, launches
from sdrt.kernels import attention, geglu, group_norm, layer_norm

attention_module = importlib.import_module("sdrt.kernels.attention")

OPS = ("group_norm", "layer_norm", "geglu", "attention")
# At their native sizes (launches.MODEL_SIZES): 512², 768², 1024², 512².
MODELS = ("sd15", "sd21", "sdxl", "sdxl-turbo")
DEFAULT_MODELS = ("sd15", "sd21")


@dataclasses.dataclass(frozen=True)
class Case:
    """One distinct kernel call. ``shape``: group_norm N×C×H×W, layer_norm rows×C,
    geglu rows×2F, attention (B, H, S, T, D)."""
    op: str
    shape: tuple
    groups: int = 0
    activation: str = None
    channels_last: bool = False  # group_norm's input layout (after a conv: channels_last)
    dtype: str = "float16"       # as the engine runs it: SDXL's VAE decodes in float32

    def __str__(self):
        extra = ""
        if self.op == "group_norm":
            extra = f" G={self.groups}" + (f" {self.activation}" if self.activation else "") \
                + (" NHWC" if self.channels_last else "")
        if self.dtype != "float16":
            extra += f" {self.dtype}"
        return f"{self.op} {'×'.join(map(str, self.shape))}{extra}"


def case_of(call: launches.OpCall):
    """The benchmark case of one recorded op call; None for ops not benchmarked here."""
    if call.op == "group_norm":
        x = call.arg("x")
        return Case("group_norm", x.shape, call.arg("num_groups"), call.arg("activation"),
                    x.channels_last, x.dtype)
    if call.op in ("layer_norm", "geglu"):
        t = call.arg("x" if call.op == "layer_norm" else "h")
        return Case(call.op, (math.prod(t.shape[:-1]), t.shape[-1]), dtype=t.dtype)
    if call.op == "attention":
        q = call.arg("q")
        (b, h, s, d), t = q.shape, call.arg("k").shape[2]
        return Case("attention", (b, h, s, t, d), dtype=q.dtype)
    return None


def model_cases(model: str) -> dict:
    """{network: Counter(Case → calls per forward)} for one model at its size, from one walk
    of the engine's own modules (``launches.record_launches``: the model's networks, SDXL's
    two text encoders and its VAE in float32 as the pipeline decodes it). The walk takes the
    unfused conv path, where every ResNet block's GroupNorm+SiLU is a ``group_norm`` call."""
    calls = collections.defaultdict(collections.Counter)
    for call in launches.op_calls(launches.record_launches(model, conv_path="unfused")):
        case = case_of(call)
        if case is not None:
            calls[call.network][case] += 1
    return calls


def _randn(*shape, dtype):
    return (-2.3 + 0.5 * torch.randn(*shape, device="cuda")).to(dtype)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


@dataclasses.dataclass
class Problem:
    sdrt: object                 # () → output
    baselines: dict              # name → (() → output)
    bytes: int                   # fewest bytes moved: inputs read once, output written once
    flops: int
    variants: dict = dataclasses.field(default_factory=dict)  # column → sdrt's other form
    sweep: dict = dataclasses.field(default_factory=dict)  # block config label → sdrt with it


def _blocks_label(blk):
    """An attention ``Blocks`` as 'M128 N64(+16) D32+16 w4 s3'."""
    n = f"N{blk.block_n}" + (f"+{blk.block_n2}" if blk.block_n2 else "")
    d = f"D{blk.block_d}" + (f"+{blk.block_d2}" if blk.block_d2 else "")
    return f"M{blk.block_m} {n} {d} w{blk.warps} s{blk.stages}"


def _unsplit(flag, fn):
    """``fn`` run with the attention kernel's ``flag`` (SPLIT_HEAD_DIM or SPLIT_KEYS) off: the
    same kernel padding to a power of two what it would split in two pieces."""
    def run():
        setattr(attention_module, flag, False)
        try:
            return fn()
        finally:
            setattr(attention_module, flag, True)
    return run


def make_problem(case: Case) -> Problem:
    """Inputs on the GPU, in the case's dtype, and the calls to time for one case."""
    dtype = getattr(torch, case.dtype)
    es = torch.finfo(dtype).bits // 8
    if case.op == "group_norm":
        x = _randn(*case.shape, dtype=dtype)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        c = case.shape[1]
        w, b = _randn(c, dtype=dtype), _randn(c, dtype=dtype)
        out = torch.empty_like(x)

        def baseline():
            y = F.group_norm(x, case.groups, w, b, 1e-5)
            return F.silu(y) if case.activation == "silu" else y
        return Problem(lambda: group_norm(x, case.groups, w, b, 1e-5, case.activation, out=out),
                       {"F.group_norm" + (" + F.silu" if case.activation else ""): baseline},
                       2 * x.numel() * es, 0)
    if case.op == "layer_norm":
        x = _randn(*case.shape, dtype=dtype)
        c = case.shape[-1]
        w, b = _randn(c, dtype=dtype), _randn(c, dtype=dtype)
        out = torch.empty_like(x)
        return Problem(lambda: layer_norm(x, w, b, out=out),
                       {"F.layer_norm": lambda: F.layer_norm(x, (c,), w, b, 1e-5)},
                       2 * x.numel() * es, 0)
    if case.op == "geglu":
        h = _randn(*case.shape, dtype=dtype)
        out = h.new_empty(case.shape[0], case.shape[1] // 2)

        def baseline():
            a, g = h.chunk(2, dim=-1)
            return a * F.gelu(g)
        return Problem(lambda: geglu(h, out=out), {"chunk + a*F.gelu(g)": baseline},
                       (h.numel() + out.numel()) * es, 0)
    if case.op == "attention":
        b, n_heads, s, t, d = case.shape
        # As diffusers holds them: projections B×S×(H·D), viewed as B×H×S×D.
        q = _randn(b, s, n_heads, d, dtype=dtype).transpose(1, 2)
        k = _randn(b, t, n_heads, d, dtype=dtype).transpose(1, 2)
        v = _randn(b, t, n_heads, d, dtype=dtype).transpose(1, 2)
        out = q.new_empty(b, s, n_heads, d).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            return run
        variants = {}
        split_d = attention_module.pieces(d)[1] > 0
        split_keys = t <= attention_module.CROSS_MAX_T and attention_module.pieces(t)[1] > 0
        for column, flag, applies in (("padded_d_ms", "SPLIT_HEAD_DIM", split_d),
                                      ("padded_keys_ms", "SPLIT_KEYS", split_keys)):
            if applies:
                variants[column] = _unsplit(flag, lambda: attention(q, k, v, out=out))
        scale = 1.0 / math.sqrt(d)
        sweep = {_blocks_label(blk): functools.partial(attention_module._attention_triton, q, k,
                                                       v, scale, out, blk)
                 for blk in attention_module.sweep_blocks(d, t)}
        return Problem(lambda: attention(q, k, v, out=out),
                       {f"SDPA {n}": sdpa(be) for n, be in _sdpa_backends().items()},
                       (2 * q.numel() + k.numel() + v.numel()) * es, 4 * b * n_heads * s * t * d,
                       variants, sweep)
    raise ValueError(f"unknown op {case.op!r}")


def measure(case: Case, ceiling: dict, warmup: int, repeats: int, flush_l2: bool,
            sweep: bool = False) -> dict:
    p = make_problem(case)
    compile_ms = common.first_call_ms(p.sdrt)
    ours = common.cuda_time(p.sdrt, warmup=warmup, repeats=repeats, flush_l2=flush_l2)
    expected = None
    best_name, best = None, None
    for name, fn in p.baselines.items():
        try:
            y = fn()
        except RuntimeError:  # an SDPA backend that does not take this shape or GPU
            continue
        t = common.cuda_time(fn, warmup=warmup, repeats=repeats, flush_l2=flush_l2)
        if best is None or t.median_ms < best.median_ms:
            best_name, best, expected = name, t, y
    diff = (p.sdrt().float() - expected.float()).abs().max().item() if best else None
    floor_ms = max(p.bytes / (ceiling["copy_gbs"] * 1e9),
                   p.flops / (ceiling["matmul_fp16_tflops"] * 1e12)) * 1e3
    row = {"case": str(case), "sdrt_ms": ours.median_ms, "sdrt_p20_ms": ours.p20_ms,
           "sdrt_p80_ms": ours.p80_ms, "sdrt_first_call_ms": compile_ms,
           "GB/s": p.bytes / (ours.median_ms * 1e-3) / 1e9,
           "TFLOP/s": p.flops / (ours.median_ms * 1e-3) / 1e12 if p.flops else None,
           "sdrt_roof_%": 100 * floor_ms / ours.median_ms, "baseline": best_name,
           "max_abs_diff": diff}
    if best is not None:
        row.update({"base_ms": best.median_ms, "base_roof_%": 100 * floor_ms / best.median_ms,
                    "speedup": best.median_ms / ours.median_ms})
    for column, fn in p.variants.items():
        fn()  # compiled outside the timing
        row[column] = common.cuda_time(fn, warmup=warmup, repeats=repeats,
                                       flush_l2=flush_l2).median_ms
    if sweep and p.sweep:
        timed, wrong = {}, {}
        table = p.sdrt().float().clone()  # every config writes the same ``out``
        for label, fn in p.sweep.items():
            try:
                diff = (fn().float() - table).abs().max().item()  # compiled outside the timing
            except Exception:  # noqa: BLE001 - a config may not fit in shared memory: skip it
                continue
            if not diff <= SWEEP_ATOL:  # a config that computes something else is no candidate
                wrong[label] = diff
                continue
            timed[label] = common.cuda_time(fn, warmup=warmup, repeats=repeats,
                                            flush_l2=flush_l2).median_ms
        if timed:
            best = min(timed, key=timed.get)
            row.update({"table_config": next(iter(p.sweep)), "sweep_best_config": best,
                        "sweep_best_ms": timed[best], "sweep_ms": timed})
        if wrong:
            row["sweep_wrong"] = wrong
    return row


SWEEP_COLUMNS = ["case", "sdrt_ms", "table_config", "sweep_best_ms", "sweep_best_config"]
# Max abs difference a swept config's output may have from the table's (fp16 inputs of about
# -2.3 ± 0.5: outputs near -2.3, a few fp16 ulps of 2e-3 apart from a changed summation order).
SWEEP_ATOL = 2e-2
COLUMNS = ["case", "used in", "sdrt_ms", "base_ms", "speedup", "GB/s", "TFLOP/s", "sdrt_roof_%",
           "base_roof_%", "baseline", "sdrt_first_call_ms", "max_abs_diff", "padded_d_ms",
           "padded_keys_ms"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--no-flush", action="store_true", help="keep L2 warm between repeats")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the attention kernel's SWEEP_BLOCKS per attention shape")
    args = ap.parse_args(argv)
    common.require_cuda("bench_kernels")

    info = common.device_info()
    ceiling = common.ceilings()
    uses = collections.defaultdict(list)  # Case → [(model, network, count)]
    for model in args.models:
        for network, calls in model_cases(model).items():
            for case, count in calls.items():
                if case.op in args.ops:
                    uses[case].append((model, network, count))

    rows = {}
    for case in sorted(uses, key=lambda c: (OPS.index(c.op), c.shape)):
        row = measure(case, ceiling, args.warmup, args.repeats, not args.no_flush, args.sweep)
        row["used in"] = ", ".join(f"{m} {n} ×{k}" for m, n, k in uses[case])
        rows[case] = row
        print(f"{row['case']:<44} sdrt {row['sdrt_ms']:8.4f} ms   base "
              f"{row.get('base_ms', float('nan')):8.4f} ms ({row['baseline']})", flush=True)

    totals = collections.defaultdict(lambda: [0.0, 0.0])
    for case, row in rows.items():
        for model, network, count in uses[case]:
            t = totals[(model, network, case.op)]
            t[0] += count * row["sdrt_ms"]
            t[1] += count * row.get("base_ms", float("nan"))
    total_rows = [{"model": m, "network": n, "op": o, "sdrt_ms": s, "base_ms": b,
                   "saved_ms": b - s} for (m, n, o), (s, b) in sorted(totals.items())]

    notes = ["fp16 unless the case names its dtype (SDXL's VAE decodes in float32); median "
             f"of {args.repeats} CUDA-event timings after {args.warmup} warm-up calls; L2 "
             f"{'warm' if args.no_flush else 'flushed before each repeat'}.",
             "roof %: max(bytes / copy bandwidth, FLOPs / fp16 matmul rate) over the time; "
             "bytes are the fewest the op must move.",
             "Totals: Σ calls × median time over one forward of each network (UNet: one "
             "step, batch 2 with CFG, 1 for SDXL-Turbo)."]
    sections = {"Kernels": (list(rows.values()), COLUMNS),
                "Per network": (total_rows, ["model", "network", "op", "sdrt_ms", "base_ms",
                                             "saved_ms"])}
    swept = [row for row in rows.values() if "sweep_best_config" in row]
    if swept:
        sections["Attention block sweep"] = (swept, SWEEP_COLUMNS)
        notes.append("Attention block sweep: the table's config (sdrt_ms) and the fastest of "
                     "attention.SWEEP_BLOCKS at the same pieces; every config's time is in the "
                     "JSON (sweep_ms).")
    json_path, md_path = common.write_report("bench_kernels", info, ceiling, sections, notes)
    print(common.markdown_table(total_rows, ["model", "network", "op", "sdrt_ms", "base_ms",
                                             "saved_ms"]))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
