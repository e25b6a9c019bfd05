"""Per shape, the faster of two ways to run conv2d(silu(group_norm(x))) + add on the GPU.

- ``"fused"``: sdrt's Triton kernel (``group_norm_silu_conv2d``): the normalised tensor is
  never written, but the convolution is Triton's, not cuDNN's;
- ``"unfused"``: sdrt's ``group_norm`` kernel, then cuDNN's convolution, then ``+ add``.

Which wins depends on the shape: the fusion saves memory traffic that matters most where the
convolution is cheap per byte (few channels, large images: the VAE decoder), while cuDNN's
tuned convolutions win where the GEMM dominates (1280 channels at 8×8). ``ConvPathChooser``
times both once per shape on the GPU and remembers the winner. It never times anything off
the GPU: there it answers ``"fused"``, and the public op picks its own path.

Timing synchronises with the host, so the engine calls the chooser for every shape during its
warm-up, before any CUDA graph is captured; an unplanned shape during capture is an error.
Given a ``cache_file``, the choices are also kept between processes (a small JSON file keyed
by GPU name, torch and triton versions and the call's shapes): a new process times only the
shapes no earlier one has.
"""
import dataclasses
import json
import os
import statistics
import tempfile

import torch

from ._backend import use_triton
from .group_norm import group_norm
from .group_norm_silu_conv2d import (TRITON_DTYPES, _check, _group_norm_silu_conv2d_triton,
                                     group_norm_silu_conv2d, padded_conv2d)

FUSED, UNFUSED = "fused", "unfused"
PATHS = (FUSED, UNFUSED)


def group_norm_then_conv2d(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None,
                           *, eps=1e-5, stride=1, padding=1, add=None, padding_mode="zeros"):
    """The unfused path: sdrt's GroupNorm+SiLU kernel, cuDNN's convolution, then ``+ add``."""
    h = group_norm(x, num_groups, norm_weight, norm_bias, eps, activation="silu")
    y = padded_conv2d(h, conv_weight, conv_bias, stride, padding, padding_mode)
    return y if add is None else y.add_(add)  # y is fresh: add in place, no extra allocation


@dataclasses.dataclass(frozen=True)
class ConvKey:
    """What the choice depends on: shapes, layouts, dtype, stride, padding and device."""
    x_shape: tuple
    x_channels_last: bool
    weight_shape: tuple
    weight_channels_last: bool   # if not, the fused path copies the weights on every call
    has_bias: bool
    add_shape: tuple | None
    dtype: torch.dtype
    stride: int
    padding: int
    device: str
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, x, conv_weight, conv_bias, stride, padding, add, padding_mode="zeros"):
        cl = torch.channels_last
        return cls(tuple(x.shape), x.is_contiguous(memory_format=cl), tuple(conv_weight.shape),
                   conv_weight.is_contiguous(memory_format=cl), conv_bias is not None,
                   None if add is None else tuple(add.shape), x.dtype, stride, padding,
                   str(x.device), padding_mode)

    def cache_key(self, device_name):
        """This key as text for the ``cache_file``: with the GPU's name and the torch and triton
        versions, whose kernels (and so timings) may differ."""
        import triton
        fields = {k: (str(v) if isinstance(v, torch.dtype) else v)
                  for k, v in dataclasses.asdict(self).items() if k != "device"}
        return json.dumps([device_name, torch.__version__, triton.__version__, fields])


# GPU clock cycles ``torch.cuda._sleep`` spins before each timed call: ~1 ms at H100/H200
# clocks (1.6-2 GHz), more than the Python overhead of launching either path (~0.1 ms).
HEAD_START_CYCLES = 2_000_000


def cuda_median_time(fn, warmup=3, repeat=10):
    """Median seconds of ``fn()`` over ``repeat`` CUDA-event-timed calls after ``warmup``.

    The events must time the GPU's work, not the Python that launches it: the engine replays
    CUDA graphs, where launch overhead is gone, and many SD convolutions take ~30 µs, less than
    that overhead. So before each timed call the GPU is made to sleep ~1 ms; meanwhile the CPU
    enqueues ``start``, all of ``fn``'s kernels and ``end``, which then run back to back.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HEAD_START_CYCLES)  # the CPU gets ahead of the GPU
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class ConvPathChooser:
    """Times the fused and the unfused path once per ``ConvKey`` and caches the faster.

    ``timer(fn) -> seconds`` times a zero-argument callable; the paths are timed in ``PATHS``
    order. ``timed_devices`` are the device types on which it times at all (tests may widen it
    with a fake timer; nothing else should). ``cache_file`` (optional): a JSON file of earlier
    processes' choices, read at the first choice and rewritten after each new timing.
    """

    def __init__(self, timer=cuda_median_time, timed_devices=("cuda",), cache_file=None):
        self.timer = timer
        self.timed_devices = tuple(timed_devices)
        self.cache_file = cache_file
        self.choices: dict[ConvKey, str] = {}
        self.times: dict[ConvKey, dict[str, float]] = {}
        self._saved = None  # {ConvKey.cache_key: {"choice": ..., "times": ...}}, read lazily

    def choose(self, x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None, *,
               eps=1e-5, stride=1, padding=1, add=None, padding_mode="zeros"):
        """``FUSED`` or ``UNFUSED`` for this call's shapes; times both the first time a shape
        is seen on a timed device."""
        if x.device.type not in self.timed_devices:
            return FUSED
        if x.dtype not in TRITON_DTYPES:
            return UNFUSED  # no fused kernel to time
        key = ConvKey.of(x, conv_weight, conv_bias, stride, padding, add, padding_mode)
        if key not in self.choices:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"ConvPathChooser: shape {key} was not planned before CUDA "
                                   "graph capture; call the chooser during warm-up")
            _check(x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias, stride,
                   padding, add, padding_mode)
            saved = self._saved_entry(key, x.device)
            if saved is not None:
                self.times[key], self.choices[key] = saved["times"], saved["choice"]
                return self.choices[key]
            args = (x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias)
            kwargs = dict(eps=eps, stride=stride, padding=padding, add=add,
                          padding_mode=padding_mode)
            runs = {FUSED: _group_norm_silu_conv2d_triton, UNFUSED: group_norm_then_conv2d}
            times = {path: self.timer(lambda fn=runs[path]: fn(*args, **kwargs))
                     for path in PATHS}
            self.times[key] = times
            self.choices[key] = min(PATHS, key=times.__getitem__)
            self._save(key, x.device)
        return self.choices[key]

    # -- the cache file
    @staticmethod
    def _device_name(device):
        return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

    def _saved_entry(self, key, device):
        if self.cache_file is None:
            return None
        if self._saved is None:
            try:
                with open(self.cache_file) as f:
                    self._saved = json.load(f)
            except (OSError, ValueError):  # missing, unreadable or not JSON: time, rewrite
                self._saved = {}
            if not isinstance(self._saved, dict):
                self._saved = {}
        entry = self._saved.get(key.cache_key(self._device_name(device)))
        if not isinstance(entry, dict) or entry.get("choice") not in PATHS:
            return None
        return entry

    def _save(self, key, device):
        if self.cache_file is None:
            return
        self._saved[key.cache_key(self._device_name(device))] = {
            "choice": self.choices[key], "times": self.times[key]}
        # written beside, then renamed: a reader never sees half a file. The cache only saves
        # time, so a folder that cannot be written (read-only home) just goes without it.
        folder = os.path.dirname(os.path.abspath(self.cache_file))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._saved, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_file)
        except BaseException:
            os.unlink(tmp)
            raise

    def __call__(self, x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias=None, *,
                 eps=1e-5, stride=1, padding=1, add=None, padding_mode="zeros"):
        """``conv2d(silu(group_norm(x))) + add`` by the path ``choose`` picks."""
        args = (x, norm_weight, norm_bias, num_groups, conv_weight, conv_bias)
        kwargs = dict(eps=eps, stride=stride, padding=padding, add=add, padding_mode=padding_mode)
        if not use_triton(x):  # SDRT_BACKEND=torch (or CPU tensors): the reference, untimed
            return group_norm_silu_conv2d(*args, **kwargs)
        if self.choose(*args, **kwargs) == UNFUSED:
            return group_norm_then_conv2d(*args, **kwargs)
        return group_norm_silu_conv2d(*args, **kwargs)
