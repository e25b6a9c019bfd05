"""The fused GroupNorm → SiLU → conv2d (+ add) kernel against the plain-PyTorch reference.

On CPU the Triton kernels run under the interpreter (see conftest.py), so the shapes here are
tiny; the ``gpu`` tests at the end run the real SD 1.5 shapes. ``test_sm90_code_of_engine_convs``
compiles, for sm_90 and without a GPU, every specialisation the engine launches at SD 1.5
shapes, and checks the machine code: no stack, vector (not 2-byte) loads, cp.async, wgmma with
a group in flight.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from sdrt.engine.layers import channels_last_conv_weights, use_conv_chooser
from sdrt.kernels import conv_autotune, group_norm_silu_conv2d
from sdrt.kernels.conv_autotune import FUSED, UNFUSED, ConvPathChooser, group_norm_then_conv2d
from sdrt.kernels.group_norm_silu_conv2d import (ConvConfig, _group_norm_silu_conv2d_triton,
                                                 _group_stats, conv_config,
                                                 group_norm_silu_conv2d_reference)

# the modules, not the functions that ``sdrt.kernels.group_norm`` (...) names
group_norm_module = importlib.import_module("sdrt.kernels.group_norm")
group_norm_silu_conv2d_module = importlib.import_module("sdrt.kernels.group_norm_silu_conv2d")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol). Both paths round the normalised tensor to the dtype; the kernel then sums
# in fp32 and rounds once, the reference rounds the conv output and again after ``+ add``: the
# difference is a couple of output ulps (fp16: 2⁻¹¹ relative, bf16: 2⁻⁸).
DTYPES = [(torch.float16, 1e-2, 1e-2), (torch.bfloat16, 6e-2, 2e-2)]
DTYPE_IDS = ["fp16", "bf16"]

# A config with small blocks, so that the tiny shapes below still take several M, N and K
# blocks, several statistics tiles and splits, and masked edges in all of them.
SMALL = ConvConfig(block_m=32, block_n=16, block_k=16, num_warps=4, num_stages=2, group_m=2,
                   stats_block_p=16, stats_block_c=16, stats_max_splits=3)
CONFIGS = {"table": None, "small": SMALL}

# (N, Cin, H, W, Cout, kernel, stride, padding, groups, add, bias, layouts): layouts is
# "<x>/<weight>": x "nhwc" (channels_last, read in place) or "nchw" (contiguous: the statistics
# pass copies it to channels_last); weight "cl" (channels_last, as the engine stores it) or
# "oihw" (contiguous: the launcher copies it, with a warning)
SHAPES = [
    # UNet conv1: time embedding N×C×1×1; 8×8 output pixels a sample put every M tile inside
    # one sample (TILE_IN_ONE_SAMPLE) with either config
    (2, 16, 8, 8, 16, 3, 1, 1, 4, "channel", True, "nhwc/cl"),
    # UNet conv2: residual N×C×H×W added in the epilogue
    (2, 16, 8, 8, 16, 3, 1, 1, 4, "full", True, "nhwc/cl"),
    # H ≠ W, NCHW input (copied by the statistics pass), no add, Cout 20 not a multiple of any
    # block
    (2, 24, 7, 5, 20, 3, 1, 1, 8, None, True, "nchw/cl"),
    # stride 2 (the downsampling convs' geometry), residual, OIHW weights
    (2, 12, 8, 6, 10, 3, 2, 1, 4, "full", True, "nhwc/oihw"),
    # 1×1 kernel, padding 0, no bias, N = 1, both operands contiguous
    (1, 8, 5, 5, 24, 1, 1, 0, 2, "full", False, "nchw/oihw"),
    # odd Cout 9, 3 channels a group, N = 3: M tiles span samples (scale/shift gathered per row)
    (3, 18, 6, 7, 9, 3, 1, 1, 6, "channel", False, "nhwc/cl"),
    # Cin 40 > block_k: several K blocks a tap, the last one masked; odd Cout 33; stride 2 on
    # odd sizes
    (2, 40, 5, 6, 33, 3, 2, 1, 8, "channel", True, "nchw/cl"),
]


def _ids(shape):
    n, cin, h, w, cout, k, s, p, g, add, bias, layouts = shape
    return (f"{n}x{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}-g{g}-add_{add}-{'bias' if bias else 'nobias'}"
            f"-{layouts.replace('/', '-')}")


def _inputs(shape, dtype, seed=0):
    """Fresh, non-zero-mean inputs (GroupNorm must remove the −2.3)."""
    n, cin, h, w, cout, k, s, p, g, add_kind, has_bias, layouts = shape
    x_layout, w_layout = layouts.split("/")
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*size, generator=gen)).to(DEVICE, dtype)

    x = rand(n, cin, h, w, mean=-2.3, std=0.5)
    if x_layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    add = {None: None, "channel": lambda: rand(n, cout, 1, 1),
           "full": lambda: rand(n, cout, ho, wo)}[add_kind]
    weight = rand(cout, cin, k, k, std=(cin * k * k) ** -0.5)
    if w_layout == "cl":
        weight = weight.to(memory_format=torch.channels_last)
    return dict(x=x, norm_weight=rand(cin, mean=1.0, std=0.2), norm_bias=rand(cin, std=0.2),
                num_groups=g, conv_weight=weight,
                conv_bias=rand(cout, std=0.2) if has_bias else None,
                stride=s, padding=p, add=add() if add else None), (n, cout, ho, wo)


def _call(fn, inputs, **extra):
    i = dict(inputs)
    return fn(i.pop("x"), i.pop("norm_weight"), i.pop("norm_bias"), i.pop("num_groups"),
              i.pop("conv_weight"), i.pop("conv_bias"), **i, **extra)


OIHW_WARNING = "ignore:group_norm_silu_conv2d. conv_weight is not channels_last"


@pytest.mark.filterwarnings(OIHW_WARNING)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_reference(shape, dtype, atol, rtol, config):
    inputs, out_shape = _inputs(shape, dtype)
    # poisoned output: every element the kernel fails to write stays NaN and fails the check
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)
    got = _call(_group_norm_silu_conv2d_triton, inputs, out=out, config=config)
    assert got is out
    want = _call(group_norm_silu_conv2d_reference, inputs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{_ids(shape)} {dtype}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_public_op_runs_triton_path(monkeypatch, dtype, atol, rtol):
    monkeypatch.setenv("SDRT_BACKEND", "triton")
    inputs, _ = _inputs(SHAPES[0], dtype, seed=1)
    got = _call(group_norm_silu_conv2d, inputs)
    assert got.is_contiguous(memory_format=torch.channels_last)
    want = _call(group_norm_silu_conv2d_reference, inputs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_float32_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("SDRT_BACKEND", "triton")
    inputs, _ = _inputs(SHAPES[1], torch.float32, seed=2)
    torch.testing.assert_close(_call(group_norm_silu_conv2d, inputs),
                               _call(group_norm_silu_conv2d_reference, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("offset", [-2.3, 300.0], ids=["sd_like", "large_mean"])
@pytest.mark.parametrize("c, g", [(12, 3), (160, 2)], ids=["4_per_group", "80_per_group"])
def test_group_stats_are_stable(offset, c, g):
    # fp32 input with a mean far above its spread: E[x²] − E[x]² would lose the variance
    # (x² ≈ 9·10⁴ with fp32 ulp ~0.008 per element); the merged per-tile statistics do not.
    # 80 channels a group: the finalize kernel merges them in three blocks, the last ragged;
    # each channel's mean differs, so a block dropped or counted twice moves the group's.
    n, h, w = 2, 9, 7
    gen = torch.Generator().manual_seed(3)
    x = offset + 0.5 * torch.randn(n, c, h, w, generator=gen)
    x = (x + torch.linspace(-1, 1, c)[None, :, None, None]).to(DEVICE)
    gamma = (1 + 0.2 * torch.randn(c, generator=gen)).to(DEVICE)
    beta = (0.2 * torch.randn(c, generator=gen)).to(DEVICE)
    mean, rstd, scale, shift = _group_stats(x, g, gamma, beta, 1e-5, SMALL)
    xd = x.double().reshape(n, g, -1)
    want_mean = xd.mean(-1)
    want_rstd = (xd.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(mean.double(), want_mean, atol=1e-5 * abs(offset), rtol=1e-6)
    torch.testing.assert_close(rstd.double(), want_rstd, atol=0, rtol=1e-4)
    per_channel = rstd.repeat_interleave(c // g, dim=1) * gamma
    torch.testing.assert_close(scale, per_channel, atol=0, rtol=1e-6)
    torch.testing.assert_close(shift, beta - mean.repeat_interleave(c // g, dim=1) * per_channel,
                               atol=1e-6 * abs(offset), rtol=1e-5)


def test_conv_config_fits_small_shapes():
    cfg = conv_config(cin=4, cout=3, hw_out=25)
    assert (cfg.block_n, cfg.block_k) == (16, 16)
    big = conv_config(cin=1280, cout=1280, hw_out=32 * 32)
    assert big.block_n >= 64 and (32 * 32) % big.block_m == 0
    # the UNet's 8×8 level: M tiles must not straddle samples
    assert conv_config(cin=1280, cout=1280, hw_out=8 * 8).block_m == 64


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(x=i["x"][0]), "N×C×H×W"),
    (lambda i: i.update(num_groups=5), "groups"),
    (lambda i: i.update(norm_weight=i["norm_weight"][:-1]), "norm_weight"),
    (lambda i: i.update(norm_bias=i["norm_bias"].to("meta")), "norm_bias"),
    (lambda i: i.update(conv_weight=i["conv_weight"][:, :-1]), "conv_weight"),
    (lambda i: i.update(conv_weight=i["conv_weight"].float()), "conv_weight"),
    (lambda i: i.update(conv_bias=i["conv_bias"][:-1]), "conv_bias"),
    # the same values through a stride of 2: the kernels index γ, β and the bias densely
    (lambda i: i.update(norm_weight=i["norm_weight"].repeat_interleave(2)[::2]), "contiguous"),
    (lambda i: i.update(norm_bias=i["norm_bias"].repeat_interleave(2)[::2]), "contiguous"),
    (lambda i: i.update(conv_bias=i["conv_bias"].repeat_interleave(2)[::2]), "contiguous"),
    (lambda i: i.update(add=i["add"][:, :-1]), "broadcast"),
    (lambda i: i.update(stride=0), "stride"),
    (lambda i: i.update(padding=-1), "padding"),
    (lambda i: i.update(x=i["x"][:, :, :1, :1], padding=0), "does not fit"),
], ids=["x_3d", "groups", "norm_weight_shape", "norm_bias_device", "weight_cin",
        "weight_dtype", "conv_bias_shape", "norm_weight_strided", "norm_bias_strided",
        "conv_bias_strided", "add_shape", "stride", "padding", "kernel_too_big"])
def test_bad_inputs_raise(change, match):
    inputs, _ = _inputs(SHAPES[1], torch.float16)
    change(inputs)
    for fn in (group_norm_silu_conv2d, _group_norm_silu_conv2d_triton):
        with pytest.raises(ValueError, match=match):
            _call(fn, inputs)


def test_triton_path_rejects_float32_and_bad_out():
    inputs, out_shape = _inputs(SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        _call(_group_norm_silu_conv2d_triton, inputs)
    inputs, out_shape = _inputs(SHAPES[0], torch.float16)
    with pytest.raises(ValueError, match="out must be"):
        _call(_group_norm_silu_conv2d_triton, inputs,
              out=torch.empty(out_shape[:-1] + (1,), dtype=torch.float16, device=DEVICE))


class _FakeTimer:
    """Returns scripted seconds, in the order the chooser times its paths; counts calls."""

    def __init__(self, *seconds):
        self.seconds = list(seconds)
        self.calls = 0

    def __call__(self, fn):
        fn()  # the timed callable must run
        self.calls += 1
        return self.seconds.pop(0)


def _spy(monkeypatch, module, name):
    """Replaces ``module.name`` by a wrapper that records each call; returns the call list."""
    calls, fn = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def test_chooser_times_once_per_shape_and_caches(triton_backend, monkeypatch):
    # triton_backend: the real paths (Triton kernels, interpreted on CPU), not the reference
    # (fused, unfused) seconds for shape A, then B, then A in NCHW layout
    timer = _FakeTimer(2.0, 1.0, 1.0, 3.0, 1.0, 2.0)
    chooser = ConvPathChooser(timer=timer, timed_devices=(DEVICE,))
    a, _ = _inputs(SHAPES[0], torch.float16)
    b, _ = _inputs(SHAPES[4], torch.float16)
    assert _call(chooser.choose, a) == UNFUSED
    assert _call(chooser.choose, a) == UNFUSED   # cached: not timed again
    assert timer.calls == 2
    assert _call(chooser.choose, b) == FUSED
    assert timer.calls == 4
    assert chooser.times[next(iter(chooser.times))] == {FUSED: 2.0, UNFUSED: 1.0}
    # the same shapes in another memory layout are another key
    assert _call(chooser.choose, {**a, "x": a["x"].contiguous()}) == FUSED
    assert timer.calls == 6 and len(chooser.choices) == 3
    # a call runs the chosen path (here the unfused one, over the Triton GroupNorm) and agrees
    # with the reference
    unfused = _spy(monkeypatch, conv_autotune, "group_norm_then_conv2d")
    fused = _spy(monkeypatch, conv_autotune, "group_norm_silu_conv2d")
    triton_norm = _spy(monkeypatch, group_norm_module, "_group_norm_triton")
    torch.testing.assert_close(_call(chooser, a), _call(group_norm_silu_conv2d_reference, a),
                               atol=1e-2, rtol=1e-2)
    assert (unfused, fused, triton_norm) == (["group_norm_then_conv2d"], [],
                                             ["_group_norm_triton"])
    assert timer.calls == 6


def test_chooser_keys_weight_layout(triton_backend):
    # OIHW weights cost the fused path a copy per call: another key, timed separately
    timer = _FakeTimer(1.0, 2.0, 2.0, 1.0)
    chooser = ConvPathChooser(timer=timer, timed_devices=(DEVICE,))
    a, _ = _inputs(SHAPES[0], torch.float16, seed=13)
    assert _call(chooser.choose, a) == FUSED
    with pytest.warns(UserWarning, match="not channels_last"):
        oihw = _call(chooser.choose, {**a, "conv_weight": a["conv_weight"].contiguous()})
    assert oihw == UNFUSED and timer.calls == 4 and len(chooser.choices) == 2


def test_chooser_cache_file_is_reused_by_a_new_process(triton_backend, tmp_path):
    path = tmp_path / "sub" / "conv_paths.json"
    a, _ = _inputs(SHAPES[0], torch.float16, seed=14)
    first = ConvPathChooser(timer=_FakeTimer(2.0, 1.0), timed_devices=(DEVICE,), cache_file=path)
    assert _call(first.choose, a) == UNFUSED
    saved = json.loads(path.read_text())
    (text_key, entry), = saved.items()
    assert entry == {"choice": UNFUSED, "times": {FUSED: 2.0, UNFUSED: 1.0}}
    assert "float16" in text_key and torch.__version__ in text_key
    # a second chooser (as in a new process) reads the choice and times nothing for it ...
    never = _FakeTimer()
    second = ConvPathChooser(timer=never, timed_devices=(DEVICE,), cache_file=path)
    assert _call(second.choose, a) == UNFUSED and never.calls == 0
    assert second.times == first.times
    # ... but times a shape it has not seen, and adds it to the file
    third = ConvPathChooser(timer=_FakeTimer(1.0, 3.0), timed_devices=(DEVICE,), cache_file=path)
    b, _ = _inputs(SHAPES[1], torch.float16, seed=15)
    assert _call(third.choose, b) == FUSED and _call(third.choose, a) == UNFUSED
    assert len(json.loads(path.read_text())) == 2
    # a damaged file is timed again and rewritten, not an error
    path.write_text("{not json")
    fourth = ConvPathChooser(timer=_FakeTimer(3.0, 1.0), timed_devices=(DEVICE,),
                             cache_file=path)
    assert _call(fourth.choose, b) == UNFUSED and len(json.loads(path.read_text())) == 1


def test_chooser_times_nothing_off_the_gpu():
    timer = _FakeTimer()
    chooser = ConvPathChooser(timer=timer)  # times on CUDA only
    inputs, _ = _inputs(SHAPES[0], torch.float16)
    inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    assert _call(chooser.choose, inputs) == FUSED
    assert timer.calls == 0 and not chooser.choices


def test_unfused_path_matches_reference(triton_backend, monkeypatch):
    # triton_backend: GroupNorm+SiLU by its Triton kernel, as on the GPU
    triton_norm = _spy(monkeypatch, group_norm_module, "_group_norm_triton")
    inputs, _ = _inputs(SHAPES[3], torch.float16)
    torch.testing.assert_close(_call(group_norm_then_conv2d, inputs),
                               _call(group_norm_silu_conv2d_reference, inputs),
                               atol=1e-2, rtol=1e-2)
    assert triton_norm == ["_group_norm_triton"]


def test_layouts_give_identical_results(triton_backend):
    # The four x/weight layout pairs run the same kernel on the same values (NCHW x through the
    # statistics pass's channels_last copy, OIHW weights through the launcher's copy): equal bit
    # for bit, and equal to the reference within tolerance. An OIHW weight warns about its copy.
    shape = (2, 24, 6, 5, 20, 3, 1, 1, 4, "full", True, "nhwc/cl")
    inputs, out_shape = _inputs(shape, torch.float16, seed=11)
    want = _call(group_norm_silu_conv2d_reference, inputs)
    results = {}
    for x_layout in ("nhwc", "nchw"):
        for w_layout in ("cl", "oihw"):
            x = inputs["x"].contiguous(memory_format=torch.channels_last if x_layout == "nhwc"
                                       else torch.contiguous_format)
            w = inputs["conv_weight"].contiguous(memory_format=torch.channels_last
                                                 if w_layout == "cl" else torch.contiguous_format)
            assert x.is_contiguous() == (x_layout == "nchw")
            assert w.is_contiguous() == (w_layout == "oihw")
            out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=torch.float16)
            if w_layout == "oihw":
                with pytest.warns(UserWarning, match="not channels_last"):
                    _call(_group_norm_silu_conv2d_triton, {**inputs, "x": x, "conv_weight": w},
                          out=out, config=SMALL)
            else:
                _call(_group_norm_silu_conv2d_triton, {**inputs, "x": x, "conv_weight": w},
                      out=out, config=SMALL)
            results[x_layout, w_layout] = out
    first = results["nhwc", "cl"]
    torch.testing.assert_close(first, want, atol=1e-2, rtol=1e-2)
    for key, got in results.items():
        assert torch.equal(got, first), f"{key}: differs from nhwc/cl by " \
            f"{(got.float() - first.float()).abs().max().item():.3e}"


def test_channels_last_conv_weights_keep_names_shapes_and_values():
    from sdrt.engine.layers import ResnetBlock2D
    with torch.random.fork_rng():  # seeded initialisation, without touching the global RNG
        torch.manual_seed(12)
        block = ResnetBlock2D(16, 32, 8, groups=4, eps=1e-5)  # conv1, conv2, conv_shortcut
    before = {k: v.clone() for k, v in block.state_dict().items()}
    channels_last_conv_weights(block)
    after = block.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k
    for conv in (block.conv1, block.conv2, block.conv_shortcut):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert isinstance(conv.weight, torch.nn.Parameter)
    for conv in (block.conv1, block.conv2):  # 3×3: really another storage order (1×1 is both)
        assert not conv.weight.is_contiguous()


def test_use_conv_chooser_converts_weights_off_the_cpu_only():
    # On the CPU the layout would change the reference convolution's sums (and the fused kernel
    # does not run there); on the meta device, which stands in for the GPU in launch walks, and
    # on a GPU, the weights become channels_last.
    from sdrt.engine.layers import ResnetBlock2D
    chooser = ConvPathChooser()
    for device, converted in (("cpu", False), ("meta", True)):
        with torch.device(device):
            block = ResnetBlock2D(16, 16, 8, groups=4, eps=1e-5)
        use_conv_chooser(block, chooser)
        assert block.ops.gn_silu_conv is chooser
        assert block.conv1.weight.is_contiguous(memory_format=torch.channels_last) == converted
        assert block.conv1.weight.is_contiguous() != converted


def test_sweep_configs_come_from_the_table_module():
    # bench_conv's --sweep takes its candidates from the kernel module, fitted like the table's
    cfgs = group_norm_silu_conv2d_module.sweep_configs(cin=24, cout=20, hw_out=48)
    assert cfgs and len(set(cfgs)) == len(cfgs)
    for c in cfgs:  # fitted: Cout 20 and Cin 24 take 32-wide N and K blocks
        assert c.block_n == 32 and c.block_k == 32
    assert len(cfgs) < len(group_norm_silu_conv2d_module.SWEEP_CONFIGS)  # repeats dropped
    assert all(c.tuned_on is None for _, c in group_norm_silu_conv2d_module._CONV_TABLE)


# -- sm_90 machine code of the engine's conv specialisations, compiled without a GPU
# Tools shipped in Triton's wheel read the cubin.
def _triton_bin(tool):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _cubin_facts(compiled):
    """What the machine code of a Triton ``CompiledKernel`` does: registers, stack bytes,
    local-memory (spill) instructions, scalar 2-byte global loads, cp.async (LDGSTS), wgmma
    (HGMMA) instructions and the depths of its ``wgmma.wait_group`` waits."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", compiled.asm["ptx"])
    return dict(regs=int(re.search(r"REG:(\d+)", res).group(1)),
                stack=int(re.search(r"STACK:(\d+)", res).group(1)),
                local=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                scalar_u16_loads=len(re.findall(r"LDG\.E\.U16\b", sass)),
                cp_async=len(re.findall(r"\bLDGSTS\b", sass)),
                wgmma=len(re.findall(r"\bHGMMA\b", sass)),
                max_wgmma_in_flight=max((int(w) for w in waits), default=-1),
                smem=compiled.metadata.shared)


def _engine_conv_calls():
    """Distinct (x, norm_weight, norm_bias, groups, conv_weight, conv_bias, kwargs) of every
    GroupNorm+SiLU+conv the SD 1.5 UNet (batch 2, 64² latent) and VAE decoder (512²) make, as
    meta tensors with the engine's layouts: the real modules run on the meta device (the ops
    around the conv by their reference, which costs nothing there), conv weights converted by
    ``use_conv_chooser`` as on a GPU, convolutions laid out as cuDNN lays them out."""
    from sdrt.benchmarks.launches import cudnn_layout_mode
    from sdrt.engine.configs import model_config
    from sdrt.engine.loading import build
    calls = {}

    def record(x, nw, nb, g, w, b=None, *, eps=1e-5, stride=1, padding=1, add=None,
               padding_mode="zeros"):
        key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), b is not None,
               None if add is None else (tuple(add.shape), add.stride()), stride, padding, g)
        calls.setdefault(key, (x, nw, nb, g, w, b, dict(eps=eps, stride=stride,
                                                         padding=padding, add=add)))
        cout, _, kh, kw = w.shape
        size = [(s + 2 * padding - k) // stride + 1 for s, k in zip(x.shape[2:], (kh, kw))]
        return torch.empty(x.shape[0], cout, *size, device="meta", dtype=x.dtype,
                           memory_format=torch.channels_last)  # as the Triton path allocates

    cfg = model_config("sd15")
    meta = dict(device="meta", dtype=torch.float16)
    os.environ["SDRT_BACKEND"] = "torch"  # the ops around the conv: reference paths on meta
    with torch.no_grad(), cudnn_layout_mode():
        unet = build("unet", cfg["unet"]).half()
        use_conv_chooser(unet, record)
        latent = cfg["unet"]["sample_size"]
        unet(torch.empty(2, 4, latent, latent, **meta), torch.empty((), device="meta"),
             torch.empty(2, 77, cfg["unet"]["cross_attention_dim"], **meta))
        vae = build("vae", cfg["vae"]).half()
        use_conv_chooser(vae, record)
        side = cfg["vae"]["sample_size"] // 8
        vae.decode(torch.empty(1, 4, side, side, **meta))
    return list(calls.values())


def sm90_conv_facts():
    """{kernel specialisation: cubin facts} for the engine's conv calls, each also with NCHW
    input (the other input layout the kernel takes) and, where padded, circular padding
    (seamless tiling), plus a 1×1 and a stride-2 conv (not engine calls: the kernel's other
    geometries). Runs in a process without TRITON_INTERPRET."""
    from sdrt.benchmarks.launches import fake_hopper, unique
    calls = _engine_conv_calls()
    meta = dict(device="meta", dtype=torch.float16)
    cl = torch.channels_last
    for cin, cout, size, k, stride in ((640, 1280, 32, 1, 1), (320, 320, 64, 3, 2)):
        calls.append((torch.empty(2, cin, size, size, **meta).to(memory_format=cl),
                      torch.empty(cin, **meta), torch.empty(cin, **meta), 32,
                      torch.empty(cout, cin, k, k, **meta).to(memory_format=cl),
                      torch.empty(cout, **meta), dict(stride=stride, padding=k // 2)))
    with fake_hopper() as rec:
        for x, nw, nb, g, w, b, kwargs in calls:
            for x_in in (x, x.contiguous()):
                _group_norm_silu_conv2d_triton(x_in, nw, nb, g, w, b, **kwargs)
            if kwargs.get("padding", 1):  # seamless tiling's wrapped taps (engine layout)
                _group_norm_silu_conv2d_triton(x, nw, nb, g, w, b, **kwargs,
                                               padding_mode="circular")
        kernels = unique(rec.launches)
    return {f"{la.kernel} {dict(la.constants)} {dict(la.attrs)} w{la.num_warps} "
            f"s{la.num_stages}": dict(kernel=la.kernel, launches=n, **_cubin_facts(la.compiled))
            for la, n in kernels}


def test_sm90_code_of_engine_convs():
    # Compiled for sm_90 as the engine launches them (meta tensors, a fake Hopper driver, the
    # real compiler and ptxas) in a child process, where TRITON_INTERPRET is unset.
    if not os.path.exists(_triton_bin("cuobjdump")):
        pytest.skip("this triton wheel ships no cuobjdump")
    pytest.importorskip("sdrt.benchmarks.launches")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, test_group_norm_silu_conv2d as t; "
            "print(json.dumps(t.sm90_conv_facts()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    convs = {k: f for k, f in facts.items() if f["kernel"] == "_gn_silu_conv2d_kernel"}
    stats = {k: f for k, f in facts.items() if f["kernel"] == "_group_stats_kernel"}
    assert len(convs) >= 4 and len(stats) == 2, sorted(facts)  # stats: in place and copying
    for name, f in facts.items():
        assert f["stack"] == 0 and f["local"] == 0, f"{name}: spills {f}"
    for name, f in stats.items():
        assert f["scalar_u16_loads"] == 0, f"{name}: {f}"
    for name, f in convs.items():
        assert f["scalar_u16_loads"] <= 8, f"{name}: gathers with 2-byte loads: {f}"
        assert f["cp_async"] > 0, f"{name}: no cp.async, the K loop is not pipelined: {f}"
        assert f["wgmma"] > 0 and f["max_wgmma_in_flight"] >= 1, f"{name}: {f}"


# -- on the GPU: the real SD 1.5 shapes (UNet at batch 2, 64×64 latent; VAE decoder at 512²)
GPU_SHAPES = [
    # UNet down block 0 conv1 (time embedding) and conv2 (residual), 320 ch at 64×64
    (2, 320, 64, 64, 320, 3, 1, 1, 32, "channel", True, "nhwc/cl"),
    (2, 320, 64, 64, 320, 3, 1, 1, 32, "full", True, "nhwc/cl"),
    # UNet up block 2: 1920 → 640 at 32×32 (skip concat), time embedding
    (2, 1920, 32, 32, 640, 3, 1, 1, 32, "channel", True, "nhwc/cl"),
    # UNet mid block: 1280 at 8×8, M = 128 (tiles are few)
    (2, 1280, 8, 8, 1280, 3, 1, 1, 32, "full", True, "nhwc/cl"),
    # UNet conv_norm_out → conv_out: 320 → 4
    (2, 320, 64, 64, 4, 3, 1, 1, 32, None, True, "nhwc/cl"),
    # VAE decoder last up block: 256 → 128 at 512×512 and 128 → 128 with residual
    (1, 256, 512, 512, 128, 3, 1, 1, 32, None, True, "nhwc/cl"),
    (1, 128, 512, 512, 128, 3, 1, 1, 32, "full", True, "nhwc/cl"),
    # NCHW input (copied to channels_last by the statistics pass) at a UNet size
    (2, 320, 64, 64, 320, 3, 1, 1, 32, "full", True, "nchw/cl"),
    # a 1×1 shortcut-sized conv and a stride-2 one at UNet sizes, contiguous operands
    (2, 640, 32, 32, 1280, 1, 1, 0, 32, None, True, "nchw/oihw"),
    (2, 320, 64, 64, 320, 3, 2, 1, 32, None, False, "nchw/oihw"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids)
@pytest.mark.filterwarnings(OIHW_WARNING)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_reference_sd_shapes(shape, dtype, atol, rtol):
    inputs, out_shape = _inputs(shape, dtype)
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)
    got = _call(_group_norm_silu_conv2d_triton, inputs, out=out)
    want = _call(group_norm_silu_conv2d_reference, inputs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{_ids(shape)} {dtype}: {m}")


@pytest.mark.gpu
def test_chooser_on_gpu_runs_both_paths_and_keeps_the_faster():
    # Each path, forced, agrees with the reference; the chooser times both once (the real CUDA
    # timer, counted), records the faster and reuses it without timing again.
    timed = []

    def timer(fn):
        timed.append(fn)
        return conv_autotune.cuda_median_time(fn)

    chooser = ConvPathChooser(timer=timer)
    inputs, _ = _inputs(GPU_SHAPES[0], torch.float16, seed=7)
    want = _call(group_norm_silu_conv2d_reference, inputs)
    for path in (_group_norm_silu_conv2d_triton, group_norm_then_conv2d):
        torch.testing.assert_close(_call(path, inputs), want, atol=1e-2, rtol=1e-2,
                                   msg=lambda m: f"{path.__name__}: {m}")
    path = _call(chooser.choose, inputs)
    (key, times), = chooser.times.items()
    assert len(timed) == 2 and set(times) == {FUSED, UNFUSED}
    assert path == min(times, key=times.get) and chooser.choices[key] == path
    assert _call(chooser.choose, inputs) == path and len(timed) == 2
    torch.testing.assert_close(_call(chooser, inputs), want, atol=1e-2, rtol=1e-2)
    assert len(timed) == 2
