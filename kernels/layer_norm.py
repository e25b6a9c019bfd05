"""LayerNorm over the last dimension."""
import torch.nn.functional as F

from ._backend import use_triton


def layer_norm_reference(x, weight, bias, eps=1e-5):
    # float32 statistics; output in x's dtype.
    d = x.shape[-1]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (d,), w, b, eps).to(x.dtype)


def _check(x, weight, bias):
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (d,) or p.device != x.device):
            raise ValueError(f"layer_norm: {name} must have shape ({d},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm of ``x`` over its last dimension."""
    _check(x, weight, bias)
    return layer_norm_reference(x, weight, bias, eps)
