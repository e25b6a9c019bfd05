"""The fused GroupNorm → SiLU → conv2d (+ add) kernel against the plain-PyTorch reference.

On CPU the Triton kernels run under the interpreter (see conftest.py), so the shapes here are
tiny; the ``gpu`` tests at the end run the real SD 1.5 shapes.
"""
import importlib

import pytest
import torch

from sdrt.kernels import conv_autotune, group_norm_silu_conv2d
from sdrt.kernels.conv_autotune import FUSED, UNFUSED, ConvPathChooser, group_norm_then_conv2d
from sdrt.kernels.group_norm_silu_conv2d import (ConvConfig, _group_norm_silu_conv2d_triton,
                                                 _group_stats, conv_config,
                                                 group_norm_silu_conv2d_reference)

# the module, not the function that ``sdrt.kernels.group_norm`` names
group_norm_module = importlib.import_module("sdrt.kernels.group_norm")
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

# (N, Cin, H, W, Cout, kernel, stride, padding, groups, add, bias, channels_last): the last
# puts x and conv_weight in channels_last, else both are contiguous (NCHW, OIHW)
SHAPES = [
    # UNet conv1: time embedding N×C×1×1, channels_last; 8×8 output pixels a sample put every
    # M tile inside one sample (TILE_IN_ONE_SAMPLE) with either config
    (2, 16, 8, 8, 16, 3, 1, 1, 4, "channel", True, True),
    # UNet conv2: residual N×C×H×W added in the epilogue
    (2, 16, 8, 8, 16, 3, 1, 1, 4, "full", True, True),
    # H ≠ W, contiguous (NCHW) input, no add, Cout 20 not a multiple of any block
    (2, 24, 7, 5, 20, 3, 1, 1, 8, None, True, False),
    # stride 2 (the downsampling convs' geometry), residual
    (2, 12, 8, 6, 10, 3, 2, 1, 4, "full", True, True),
    # 1×1 kernel, padding 0, no bias, N = 1
    (1, 8, 5, 5, 24, 1, 1, 0, 2, "full", False, False),
    # odd Cout 9, 3 channels a group, N = 3: M tiles span samples (scale/shift gathered per row)
    (3, 18, 6, 7, 9, 3, 1, 1, 6, "channel", False, True),
    # Cin 40 > block_k: several K blocks a tap, the last one masked; odd Cout 33; stride 2 on
    # odd sizes
    (2, 40, 5, 6, 33, 3, 2, 1, 8, "channel", True, False),
]


def _ids(shape):
    n, cin, h, w, cout, k, s, p, g, add, bias, cl = shape
    return (f"{n}x{cin}x{h}x{w}-{cout}-k{k}s{s}p{p}-g{g}-add_{add}-{'bias' if bias else 'nobias'}"
            f"-{'nhwc' if cl else 'nchw'}")


def _inputs(shape, dtype, seed=0):
    """Fresh, non-zero-mean inputs (GroupNorm must remove the −2.3)."""
    n, cin, h, w, cout, k, s, p, g, add_kind, has_bias, channels_last = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*size, generator=gen)).to(DEVICE, dtype)

    x = rand(n, cin, h, w, mean=-2.3, std=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    add = {None: None, "channel": lambda: rand(n, cout, 1, 1),
           "full": lambda: rand(n, cout, ho, wo)}[add_kind]
    weight = rand(cout, cin, k, k, std=(cin * k * k) ** -0.5)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    return dict(x=x, norm_weight=rand(cin, mean=1.0, std=0.2), norm_bias=rand(cin, std=0.2),
                num_groups=g, conv_weight=weight,
                conv_bias=rand(cout, std=0.2) if has_bias else None,
                stride=s, padding=p, add=add() if add else None), (n, cout, ho, wo)


def _call(fn, inputs, **extra):
    i = dict(inputs)
    return fn(i.pop("x"), i.pop("norm_weight"), i.pop("norm_bias"), i.pop("num_groups"),
              i.pop("conv_weight"), i.pop("conv_bias"), **i, **extra)


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
def test_group_stats_are_stable(offset):
    # fp32 input with a mean far above its spread: E[x²] − E[x]² would lose the variance
    # (x² ≈ 9·10⁴ with fp32 ulp ~0.008 per element); the merged per-tile statistics do not.
    n, c, h, w, g = 2, 12, 9, 7, 3
    gen = torch.Generator().manual_seed(3)
    x = (offset + 0.5 * torch.randn(n, c, h, w, generator=gen)).to(DEVICE)
    mean, rstd, scale, shift = _group_stats(x, g, None, None, 1e-5, SMALL)
    xd = x.double().reshape(n, g, -1)
    want_mean = xd.mean(-1)
    want_rstd = (xd.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(mean.double(), want_mean, atol=1e-5 * abs(offset), rtol=1e-6)
    torch.testing.assert_close(rstd.double(), want_rstd, atol=0, rtol=1e-4)
    torch.testing.assert_close(scale, rstd.repeat_interleave(c // g, dim=1), atol=0, rtol=0)


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


# -- on the GPU: the real SD 1.5 shapes (UNet at batch 2, 64×64 latent; VAE decoder at 512²)
GPU_SHAPES = [
    # UNet down block 0 conv1 (time embedding) and conv2 (residual), 320 ch at 64×64
    (2, 320, 64, 64, 320, 3, 1, 1, 32, "channel", True, True),
    (2, 320, 64, 64, 320, 3, 1, 1, 32, "full", True, True),
    # UNet up block 2: 1920 → 640 at 32×32 (skip concat), time embedding
    (2, 1920, 32, 32, 640, 3, 1, 1, 32, "channel", True, True),
    # UNet mid block: 1280 at 8×8, M = 128 (tiles are few)
    (2, 1280, 8, 8, 1280, 3, 1, 1, 32, "full", True, True),
    # UNet conv_norm_out → conv_out: 320 → 4
    (2, 320, 64, 64, 4, 3, 1, 1, 32, None, True, True),
    # VAE decoder last up block: 256 → 128 at 512×512 and 128 → 128 with residual
    (1, 256, 512, 512, 128, 3, 1, 1, 32, None, True, True),
    (1, 128, 512, 512, 128, 3, 1, 1, 32, "full", True, True),
    # a 1×1 shortcut-sized conv and a stride-2 one at UNet sizes, contiguous input
    (2, 640, 32, 32, 1280, 1, 1, 0, 32, None, True, False),
    (2, 320, 64, 64, 320, 3, 2, 1, 32, None, False, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_reference_sd_shapes(shape, dtype, atol, rtol):
    inputs, out_shape = _inputs(shape, dtype)
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)
    got = _call(_group_norm_silu_conv2d_triton, inputs, out=out)
    want = _call(group_norm_silu_conv2d_reference, inputs)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{_ids(shape)} {dtype}: {m}")


@pytest.mark.gpu
def test_chooser_on_gpu_picks_and_caches():
    chooser = ConvPathChooser()
    inputs, _ = _inputs(GPU_SHAPES[0], torch.float16)
    path = _call(chooser.choose, inputs)
    assert path in (FUSED, UNFUSED) and len(chooser.times) == 1
    assert _call(chooser.choose, inputs) == path and len(chooser.times) == 1
