"""LayerNorm over the last dimension.

SD runs it on the transformer blocks' B×S×C activations (C = 320…1280) and in the text
encoder (C = 768/1024). The kernel treats everything but the last dimension as rows: one
program normalises a block of rows, each row held whole in registers, so x is read once and y
written once (2·rows·C·elem bytes, plus 2·C weight/bias reads per program, served from L2).

``layer_norm_reference`` is the plain-PyTorch version: the reference, the CPU path and what
ONNX export traces.
"""
import torch
import torch.nn.functional as F

from ._backend import use_triton
from ._rows import as_rows

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# A row is held whole in registers; past this many elements it would spill.
MAX_COLS = 16384
# Elements one program holds (rows × padded columns): enough per program to keep the loads
# wide without spilling, small enough to give many programs for 8192 rows of 320.
_ELEMS_PER_PROGRAM = 4096


def layer_norm_reference(x, weight, bias, eps=1e-5):
    # float32 statistics; output in x's dtype.
    d = x.shape[-1]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (d,), w, b, eps).to(x.dtype)


if triton is not None:
    # The row count only bounds the row mask: specialising on it (divisible by 16 or not)
    # would compile the same code twice (the text encoder's 154 rows, the UNet's 8192).
    @triton.jit(do_not_specialize=["n_rows"])
    def _layer_norm_kernel(X, W, B, Y, n_rows, n_cols, stride_x, stride_y, eps,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)  # rows · stride can pass 2³¹ (VAE-sized inputs)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        # Two-pass statistics on the row already in registers: exact, no E[x²] − E[x]².
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / n_cols
        y = xc * tl.rsqrt(var + eps)[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=mask)


def _layer_norm_triton(x, weight, bias, eps, out=None):
    if triton is None:
        raise ValueError("layer_norm: the Triton backend was asked for but triton is not "
                         "installed")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"layer_norm: dtype {x.dtype} is not float32, float16 or bfloat16")
    n_cols = x.shape[-1]
    if n_cols > MAX_COLS:
        raise ValueError(f"layer_norm: the kernel holds a row in registers, up to "
                         f"{MAX_COLS} elements; got {n_cols}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape[0] > 1 and p.stride(0) != 1:
            raise ValueError(f"layer_norm: {name} must be contiguous")
    x2 = as_rows(x, "layer_norm", "x")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = as_rows(out, "layer_norm", "out")
    n_rows = x2.shape[0]
    if n_rows == 0 or n_cols == 0:
        return out
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(_ELEMS_PER_PROGRAM // block_n, triton.next_power_of_2(n_rows)))
    num_warps = 8 if block_n >= 4096 else 4
    grid = (triton.cdiv(n_rows, block_m),)
    _layer_norm_kernel[grid](
        x2, x2 if weight is None else weight, x2 if bias is None else bias, y2,
        n_rows, n_cols, x2.stride(0), y2.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out

def _check(x, weight, bias, out=None):
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension")
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (d,) or p.device != x.device):
            raise ValueError(f"layer_norm: {name} must have shape ({d},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype
                            or out.device != x.device):
        raise ValueError(f"layer_norm: out must be {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def layer_norm(x, weight, bias, eps=1e-5, *, out=None):
    """LayerNorm of ``x`` over its last dimension (which must be contiguous on the Triton path).

    ``out``, if given, receives the result (same shape and dtype as ``x``) and is returned:
    a buffer allocated once by the caller.
    """
    _check(x, weight, bias, out)
    if use_triton(x):
        return _layer_norm_triton(x, weight, bias, eps, out)
    y = layer_norm_reference(x, weight, bias, eps)
    return y if out is None else out.copy_(y)
