"""kernels/geglu.py: the Triton kernel (interpreted on CPU) against float64 GEGLU."""

import pytest
import torch
from hopper_compile import assert_compiles_for_hopper, compile_sm90
import torch.nn.functional as F

from sdrt.kernels.geglu import geglu, geglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same inputs every run: a failure reproduces

# Kernel and float64 math each round once to the output dtype (erf in fp32 in the kernel).
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]

SHAPES = [
    (2, 64, 2 * 1280),   # SD 1.5 feed-forward at level 1 (C = 320 → F = 1280)
    (1, 16, 2 * 5120),   # widest F (C = 1280): five 1024-column blocks per row
    (3, 7, 2 * 100),     # odd rows, F not a multiple of the column block
    (5, 2 * 1),          # 2-D, F = 1
]


def _input(shape, dtype):
    # The gate half centred near 0 where GELU bends; the value half non-zero-mean.
    h = torch.randn(shape, device=DEVICE)
    f = shape[-1] // 2
    h[..., :f] = -2.3 + 0.5 * h[..., :f]
    return h.to(dtype)


def _exact(h):
    a, g = h.double().chunk(2, dim=-1)
    return (a * F.gelu(g)).to(h.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_geglu(triton_backend, shape, dtype, atol, rtol):
    h = _input(shape, dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), device=DEVICE, dtype=dtype)
    y = geglu(h, out=out)
    assert y is out
    torch.testing.assert_close(y, _exact(h), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_geglu_strided_rows_allocates(triton_backend, dtype, atol, rtol):
    # h is a slice of wider rows (row stride 3000 ≠ 2·F); the output is allocated inside.
    h = _input((4, 9, 3000), dtype)[..., :2 * 700]
    y = geglu(h)
    assert y.shape == (4, 9, 700) and y.dtype == dtype
    torch.testing.assert_close(y, _exact(h), atol=atol, rtol=rtol)


def test_geglu_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("SDRT_BACKEND", "torch")
    h = _input((3, 40), torch.float32)
    out = torch.full((3, 20), float("nan"), device=DEVICE)
    torch.testing.assert_close(geglu(h, out=out), geglu_reference(h), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["odd width", "last dim strided", "out shape", "out dtype",
                                  "rows do not collapse", "int dtype"])
def test_geglu_bad_inputs(triton_backend, case):
    h = _input((4, 6, 32), torch.float16)
    out = None
    if case == "odd width":
        h = h[..., :31]
    elif case == "last dim strided":
        h = h.transpose(1, 2)
    elif case == "out shape":
        out = torch.empty(4, 6, 32, device=DEVICE, dtype=h.dtype)
    elif case == "out dtype":
        out = torch.empty(4, 6, 16, device=DEVICE, dtype=torch.float32)
    elif case == "rows do not collapse":
        h = h[:, :5].transpose(0, 1)
    elif case == "int dtype":
        h = torch.ones(4, 32, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="geglu"):
        geglu(h, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560),  # SD 1.5
                                   (2, 256, 2 * 5120), (2, 9216, 2 * 1280)])  # ... SD 2.1
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:])
def test_geglu_sd_shapes_gpu(triton_backend, shape, dtype, atol, rtol):
    h = _input(shape, dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), device=DEVICE, dtype=dtype)
    torch.testing.assert_close(geglu(h, out=out), _exact(h), atol=atol, rtol=rtol)


def compile_for_hopper():
    """Compile the kernel for sm_90 (run by ``assert_compiles_for_hopper``)."""
    import importlib
    fn = importlib.import_module("sdrt.kernels.geglu")._geglu_kernel
    sig = {"H": "*bf16", "Y": "*bf16", "n_rows": "i32", "n_out": "i32", "stride_h": "i32",
           "stride_y": "i32"}
    compile_sm90(fn, sig, {"BLOCK_M": 4, "BLOCK_F": 1024})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile it")
def test_geglu_compiles_for_hopper():
    pytest.importorskip("triton")
    assert_compiles_for_hopper("test_geglu")
