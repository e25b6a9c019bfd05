"""GroupNorm over N×C×H×W, optionally fused with SiLU.

``group_norm_reference`` is the plain-PyTorch version: the reference, the CPU path and what
ONNX export traces. The public ``group_norm`` picks the path (see ``_backend``).
"""
import torch
import torch.nn.functional as F

from ._backend import use_triton

ACTIVATIONS = (None, "silu")


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, activation=None):
    # Statistics in float32 whatever the input dtype; output in x's dtype.
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def _check(x, num_groups, weight, bias, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    if x.dim() < 3:
        raise ValueError(f"group_norm: x must be N×C×H×W, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (c,) or p.device != x.device):
            raise ValueError(f"group_norm: {name} must have shape ({c},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")


def group_norm(x, num_groups, weight, bias, eps=1e-5, activation=None):
    """GroupNorm of ``x`` (N×C×H×W, contiguous or channels_last), then ``activation``."""
    _check(x, num_groups, weight, bias, activation)
    return group_norm_reference(x, num_groups, weight, bias, eps, activation)
