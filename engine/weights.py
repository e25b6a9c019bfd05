"""Loading safetensors weights into modules built on the meta device.

Each tensor is read from the memory-mapped file, converted straight to the target device
and dtype, and bound to its parameter: no second full copy of the model is ever held.
Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``) are refused: loading them runs code.
"""
import json
import os
from contextlib import ExitStack
from typing import Callable, Dict

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import SdrtError, refuse_pickle


# A tensor source: parameter name → a function that reads that tensor (on the CPU, any dtype).
Source = Dict[str, Callable[[], torch.Tensor]]


class SafetensorsFiles:
    """Open safetensors files as one tensor source; a context manager that closes them."""

    def __init__(self, paths):
        self.paths = list(paths)
        self._stack = ExitStack()
        self.source: Source = {}

    def __enter__(self):
        for path in self.paths:
            refuse_pickle(path)
            try:
                f = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                keys = list(f.keys())
            except (SafetensorError, OSError, ValueError) as e:
                self._stack.close()
                raise SdrtError(f"{path}: not a readable safetensors file "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            for k in keys:
                self.source[k] = _reader(f, k, path)
        return self

    def __exit__(self, *exc):
        self._stack.close()


def _reader(f, key, path):
    def read():
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise SdrtError(f"{path}: cannot read tensor {key} ({e})")
    return read


def component_weights(folder, stem, variant=None):
    """The safetensors files of one diffusers component folder (``stem`` is
    ``diffusion_pytorch_model`` or ``model``), honouring an optional ``variant`` (``fp16``)
    and sharded checkpoints (``*.safetensors.index.json``)."""
    names = [f"{stem}.{variant}.safetensors", f"{stem}.safetensors"] if variant else \
        [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
        index = path + ".index.json"
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise SdrtError(f"{index}: unreadable shard index ({e})")
            return [os.path.join(folder, s) for s in shards]
    for suffix in (".bin", ".ckpt"):
        pickled = os.path.join(folder, stem + suffix)
        if os.path.isfile(pickled):
            refuse_pickle(pickled)
    raise SdrtError(f"{os.path.join(folder, names[0])} is missing")


def load_parameters(module: nn.Module, source: Source, device, dtype, where: str,
                    rename: Callable[[str], str] = None):
    """Bind every parameter of ``module`` (built on the meta device) to its tensor in ``source``.

    ``rename`` maps a module parameter name to the source's key. Shapes are checked against
    the module's; a missing key or a mismatch raises ``SdrtError`` naming the key.
    """
    expected = dict(module.named_parameters())
    for name, meta in expected.items():
        key = rename(name) if rename else name
        if key not in source:
            raise SdrtError(f"{where}: missing weight {key}")
        t = source[key]()
        if tuple(t.shape) != tuple(meta.shape):
            raise SdrtError(f"{where}: weight {key} has shape {tuple(t.shape)}, "
                            f"the config expects {tuple(meta.shape)}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        owner, _, leaf = name.rpartition(".")
        owner_module = module.get_submodule(owner) if owner else module
        owner_module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    return module.eval()


def read_json(path, what):
    if not os.path.isfile(path):
        raise SdrtError(f"{path} is missing ({what})")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise SdrtError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})")
