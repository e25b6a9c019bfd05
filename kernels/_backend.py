"""Which implementation an op runs: the Triton kernel or the plain-PyTorch reference.

``SDRT_BACKEND`` is read each time an op is called (never at import), so a test or a user
can flip it within one process:

- ``auto`` (default): Triton on CUDA tensors, PyTorch elsewhere;
- ``triton``: Triton always (on CPU tensors this needs ``TRITON_INTERPRET=1``);
- ``torch``: the reference everywhere.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    name = os.environ.get("SDRT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SDRT_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on ``x`` should run its Triton kernel."""
    name = backend()
    if name == "torch":
        return False
    if name == "triton":
        return True
    return x.is_cuda and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
