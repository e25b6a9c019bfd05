"""GEGLU: ``a * gelu(g)`` where ``a, g = h.chunk(2, -1)`` (diffusers' GEGLU), exact erf GELU."""
import torch.nn.functional as F

from ._backend import use_triton


def geglu_reference(h):
    a, g = h.chunk(2, dim=-1)
    return (a.float() * F.gelu(g.float())).to(h.dtype)


def _check(h):
    if h.shape[-1] % 2:
        raise ValueError(f"geglu: last dimension must be even (2·F), got {h.shape[-1]}")


def geglu(h):
    """GEGLU of the projection output ``h`` (..., 2·F) → (..., F)."""
    _check(h)
    return geglu_reference(h)
