"""kernels/layer_norm.py: the Triton kernel (interpreted on CPU) against float64 LayerNorm."""

import pytest
import torch
from hopper_compile import assert_compiles_for_hopper, compile_sm90
import torch.nn.functional as F

from sdrt.kernels.layer_norm import layer_norm, layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs every run: a failure reproduces

# Both the kernel and float64 math rounded once to the output dtype: the tolerance is about
# one unit in the last place of the output.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]

SHAPES = [
    (2, 64, 320),   # SD 1.5 transformer tokens at level 1 (C = 320, padded to a 512 block)
    (1, 77, 768),   # CLIP ViT-L text encoder rows (SD 1.5)
    (3, 5, 1280),   # widest UNet C; 15 rows, not a multiple of the rows a program takes
    (7, 33),        # 2-D input, odd width
    (1, 1, 1024),   # a single row (SD 2.1 text encoder width)
]


def _inputs(shape, dtype, affine=True):
    x = (-2.3 + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype)
    d = shape[-1]
    w = 1.0 + 0.5 * torch.randn(d, device=DEVICE) if affine else None
    b = 0.1 * torch.randn(d, device=DEVICE) if affine else None
    return x, w, b


def _exact(x, w, b, eps=1e-5):
    """LayerNorm in float64, rounded once to x's dtype."""
    d = x.shape[-1]
    return F.layer_norm(x.double(), (d,), None if w is None else w.double(),
                        None if b is None else b.double(), eps).to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm(triton_backend, shape, dtype, atol, rtol):
    x, w, b = _inputs(shape, dtype)
    out = torch.full_like(x, float("nan"))  # every element must be written
    y = layer_norm(x, w, b, out=out)
    assert y is out
    torch.testing.assert_close(y, _exact(x, w, b), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_no_affine_allocates(triton_backend, dtype, atol, rtol):
    # weight = bias = None (the HAS_WEIGHT/HAS_BIAS switches off), output allocated inside.
    x, _, _ = _inputs((4, 9, 96), dtype, affine=False)
    torch.testing.assert_close(layer_norm(x, None, None, eps=1e-6),
                               _exact(x, None, None, eps=1e-6), atol=atol, rtol=rtol)


def test_layer_norm_strided_rows(triton_backend):
    # Rows that are a slice of wider rows (row stride 640 ≠ 320): read in place.
    wide = (-2.3 + 0.5 * torch.randn(2, 10, 640, device=DEVICE)).half()
    x = wide[..., :320]
    _, w, b = _inputs((320,), torch.float16)
    out = torch.full((2, 10, 400), float("nan"), device=DEVICE, dtype=torch.float16)[..., :320]
    y = layer_norm(x, w, b, out=out)
    torch.testing.assert_close(y, _exact(x, w, b), atol=2e-3, rtol=2e-3)


def test_layer_norm_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("SDRT_BACKEND", "torch")
    x, w, b = _inputs((3, 40), torch.float32)
    out = torch.full_like(x, float("nan"))
    torch.testing.assert_close(layer_norm(x, w, b, out=out), layer_norm_reference(x, w, b),
                               atol=0, rtol=0)


@pytest.mark.parametrize("case", ["weight shape", "last dim strided", "out shape", "scalar",
                                  "rows do not collapse", "int dtype"])
def test_layer_norm_bad_inputs(triton_backend, case):
    x, w, b = _inputs((4, 8, 32), torch.float16)
    out = None
    if case == "weight shape":
        w = torch.ones(31, device=DEVICE)
    elif case == "last dim strided":
        x = x.transpose(1, 2)
        w, b = w[:8], b[:8]
    elif case == "out shape":
        out = torch.empty(4, 8, 31, device=DEVICE, dtype=x.dtype)
    elif case == "scalar":
        x, w, b = x[0, 0, 0], None, None
    elif case == "rows do not collapse":
        x = x[:, :7]  # leading dims (4, 7) with strides (256, 32): no single row stride...
        x = x.transpose(0, 1)  # ...once transposed
    elif case == "int dtype":
        x = torch.ones(4, 32, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="layer_norm"):
        layer_norm(x, w, b, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280),  # SD 1.5
                                   (2, 9216, 320), (2, 77, 1024)])                   # SD 2.1
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:])
def test_layer_norm_sd_shapes_gpu(triton_backend, shape, dtype, atol, rtol):
    x, w, b = _inputs(shape, dtype)
    out = torch.full_like(x, float("nan"))
    torch.testing.assert_close(layer_norm(x, w, b, out=out), _exact(x, w, b), atol=atol,
                               rtol=rtol)


def compile_for_hopper():
    """Compile every kernel variant for sm_90 (run by ``assert_compiles_for_hopper``)."""
    import importlib
    fn = importlib.import_module("sdrt.kernels.layer_norm")._layer_norm_kernel
    sig = {"X": "*fp16", "W": "*fp32", "B": "*fp32", "Y": "*fp16", "n_rows": "i32",
           "n_cols": "i32", "stride_x": "i32", "stride_y": "i32", "eps": "fp32"}
    for has_w, block_m, block_n in ((True, 8, 512), (False, 1, 4096)):
        compile_sm90(fn, sig, {"HAS_WEIGHT": has_w, "HAS_BIAS": has_w, "BLOCK_M": block_m,
                               "BLOCK_N": block_n})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile it")
def test_layer_norm_compiles_for_hopper():
    pytest.importorskip("triton")
    assert_compiles_for_hopper("test_layer_norm")
