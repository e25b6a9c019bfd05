"""kernels/group_norm.py: the Triton kernels (interpreted on CPU) against float64 GroupNorm.

The comparison is with float64 math rather than ``group_norm_reference``: PyTorch's CPU
GroupNorm on channels_last float32 input is itself off by ~2e-4 at these sizes.
"""

import pytest
import torch
from hopper_compile import assert_compiles_for_hopper, compile_sm90
import torch.nn.functional as F

from sdrt.kernels.group_norm import group_norm, group_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs every run: a failure reproduces

# Kernel and float64 math each round once to the output dtype. float32 also carries the
# conditioning of centring, x − mean, which costs about |mean|/σ · 2⁻²⁴ (≈ 1e-6 here) and
# more in small groups whose spread comes out small.
DTYPES = [
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]

# (N, C, spatial...), groups, activation. Few groups where the point is elsewhere: the
# interpreter runs each of the N·G·splits programs one after another.
SHAPES = [
    ((1, 320, 4, 4), 32, "silu"),   # SD 1.5 level 1 channels and groups (ResNet norm + SiLU)
    ((2, 96, 3, 3), 4, None),       # N = 2 (CFG batch); 24 channels a group: BLOCK_C 32 padded
    ((1, 1920, 3, 3), 32, "silu"),  # up-block concat width: 60 channels a group
    ((1, 32, 100, 100), 4, "silu"),  # 80 000 elements a group: 10 splits, the last ragged
    ((3, 12, 5, 7), 3, None),       # odd everything, N = 3
    ((2, 6, 50), 3, "silu"),        # N×C×L: one spatial dim
    ((2, 32, 1, 1), 4, None),       # 1×1 spatial: 8 elements a group
]


def _inputs(shape, dtype, channels_last=False, affine=True):
    x = (-2.3 + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = 1.0 + 0.5 * torch.randn(c, device=DEVICE) if affine else None
    b = 0.1 * torch.randn(c, device=DEVICE) if affine else None
    return x, w, b


def _exact(x, groups, w, b, eps=1e-5, activation=None):
    """GroupNorm (+ SiLU) in float64, rounded once to x's dtype."""
    y = F.group_norm(x.double(), groups, None if w is None else w.double(),
                     None if b is None else b.double(), eps)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)


@pytest.mark.parametrize("shape, groups, activation", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_group_norm(triton_backend, shape, groups, activation, dtype, atol, rtol):
    x, w, b = _inputs(shape, dtype)
    out = torch.full_like(x, float("nan"))  # every element must be written
    y = group_norm(x, groups, w, b, activation=activation, out=out)
    assert y is out
    torch.testing.assert_close(y, _exact(x, groups, w, b, activation=activation), atol=atol,
                               rtol=rtol)


@pytest.mark.parametrize("shape, groups, activation", [s for s in SHAPES if len(s[0]) == 4])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_group_norm_channels_last(triton_backend, shape, groups, activation, dtype, atol, rtol):
    # Read and written in place through strides (stride_c = 1, stride_s = C).
    x, w, b = _inputs(shape, dtype, channels_last=True)
    out = torch.full_like(x, float("nan"))  # channels_last too; every element must be written
    y = group_norm(x, groups, w, b, activation=activation, out=out)
    assert y is out
    torch.testing.assert_close(y, _exact(x, groups, w, b, activation=activation), atol=atol,
                               rtol=rtol)


def test_group_norm_channels_last_into_poisoned_out(triton_backend):
    # channels_last x written into a poisoned contiguous out: the two stride sets differ, so
    # the per-group tiles run, not the channels_last path.
    x, w, b = _inputs((2, 16, 9, 7), torch.float16, channels_last=True)
    out = torch.full(x.shape, float("nan"), device=DEVICE, dtype=x.dtype)
    group_norm(x, 4, w, b, out=out)
    expected = _exact(x, 4, w, b)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    # without out, the result is allocated in x's format (channels_last: its own path, whose
    # sums run in another order, so compared with the exact result, not bit for bit)
    y = group_norm(x, 4, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_group_norm_no_affine(triton_backend, channels_last, dtype, atol, rtol):
    # weight = bias = None: the HAS_WEIGHT / HAS_BIAS switches off; eps as the transformer's.
    x, _, _ = _inputs((1, 40, 6, 6), dtype, channels_last=channels_last, affine=False)
    torch.testing.assert_close(group_norm(x, 8, None, None, eps=1e-6),
                               _exact(x, 8, None, None, eps=1e-6), atol=atol, rtol=rtol)


def test_group_norm_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("SDRT_BACKEND", "torch")
    x, w, b = _inputs((2, 8, 3, 3), torch.float32)
    out = torch.full_like(x, float("nan"))
    torch.testing.assert_close(group_norm(x, 4, w, b, activation="silu", out=out),
                               group_norm_reference(x, 4, w, b, activation="silu"),
                               atol=0, rtol=0)


@pytest.mark.parametrize("case", ["groups", "activation", "weight shape", "2-D input",
                                  "out shape", "too many channels a group",
                                  "spatial dims do not collapse", "int dtype"])
def test_group_norm_bad_inputs(triton_backend, case):
    x, w, b = _inputs((2, 32, 4, 4), torch.float16)
    groups, activation, out = 8, None, None
    if case == "groups":
        groups = 5
    elif case == "activation":
        activation = "gelu"
    elif case == "weight shape":
        w = torch.ones(31, device=DEVICE)
    elif case == "2-D input":
        x = x[:, :, 0, 0]
    elif case == "out shape":
        out = torch.empty(2, 32, 4, 3, device=DEVICE, dtype=x.dtype)
    elif case == "too many channels a group":
        x, w, b = _inputs((1, 512, 2, 2), torch.float16)
        groups = 1
    elif case == "spatial dims do not collapse":
        x = x[..., :3]  # H stride 4, W stride 1, W = 3
    elif case == "int dtype":
        x = torch.ones(2, 32, 4, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="group_norm"):
        group_norm(x, groups, w, b, activation=activation, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 2560, 8, 8), (2, 960, 32, 32),  # UNet
                                   (2, 640, 96, 96),                  # SD 2.1 768² level 1
                                   (1, 128, 512, 512)])               # VAE decoder, last block
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:])
def test_group_norm_sd_shapes_gpu(triton_backend, shape, channels_last, dtype, atol, rtol):
    x, w, b = _inputs(shape, dtype, channels_last)
    out = torch.full_like(x, float("nan"))
    y = group_norm(x, 32, w, b, activation="silu", out=out)
    torch.testing.assert_close(y, _exact(x, 32, w, b, activation="silu"), atol=atol, rtol=rtol)


def compile_for_hopper():
    """Compile the kernels' variants for sm_90 (run by ``assert_compiles_for_hopper``)."""
    import importlib
    mod = importlib.import_module("sdrt.kernels.group_norm")
    ints = ("HW", "G", "C", "cpg", "n_splits", "s_per_split", "tiles_per_split", "stride_n",
            "stride_c", "stride_s", "stride_xn", "stride_xc", "stride_xs", "stride_yn",
            "stride_yc", "stride_ys")
    variants = [
        (mod._group_norm_stats_kernel, {"BLOCK_C": 16, "BLOCK_S": 256}),
        (mod._group_norm_apply_kernel, {"HAS_WEIGHT": True, "HAS_BIAS": True,
                                        "ACTIVATION": "silu", "BLOCK_C": 64, "BLOCK_S": 64,
                                        "BLOCK_SPLITS": mod._MAX_SPLITS}),
        (mod._group_norm_apply_kernel, {"HAS_WEIGHT": False, "HAS_BIAS": False,
                                        "ACTIVATION": "none", "BLOCK_C": 4, "BLOCK_S": 1024,
                                        "BLOCK_SPLITS": mod._MAX_SPLITS}),
        # channels_last: SD's 64-channel tiles; the merge of 10-channel groups (C = 320)
        (mod._group_norm_cl_stats_kernel, {"BLOCK_S": 64, "BLOCK_C": 64}),
        (mod._group_norm_cl_finalize_kernel, {"HAS_WEIGHT": True, "BLOCK": 1024,
                                              "BLOCK_J": 128}),
        (mod._group_norm_cl_apply_kernel, {"HAS_BIAS": True, "ACTIVATION": "silu",
                                           "BLOCK_S": 64, "BLOCK_C": 64}),
    ]
    fp32 = ("W", "B", "PARTIAL", "PMEAN", "PM2", "MEAN", "SCALE")
    for fn, consts in variants:
        # Pointers are fp16 tensors, but for the fp32 weights, bias and statistics.
        sig = {n: "i32" if n in ints else "fp32" if n == "eps" else
               "*fp32" if n in fp32 else "*fp16" for n in fn.arg_names}
        compile_sm90(fn, sig, consts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile it")
def test_group_norm_compiles_for_hopper():
    pytest.importorskip("triton")
    assert_compiles_for_hopper("test_group_norm")
