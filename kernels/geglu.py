"""GEGLU: ``a * gelu(g)`` where ``a, g = h.chunk(2, -1)`` (diffusers' GEGLU), exact erf GELU.

h is the feed-forward's first projection, rows × 2F (F = 4·C: 1280…5120 in SD). The two-op
version in diffusers reads h, writes gelu(g), then reads a and gelu(g) and writes the product:
10·F bytes a row in fp16. The kernel reads both halves and writes the product once:
4·F + 2·F = 6·F bytes a row.

``geglu_reference`` is the plain-PyTorch version: the reference, the CPU path and what ONNX
export traces.
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

# A program covers BLOCK_M rows × BLOCK_F output columns (4096 elements: 16 KB read in fp16).
_BLOCK_F = 1024
_ELEMS_PER_PROGRAM = 4096


def geglu_reference(h):
    a, g = h.chunk(2, dim=-1)
    return (a.float() * F.gelu(g.float())).to(h.dtype)


if triton is not None:
    # The row count only bounds the row mask: no variant per divisibility of it.
    @triton.jit(do_not_specialize=["n_rows"])
    def _geglu_kernel(H, Y, n_rows, n_out, stride_h, stride_y,
                      BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < n_rows)[:, None] & (cols < n_out)[None, :]
        h_row = H + rows.to(tl.int64)[:, None] * stride_h
        a = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(h_row + n_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # gelu(g) = g · Φ(g) = g · ½(1 + erf(g/√2)), the exact form diffusers uses.
        y = a * g * 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :],
                 y.to(Y.dtype.element_ty), mask=mask)


def _geglu_triton(h, out=None):
    if triton is None:
        raise ValueError("geglu: the Triton backend was asked for but triton is not installed")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"geglu: dtype {h.dtype} is not float32, float16 or bfloat16")
    n_out = h.shape[-1] // 2
    h2 = as_rows(h, "geglu", "h")
    if out is None:
        out = torch.empty(*h.shape[:-1], n_out, dtype=h.dtype, device=h.device)
    y2 = as_rows(out, "geglu", "out")
    n_rows = h2.shape[0]
    if n_rows == 0 or n_out == 0:
        return out
    block_f = min(_BLOCK_F, triton.next_power_of_2(n_out))
    block_m = max(1, min(_ELEMS_PER_PROGRAM // block_f, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_out, block_f))
    _geglu_kernel[grid](h2, y2, n_rows, n_out, h2.stride(0), y2.stride(0),
                        BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4)
    return out


def _check(h, out=None):
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu: last dimension must be even (2·F), got shape {tuple(h.shape)}")
    if out is not None:
        shape = (*h.shape[:-1], h.shape[-1] // 2)
        if tuple(out.shape) != shape or out.dtype != h.dtype or out.device != h.device:
            raise ValueError(f"geglu: out must be {shape} {h.dtype} on {h.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")


def geglu(h, *, out=None):
    """GEGLU of the projection output ``h`` (..., 2·F) → (..., F).

    ``out``, if given, receives the result and is returned: a buffer allocated once by the
    caller.
    """
    _check(h, out)
    if use_triton(h):
        return _geglu_triton(h, out)
    y = geglu_reference(h)
    return y if out is None else out.copy_(y)
