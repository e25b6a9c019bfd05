"""conv2d(silu(group_norm(x))) + add, the front half of every SD ResNet block."""
import torch.nn.functional as F

from ._backend import use_triton
from .group_norm import group_norm, group_norm_reference


def group_norm_silu_conv2d_reference(x, norm_weight, norm_bias, num_groups, conv_weight,
                                     conv_bias=None, *, eps=1e-5, stride=1, padding=1, add=None):
    h = group_norm_reference(x, num_groups, norm_weight, norm_bias, eps, activation="silu")
    y = F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)
    return y if add is None else y + add


def group_norm_silu_conv2d(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None,
                           *, eps=1e-5, stride=1, padding=1, add=None):
    """``conv2d(silu(group_norm(x)), conv_weight, conv_bias, stride, padding) + add``.

    ``add`` broadcasts to the output: a time embedding N×C×1×1 or a residual N×C×H×W.
    """
    h = group_norm(x, num_groups, norm_weight, norm_bias, eps, activation="silu")
    y = F.conv2d(h, conv_weight, conv_bias, stride=stride, padding=padding)
    return y if add is None else y + add
