"""Bad input through the Python API ends in one ``SdrtError`` (a ``ValueError``) naming the
argument, its value and what is allowed: never a torch error, an unbounded allocation, or a
black or NaN image. Runs on the built-in tiny model (VAE scale factor 8) on the CPU."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.configs import model_config
from sdrt.engine.loading import build, parse_config
from sdrt.engine.memory import gib, parameter_count, request_bytes
from sdrt.engine.request import Limits
from sdrt.engine.tiny import TINY_CONFIGS, tiny_components, write_tiny

KW = dict(height=64, width=64, num_inference_steps=2, sampler="euler", output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_components(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "tiny"
    write_tiny(str(folder))
    return folder


def _refused(call, match):
    with pytest.raises(SdrtError, match=match) as err:
        call()
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


# --- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(path=None), r"^path must be a model folder or a \.safetensors file .*, got None$"),
    (dict(path=3), r"^path must be .*, got 3$"),
    (dict(device="tpu"), r"^device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'$"),
    (dict(device=3), r"^device must be 'cpu', 'cuda' or 'cuda:N', got 3$"),
    (dict(dtype=torch.int8), r"^dtype must be fp32, fp16 or bf16 .*, got torch\.int8$"),
    (dict(dtype="fp64"), r"^dtype must be fp32, fp16 or bf16 .*, got 'fp64'$"),
    (dict(prediction_type="x0"), r"^prediction_type must be one of epsilon, v_prediction, "
                                 r"sample, got 'x0'$"),
    (dict(variant=16), r"^variant must be a string, got 16$"),
])
def test_from_pretrained_bad_arguments(tiny_dir, kwargs, match):
    kwargs = {"path": str(tiny_dir), "device": "cpu", **kwargs}
    _refused(lambda: Pipeline.from_pretrained(**kwargs), match)


def _edited(tiny_dir, tmp_path, component, edit):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_dir, folder)
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return folder


CONFIGS = [
    ("unet", "cross_attention_dim", -64, "an integer from 1 to 65536, got -64"),
    ("text_encoder", "hidden_size", -64, "an integer from 1 to 65536, got -64"),
    ("unet", "sample_size", -16, "an integer from 1 to 65536, got -16"),
    ("unet", "block_out_channels", [0, 0, 0], "a list of 3 integers from 1 to 65536, got "
                                              r"\[0, 0, 0\]"),
    ("vae", "block_out_channels", [0, 0, 0, 0], "a list of 4 integers"),
    ("unet", "layers_per_block", 10 ** 9, "an integer from 1 to 256, got 1000000000"),
    ("text_encoder", "num_hidden_layers", "12", "an integer from 1 to 256, got '12'"),
    ("vae", "scaling_factor", 0, "a positive number, got 0"),
    ("vae", "latent_channels", 0, "an integer from 1 to 65536, got 0"),
    ("unet", "norm_num_groups", 7, r"a divisor of every block_out_channels entry"),
    ("unet", "attention_head_dim", 3, r"a divisor of each block_out_channels entry"),
    ("text_encoder", "num_attention_heads", 3, "a divisor of hidden_size 64, got 3"),
    ("unet", "norm_eps", float("nan"), "a positive number, got nan"),
    ("unet", "down_block_types", "CrossAttnDownBlock2D", "a list of at most 16 of"),
]


@pytest.mark.parametrize("component,key,value,message", CONFIGS,
                         ids=[f"{c}.{k}={v!r}" for c, k, v, _ in CONFIGS])
def test_bad_config_value_names_component_and_key_before_building(tiny_dir, tmp_path, component,
                                                                   key, value, message):
    folder = _edited(tiny_dir, tmp_path, component, lambda c: c.update({key: value}))
    name = "text encoder" if component == "text_encoder" else component
    with warnings.catch_warnings():
        # Zero-size modules would make torch warn before failing: nothing may be built.
        warnings.simplefilter("error")
        _refused(lambda: Pipeline.from_pretrained(str(folder), device="cpu"),
                 rf"^{folder / component}: {name} config: {key} must be {message}")


def test_components_that_do_not_fit_together(tiny_dir, tmp_path):
    folder = _edited(tiny_dir, tmp_path, "unet", lambda c: c.update(cross_attention_dim=32))
    _refused(lambda: Pipeline.from_pretrained(str(folder), device="cpu"),
             r"unet config cross_attention_dim must equal text_encoder config hidden_size "
             r"\(64\), got 32$")


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_parameter_count_from_config_equals_the_built_module(name, component):
    config = (model_config(name) if name.startswith("sd") else
              TINY_CONFIGS[name.split("-")[1]])[component]
    built = sum(p.numel() for p in build(component, config).parameters())  # meta device
    assert parameter_count(component, parse_config(component, config)) == built


def test_model_over_the_limits_is_refused_before_building(tiny_dir):
    _refused(lambda: Pipeline.from_pretrained(str(tiny_dir), device="cpu",
                                              limits=Limits(max_parameters=10 ** 5)),
             r"the configs describe a model of [0-9.e+]+ parameters \(unet .*\); the "
             r"limit is 1e\+05 \(SDRT_MAX_PARAMETERS\)$")
    _refused(lambda: Pipeline.from_pretrained(str(tiny_dir), device="cpu",
                                              limits=Limits(memory_bytes=10 ** 6)),
             r"the weights need [0-9.]+ GiB in torch.float32 .*, but the budget is .* "
             r"\(SDRT_MEMORY_BYTES / Limits.memory_bytes\)")


# The pathological requests, each in a fresh process so that its peak memory can be read:
# refused within a second and a few MB, before anything of their size is allocated.
_CHILD = r"""
import json, resource, sys, time, torch
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.tiny import tiny_components
pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
pipe("warm-up", height=64, width=64, num_inference_steps=1, output_type="latent")
cases = {
    "4096x4096": lambda: pipe("a fox", height=4096, width=4096, num_inference_steps=1),
    "10000 images": lambda: pipe("a fox", num_images_per_prompt=10000, num_inference_steps=1),
    "64 images of 2048x2048": lambda: pipe("a fox", height=2048, width=2048,
                                           num_images_per_prompt=64, num_inference_steps=1),
    "huge UNet config": lambda: Pipeline.from_pretrained(sys.argv[1], device="cpu"),
    "10^9 layers per block": lambda: Pipeline.from_pretrained(sys.argv[2], device="cpu"),
}
out = {}
for name, call in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    try:
        call()
        message = None
    except SdrtError as e:
        message = str(e)
    out[name] = dict(message=message, seconds=time.perf_counter() - start,
                     grew=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
print(json.dumps(out))
"""


def test_pathological_requests_are_refused_up_front_in_bounded_time_and_memory(tiny_dir,
                                                                                  tmp_path):
    huge = _edited(tiny_dir, tmp_path / "a", "unet",
                   lambda c: c.update(block_out_channels=[65536] * 3, norm_num_groups=32,
                                      attention_head_dim=8, layers_per_block=256))
    deep = _edited(tiny_dir, tmp_path / "b", "unet", lambda c: c.update(layers_per_block=10 ** 9))
    run = subprocess.run([sys.executable, "-c", _CHILD, str(huge), str(deep)], text=True,
                         capture_output=True, timeout=600,
                         env={**os.environ, "SDRT_MEMORY_BYTES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {
        "4096x4096": r"a request for 1 image of 4096x4096 with guidance needs about .* TiB "
                     r"\(mostly the UNet's attention scores at 512x512 latents\), but the budget",
        "10000 images": r"num_images_per_prompt must be an integer from 1 to 64 .*got 10000",
        "64 images of 2048x2048": r"a request for 64 images of 2048x2048 .* needs about",
        "huge UNet config": r"the configs describe a model of .* parameters .*SDRT_MAX_PARAMETERS",
        "10^9 layers per block": r"unet config: layers_per_block must be an integer from 1 to 256",
    }
    for name, pattern in expected.items():
        r = results[name]
        assert r["message"] is not None, f"{name}: accepted"
        assert re.search(pattern, r["message"]), f"{name}: {r['message']}"
        assert r["seconds"] < 3.0, f"{name}: refused only after {r['seconds']:.1f} s"
        assert r["grew"] < 64 * 2 ** 20, f"{name}: peak memory grew by {gib(r['grew'])}"


def _sd15_estimate(side, batch, dtype, fused):
    c = {k: parse_config(k, v) for k, v in model_config("sd15").items()
         if k in ("unet", "vae", "text_encoder")}
    return request_bytes(c["unet"], c["vae"], c["text_encoder"], side, side, batch, True, dtype,
                         fused)[0]


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_estimate_lets_real_sd15_at_512_through(batch):
    # fp16 on a GPU with the flash kernel: fits a 16 GB card beside the 2 GB of weights. fp32 on
    # the CPU (scores held by the reference attention): fits a 32 GB machine.
    assert _sd15_estimate(512, batch, torch.float16, True) <= 10 * 2 ** 30
    assert _sd15_estimate(512, batch, torch.float32, False) <= 24 * 2 ** 30


def test_estimate_refuses_huge_latents_even_on_the_largest_gpu():
    h200 = 141 * 2 ** 30
    assert _sd15_estimate(4096, 1, torch.float16, True) > h200   # the VAE's (h·w)² scores
    assert _sd15_estimate(4096, 1, torch.float32, False) > 2 ** 40  # the UNet's scores: > 1 TiB


# --- call arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale="7"), r"^guidance_scale must be a finite number from 0 to 100, got '7'$"),
    (dict(guidance_scale=math.nan), r"^guidance_scale must be .*, got nan$"),
    (dict(guidance_scale=math.inf), r"^guidance_scale must be .*, got inf$"),
    (dict(guidance_scale=1e308), r"^guidance_scale must be .*, got 1e\+308$"),
    (dict(num_inference_steps="5"), r"^num_inference_steps must be an integer from 1 to 1000, "
                                    r"got '5'$"),
    (dict(num_images_per_prompt=True), r"^num_images_per_prompt must be an integer"),
    (dict(prompt="a\udcffb"), r"^prompt must be valid Unicode text, got '\\udcff' at position 1"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)),
     r"^latents must be a torch.Tensor of shape \(1, 4, 8, 8\), got numpy.ndarray$"),
    (dict(latents=torch.full((1, 4, 8, 8), math.nan)), r"^latents must be finite floats"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), r"^latents must be finite floats"),
    (dict(generator=torch.Generator().manual_seed(1), seed=1),
     r"^seed must be None when a generator is given, got 1$"),
    (dict(generator=1), r"^generator must be a CPU torch.Generator .*, got 1$"),
    (dict(callback="print"), r"^callback must be callable or None, got 'print'$"),
    (dict(height=60), r"^height must be a multiple of 8 \(the VAE's scale factor\), got 60$"),
    (dict(clip_skip=2), r"^clip_skip must be from 0 to 1 \(the text encoder has 2 layers\), "
                        r"got 2$"),
])
def test_bad_call_arguments(pipe, kwargs, match):
    kwargs = {"prompt": "a fox", **KW, **kwargs}
    _refused(lambda: pipe(**kwargs), match)


def test_seed_minus_one_is_random_and_recorded(pipe):
    first = pipe("a fox", seed=-1, **KW)
    seed = pipe.last_seed
    assert isinstance(seed, int) and 0 <= seed < 2 ** 64
    again = pipe("a fox", seed=seed, **KW)
    assert np.array_equal(first, again), "the recorded seed does not reproduce the image"
    pipe("a fox", seed=-1, **KW)
    assert pipe.last_seed != seed


# --- callbacks ----------------------------------------------------------------------------------

def _recorder(calls, replace_at=None, replacement=None):
    def callback(pipe, step_index, timestep, callback_kwargs):
        assert set(callback_kwargs) == {"latents"}
        calls.append((pipe, step_index, int(timestep), pipe.num_timesteps,
                      callback_kwargs["latents"].clone()))
        if step_index == replace_at:
            return {"latents": replacement}
    return callback


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-plan"])
@pytest.mark.parametrize("sampler", ["euler", "pndm"])  # pndm: more UNet calls than steps
def test_callback_is_called_each_step_as_diffusers_calls_it(pipe, static, sampler):
    pipe.runtime = None
    kw = {**KW, "sampler": sampler, "num_inference_steps": 3}
    if static:
        pipe.compile(height=64, width=64, num_inference_steps=3, sampler=sampler)
    try:
        calls = []
        latents = pipe("a fox", seed=5, callback=_recorder(calls),
                       **{**kw, "output_type": "latent"})
        n = pipe.num_timesteps
        assert n == (4 if sampler == "pndm" else 3)
        assert [c[1] for c in calls] == list(range(n)), "one call per step, indices 0..n-1"
        assert all(c[0] is pipe and c[3] == n for c in calls)
        assert calls[0][2] > calls[-1][2], "timesteps run from noisy to clean"
        # The latents a callback sees are the loop's: the last ones are what the call returns.
        assert torch.equal(calls[-1][4], latents.float())
        assert not torch.equal(calls[0][4], calls[-1][4])
    finally:
        pipe.runtime = None


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-plan"])
def test_latents_returned_by_the_callback_replace_the_current_ones(pipe, static):
    pipe.runtime = None
    if static:
        pipe.compile(height=64, width=64, num_inference_steps=3, sampler="euler")
    try:
        kw = {**KW, "num_inference_steps": 3, "output_type": "latent", "seed": 9}
        target = -1.7 + 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        # Replaced after the last step: the result is the replacement itself.
        out = pipe("a fox", callback=_recorder([], 2, target), **kw)
        assert torch.equal(out, target)
        # Replaced after the first step: the later steps start from it, as if resumed there.
        calls = []
        plain = pipe("a fox", callback=_recorder(calls), **kw)
        resumed = pipe("a fox", callback=_recorder([], 0, calls[0][4]), **kw)
        assert torch.equal(resumed, plain), "replacing latents by themselves changed the result"
        changed = pipe("a fox", callback=_recorder([], 0, target), **kw)
        assert (changed - plain).abs().max() > 1e-3, "the replacement was ignored"
    finally:
        pipe.runtime = None


@pytest.mark.parametrize("returned,match", [
    (5, r"^callback must return None or a dict, got int$"),
    ({"latents": torch.zeros(2, 2)}, r"^callback must return latents of shape \(1, 4, 8, 8\), got "
                                     r"torch.Size\(\[2, 2\]\)$"),
])
def test_callback_returning_nonsense_is_refused(pipe, returned, match):
    _refused(lambda: pipe("a fox", callback=lambda *a: returned, **KW), match)


# --- init images --------------------------------------------------------------------------------

I2I = dict(num_inference_steps=2, sampler="ddim", strength=0.6, seed=4, output_type="np")


def _pattern(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return (0.15 + 0.7 * rng.random((h, w, 3))).astype(np.float32)


def test_tensor_init_image_equals_the_array(pipe):
    array = _pattern(64, 48)
    from_array = pipe("a fox", image=array, **I2I)
    from_tensor = pipe("a fox", image=torch.from_numpy(array).permute(2, 0, 1), **I2I)
    batched = pipe("a fox", image=torch.from_numpy(array).permute(2, 0, 1)[None], **I2I)
    assert from_array.shape == (1, 64, 48, 3)
    assert np.array_equal(from_tensor, from_array) and np.array_equal(batched, from_array)
    assert np.abs(from_array - pipe("a fox", image=_pattern(64, 48, 1), **I2I)).max() > 1e-3


def test_16_bit_image_is_not_clipped(pipe):
    # A 16-bit greyscale PNG read by PIL: values up to 65535. Converted as 8-bit it would
    # saturate to white; it must give what the same values as floats give.
    grey = (np.linspace(0.1, 0.9, 64 * 64).reshape(64, 64) * 65535).astype(np.uint16)
    image = Image.fromarray(grey)
    assert image.mode in ("I;16", "I;16L")
    expected = np.repeat((grey.astype(np.float32) / 65535)[..., None], 3, axis=2)
    assert np.array_equal(pipe("a fox", image=image, **I2I), pipe("a fox", image=expected, **I2I))


@pytest.mark.parametrize("image,match", [
    (_pattern(64, 64) * 2, r"^image values must be finite and in \[0, 1\], got values from "
                           r"0\.3.* to 1\.[0-9]*$"),
    (np.where(_pattern(64, 64) > 0.5, np.nan, 0.5).astype(np.float32),
     r"^image values must be finite and in \[0, 1\], got values from 0\.5 to 0\.5 and \d+ "
     r"inf/NaN$"),
    (torch.full((3, 64, 64), -0.5), r"^image values must be finite and in \[0, 1\]"),
    ((_pattern(64, 64) * 255).astype(np.uint8), r"^an image array must hold floats in \[0, 1\], "
                                                r"got dtype uint8"),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), r"^an image tensor must hold floats"),
    (torch.zeros(64, 64, 3), r"^an image tensor must be \(3, H, W\) or \(B, 3, H, W\), got shape "
                             r"\(64, 64, 3\)$"),
    ("fox.png", r"^image must be a PIL image, .*, got str$"),
    ([], r"^image must be .* non-empty list of them, got an empty list$"),
    (np.zeros((4, 4, 3), np.float32), r"^image must be at least 8 pixels high and wide"),
    (Image.new("RGB", (9000, 16)), r"^image width must be at most 4096 pixels .*pass height and "
                                   r"width to resize it$"),
    (Image.new("L", (9000, 9000)), r"^image must be at most 67108864 pixels"),
])
def test_bad_init_images(pipe, image, match):
    _refused(lambda: pipe("a fox", image=image, **I2I), match)


def test_init_image_resized_to_the_vae_factor_with_one_warning(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe("a fox", image=Image.fromarray((_pattern(61, 70) * 255).astype(np.uint8)),
                   **I2I)
    assert out.shape == (1, 56, 64, 3)
    resized = [str(w.message) for w in caught if "resized" in str(w.message)]
    assert resized == ["init image resized from 70x61 to 64x56 (a multiple of the VAE's scale "
                       "factor 8)"], [str(w.message) for w in caught]
