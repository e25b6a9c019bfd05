"""Seamless tiling (A1111's "Tiling": every padded convolution of the UNet and the VAE pads
circularly): the fused GroupNorm+SiLU convolution's circular padding, Triton and reference,
against ``nn.Conv2d(padding_mode="circular")``; the pipeline against diffusers' with its
convolutions set circular as A1111 sets them; static plans per setting; the CLI's PNG info and
``--from-png``; the A1111 API."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.tiny import tiny_components
from sdrt.kernels.conv_autotune import ConvKey, group_norm_then_conv2d
from sdrt.kernels.group_norm import group_norm_reference
from sdrt.kernels.group_norm_silu_conv2d import (_group_norm_silu_conv2d_triton,
                                                 group_norm_silu_conv2d,
                                                 group_norm_silu_conv2d_reference)
from test_cli import _run, assert_png_round_trip
from test_group_norm_silu_conv2d import DEVICE, DTYPES, DTYPE_IDS, SMALL, _call, _inputs
from test_pipeline import IMAGE_ATOL, PROMPTS, _assert_lively, _diffusers_scheduler
from test_pipeline import pipes  # noqa: F401  (the fixture)

# (N, Cin, H, W, Cout, kernel, stride, padding, groups, add, bias, layouts), as in
# test_group_norm_silu_conv2d: every tap of a border pixel wraps
CIRCULAR_SHAPES = [
    (2, 16, 8, 8, 16, 3, 1, 1, 4, "full", True, "nhwc/cl"),     # a tile in one sample
    (3, 18, 6, 7, 9, 3, 1, 1, 6, "channel", False, "nhwc/cl"),  # tiles across samples
    (2, 40, 5, 6, 33, 3, 2, 1, 8, "channel", True, "nchw/cl"),  # stride 2 on odd sizes
    (1, 8, 1, 3, 8, 3, 1, 1, 2, None, True, "nhwc/cl"),         # one row: it wraps onto itself
]


def _circular_conv2d(inputs):
    """The independent answer: the normalised tensor through an ``nn.Conv2d`` whose
    padding_mode is "circular", in float32."""
    i = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cout, cin, k, _ = i["conv_weight"].shape
    conv = nn.Conv2d(cin, cout, k, stride=i["stride"], padding=i["padding"],
                     bias=i["conv_bias"] is not None, padding_mode="circular").to(DEVICE)
    with torch.no_grad():
        conv.weight.copy_(i["conv_weight"])
        if i["conv_bias"] is not None:
            conv.bias.copy_(i["conv_bias"])
        h = group_norm_reference(i["x"], i["num_groups"], i["norm_weight"], i["norm_bias"],
                                 1e-5, activation="silu")
        y = conv(h.to(inputs["x"].dtype).float())  # (rounded to the dtype, as both paths do)
    return y if i["add"] is None else y + i["add"]


@pytest.mark.parametrize("shape", CIRCULAR_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_circular_padding_matches_nn_conv2d(shape, dtype, atol, rtol):
    inputs, out_shape = _inputs(shape, dtype, seed=4)
    want = _circular_conv2d(inputs)
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)  # poisoned
    got = {"triton": _call(_group_norm_silu_conv2d_triton, inputs, out=out, config=SMALL,
                           padding_mode="circular"),
           "reference": _call(group_norm_silu_conv2d_reference, inputs,
                              padding_mode="circular"),
           "unfused": _call(group_norm_then_conv2d, inputs, padding_mode="circular")}
    for path, y in got.items():
        torch.testing.assert_close(y.float(), want, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{path} {shape} {dtype}: {m}")
    zeros = _call(group_norm_silu_conv2d_reference, inputs).float()
    edge = (zeros - want).abs()
    assert edge[:, :, 0].max() > 10 * atol and edge[:, :, -1].max() > 10 * atol, \
        "circular padding changed nothing on the borders"


def test_bad_padding_modes_raise():
    inputs, _ = _inputs(CIRCULAR_SHAPES[0], torch.float16)
    for fn in (group_norm_silu_conv2d, _group_norm_silu_conv2d_triton):
        with pytest.raises(ValueError, match="padding_mode must be one of zeros, circular"):
            _call(fn, inputs, padding_mode="reflect")
    inputs["x"] = inputs["x"][:, :, :1, :1]
    with pytest.raises(ValueError, match="circular padding 2 wraps past"):
        _call(group_norm_silu_conv2d, {**inputs, "padding": 2}, padding_mode="circular")


def test_the_chooser_keys_the_padding_mode():
    inputs, _ = _inputs(CIRCULAR_SHAPES[0], torch.float16)
    args = (inputs["x"], inputs["conv_weight"], inputs["conv_bias"], 1, 1, inputs["add"])
    assert ConvKey.of(*args) != ConvKey.of(*args, padding_mode="circular")


# -- the pipeline --------------------------------------------------------------------------------

def _set_circular(pipe, on):
    """What A1111's ``apply_circular`` does to diffusers' networks: every Conv2d's padding_mode."""
    for model in (pipe.unet, pipe.vae):
        for m in model.modules():
            if type(m) is nn.Conv2d:
                m.padding_mode = "circular" if on else "zeros"


def test_txt2img_and_img2img_match_diffusers_with_circular_convs(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, "euler")
    h, w = 16, 24
    latents = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(7))
    kw = dict(height=h, width=w, num_inference_steps=4, guidance_scale=7.5, latents=latents,
              output_type="np")
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8))
    i2i = dict(image=init, strength=0.6, num_inference_steps=5, guidance_scale=6.0,
               output_type="np")
    ref_i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    ref_i2i.scheduler = _diffusers_scheduler(ref, "euler")
    _set_circular(ref, True)
    try:
        expected = ref(PROMPTS, negative_prompt=["ugly"] * 2, **kw).images
        expected_i2i = ref_i2i(PROMPTS[0], generator=torch.Generator().manual_seed(11),
                               **i2i).images
    finally:
        _set_circular(ref, False)
    _assert_lively(expected, f"{family} circular")
    plain = ours(PROMPTS, negative_prompt="ugly", sampler="euler", **kw)
    ours.enable_seamless_tiling()
    try:
        assert ours.seamless_tiling
        got = ours(PROMPTS, negative_prompt="ugly", sampler="euler", **kw)
        got_i2i = ours(PROMPTS[0], seed=11, sampler="euler", **i2i)
    finally:
        ours.disable_seamless_tiling()
    assert not ours.seamless_tiling
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} seamless txt2img")
    assert_close_abs(got_i2i, expected_i2i, IMAGE_ATOL, f"{family} seamless img2img")
    assert np.abs(got - plain).max() > 5 * IMAGE_ATOL, "seamless tiling changed nothing"
    again = ours(PROMPTS, negative_prompt="ugly", sampler="euler", **kw)
    assert np.array_equal(again, plain), "disable_seamless_tiling left a convolution circular"


ARGS = dict(height=64, width=64, num_inference_steps=2, sampler="ddim", seed=3,
            output_type="np")


def test_a_static_plan_per_setting_and_vae_tiling_refused():
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    plain = pipe("a fox", **ARGS)
    pipe.enable_seamless_tiling()
    eager = pipe("a fox", **ARGS)
    pipe.compile(height=64, width=64, num_inference_steps=2, sampler="ddim", strict=True)
    assert np.abs(pipe("a fox", **ARGS) - eager).max() <= 1e-6
    assert np.abs(eager - plain).max() > 1e-3
    with pytest.raises(SdrtError, match="seamless tiling cannot be combined with VAE tiling"):
        pipe.enable_vae_tiling()
    pipe.disable_seamless_tiling()  # another setting: not the plan built
    with pytest.raises(SdrtError, match="static plan"):
        pipe("a fox", **ARGS)
    pipe.enable_vae_tiling()
    with pytest.raises(SdrtError, match="seamless tiling cannot be combined with VAE tiling"):
        pipe.enable_seamless_tiling()


def test_cli_png_info_and_from_png(tmp_path, capsys):
    base = ["generate", "a stone wall", "--steps", "2", "--width", "64", "--height", "64",
            "--sampler", "euler", "--seed", "9"]
    out = assert_png_round_trip(base, ["--tiling"], ", Tiling: True", tmp_path, capsys)
    code, _, err = _run([*base, "--tiling", "--vae-tiling", "-o", str(out)], capsys)
    assert code == 2 and "seamless tiling cannot be combined with VAE tiling" in err, err
    code, _, err = _run([*base, "--tiling", "--init-image", str(out), "--sd-upscale", "2",
                         "--sd-upscale-overlap", "8", "-o", str(tmp_path / "up.png")], capsys)
    assert code == 2 and "--tiling cannot be combined with --sd-upscale" in err, err


def test_a1111_api_tiling():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.serve.local import LocalServer
    from test_serve import TIMEOUT, assert_same_image, config
    body = {"prompt": "a stone wall", "seed": 5, "steps": 2, "width": 32, "height": 32,
            "sampler_name": "Euler", "cfg_scale": 5}
    with LocalServer(config()) as url:
        seamless = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                              json={**body, "tiling": True})
        plain = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT,
                           json={**body, "tiling": False})
    assert seamless.status_code == 200 and plain.status_code == 200, seamless.text + plain.text
    info = json.loads(seamless.json()["info"])
    assert ", Tiling: True" in info["infotexts"][0], info["infotexts"][0]
    assert "Tiling" not in json.loads(plain.json()["info"])["infotexts"][0]
    ref = demo_pipeline(torch.device("cpu"), torch.float32)
    want_plain = ref("a stone wall", height=32, width=32, num_inference_steps=2,
                     sampler="euler", guidance_scale=5.0, seed=5)[0]
    ref.enable_seamless_tiling()
    want = ref("a stone wall", height=32, width=32, num_inference_steps=2, sampler="euler",
               guidance_scale=5.0, seed=5)[0]
    png = lambda r: Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert_same_image(png(seamless), want, "tiling")
    assert_same_image(png(plain), want_plain, "tiling off after a seamless batch")
    assert np.abs(np.asarray(want, dtype=int) - np.asarray(want_plain, dtype=int)).max() > 2
    with LocalServer(config(vae_tiling=True)) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={**body, "tiling": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tiling", r.text
    assert "cannot be combined with this server's VAE tiling" in r.json()["error"]["message"]


# -- on a GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 320, 64, 64, 320, 3, 1, 1, 32, "full", True, "nhwc/cl"),
                                   (2, 1280, 8, 8, 1280, 3, 1, 1, 32, "channel", True,
                                    "nhwc/cl"),
                                   (1, 512, 64, 64, 512, 3, 1, 1, 32, None, True, "nhwc/cl")],
                         ids=["unet_64", "unet_8", "vae_64"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_circular_kernel_matches_nn_conv2d_sd_shapes(shape, dtype, atol, rtol):
    inputs, out_shape = _inputs(shape, dtype, seed=5)
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)
    got = _call(_group_norm_silu_conv2d_triton, inputs, out=out, padding_mode="circular")
    torch.testing.assert_close(got.float(), _circular_conv2d(inputs), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_seamless_plan_replays_as_cuda_graphs_equal_to_eager():
    from conftest import run_eagerly
    from test_runtime import _tiny_cuda_pipe
    pipe = _tiny_cuda_pipe()
    pipe.enable_seamless_tiling()
    pipe.compile(height=64, width=64, num_inference_steps=4, sampler="euler", strict=True)
    kw = dict(prompt="a stone wall", height=64, width=64, num_inference_steps=4,
              sampler="euler", seed=1, output_type="np")
    seamless = pipe(**kw)
    assert np.abs(seamless - run_eagerly(pipe, **kw)).max() <= 2e-3
    pipe.disable_seamless_tiling()
    assert np.abs(run_eagerly(pipe, **kw) - seamless).max() > 1e-2
