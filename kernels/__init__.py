"""sdrt's ops. The engine calls only these; each picks the Triton kernel or the PyTorch reference."""
from ._backend import BACKENDS, backend, use_triton
from .attention import attention
from .geglu import geglu
from .group_norm import group_norm
from .group_norm_silu_conv2d import group_norm_silu_conv2d
from .layer_norm import layer_norm

__all__ = ["BACKENDS", "attention", "backend", "geglu", "group_norm", "group_norm_silu_conv2d",
           "layer_norm", "use_triton"]
