"""Random argument combinations thrown at ``Pipeline.__call__`` on the tiny model.

Each example draws a valid request, then corrupts none, one or two of its arguments with a
bad value (wrong type, NaN, inf, negative, huge, a size off the VAE's grid, bad unicode, ...).
A clean request must return finite images of the requested shape; a corrupted one must raise
``SdrtError`` with a one-line message: no other exception, no NaN image, no bad value silently
replaced by another.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("hypothesis")  # in the "test" extra; absent on a bare GPU machine
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdrt.engine import Pipeline, SdrtError  # noqa: E402
from sdrt.engine.request import SAMPLER_NAMES  # noqa: E402
from sdrt.engine.tiny import tiny_components  # noqa: E402

F = 8          # the tiny model's VAE scale factor
DEFAULT = 128  # its UNet sample_size (16) × F


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


def _image(kind):
    rng = np.random.default_rng(0)
    a = (0.1 + 0.8 * rng.random((24, 16, 3))).astype(np.float32)
    return {None: None, "array": a, "tensor": torch.from_numpy(a).permute(2, 0, 1),
            "pil": Image.fromarray((a * 255).astype(np.uint8)),
            "pil16": Image.fromarray((a[..., 0] * 65535).astype(np.uint16)),
            "odd": (0.1 + 0.8 * rng.random((21, 19, 3))).astype(np.float32),  # resized to 16²
            "bright": a * 3, "nan": np.full_like(a, np.nan), "uint8": (a * 255).astype(np.uint8),
            "tiny": a[:4, :4], "list": [], "text": "fox.png"}[kind]


VALID = {
    "prompt": st.one_of(st.text(max_size=40), st.just("a red fox " * 40),  # 40: truncated
                        st.lists(st.text(max_size=12), min_size=1, max_size=2)),
    "height": st.one_of(st.none(), st.sampled_from([8, 16, 24, 32])),
    "width": st.one_of(st.none(), st.sampled_from([8, 16, 24, 32])),
    "num_inference_steps": st.integers(2, 3),
    "guidance_scale": st.floats(0, 100),
    "sampler": st.sampled_from(SAMPLER_NAMES + (None,)),
    "seed": st.one_of(st.none(), st.just(-1), st.integers(0, 2 ** 64 - 1)),
    "strength": st.floats(0.5, 1),
    "num_images_per_prompt": st.integers(1, 2),
    "clip_skip": st.sampled_from([0, 1]),
    "output_type": st.sampled_from(["np", "pil", "latent"]),
    "image": st.sampled_from([None, None, "array", "tensor", "pil", "pil16", "odd"]),
    "latents": st.none(),
}
INVALID = {
    "prompt": st.sampled_from(["a fox\udcff", "\ud800", [], 5, None, b"a fox", ["ok", 3],
                               "x" * 20001]),
    "negative_prompt": st.sampled_from([3, ["a", "b", "c"], "bad \udcff", [None]]),
    "height": st.sampled_from([0, -8, 12, 13, 4104, 10 ** 9, "32", 32.0, True, math.nan]),
    "width": st.sampled_from([0, -8, 12, 33, 2 ** 70, "32", 16.0, False]),
    "num_inference_steps": st.sampled_from([0, -1, "2", 2.0, None, True, 10 ** 9]),
    "guidance_scale": st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1, "7", None, True,
                                       101, 2 ** 70]),
    "sampler": st.sampled_from(["dpm_adaptive", 3, "", "EULER"]),
    "seed": st.sampled_from([-2, 2 ** 64, "1", 1.5, True, math.nan, -1.0]),
    "strength": st.sampled_from([0, -0.5, 1.5, math.nan, math.inf, "0.5", None]),
    "num_images_per_prompt": st.sampled_from([0, -1, 10 ** 4, "1", 1.0, True]),
    "clip_skip": st.sampled_from([2, -1, "0", 0.5, True]),
    "output_type": st.sampled_from(["tensor", None, "PIL"]),
    "image": st.sampled_from(["bright", "nan", "uint8", "tiny", "list", "text"]),
    "latents": st.sampled_from([np.zeros((1, 4, 2, 2), np.float32), torch.zeros(1, 4, 3, 3),
                                torch.full((64, 64), math.nan)]),
}


def _negatives(prompt):
    n = 1 if isinstance(prompt, str) else len(prompt)
    return st.one_of(st.none(), st.text(max_size=10), st.lists(st.text(max_size=8), min_size=n,
                                                               max_size=n))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_call_returns_finite_images_or_raises_sdrt_error(pipe, data):
    kw = {name: data.draw(strategy, label=name) for name, strategy in VALID.items()}
    kw["negative_prompt"] = data.draw(_negatives(kw["prompt"]), label="negative_prompt")
    corrupted = data.draw(st.lists(st.sampled_from(sorted(INVALID)), max_size=2, unique=True),
                          label="corrupted")
    for name in corrupted:
        kw[name] = data.draw(INVALID[name], label=f"bad {name}")
    call = {**kw, "image": _image(kw["image"])}  # images are drawn by kind, built here
    try:
        out = pipe(**call)
    except SdrtError as e:
        assert corrupted, f"a valid request was refused: {e}"
        assert str(e) and "\n" not in str(e), repr(str(e))
        return
    assert not corrupted, f"bad {', '.join(corrupted)} accepted"
    prompt, init = kw["prompt"], call["image"]
    batch = (1 if isinstance(prompt, str) else len(prompt)) * kw["num_images_per_prompt"]
    if init is None:
        h, w = kw["height"] or DEFAULT, kw["width"] or DEFAULT
    else:
        h0, w0 = (init.size[::-1] if isinstance(init, Image.Image) else
                  init.shape[1:] if isinstance(init, torch.Tensor) else init.shape[:2])
        h, w = kw["height"] or h0 - h0 % F, kw["width"] or w0 - w0 % F
    if kw["output_type"] == "latent":
        assert tuple(out.shape) == (batch, 4, h // F, w // F)
        assert torch.isfinite(out).all()
    elif kw["output_type"] == "np":
        assert out.shape == (batch, h, w, 3) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    else:
        assert len(out) == batch and all(i.size == (w, h) for i in out)
