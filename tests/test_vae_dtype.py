"""The VAE's own precision (``Pipeline(vae_dtype=...)``, ``--vae-dtype``): diffusers' choice by
default, or fp32 / fp16 / bf16 as asked, in the eager and the static path, for decode and for
img2img's encode."""
import warnings

import numpy as np
import pytest
import torch

from sdrt.engine.errors import SdrtError
from sdrt.engine.pipeline import Pipeline
from sdrt.engine.tiny import tiny_components
from sdrt.engine.stages import to_unit_images, vae_decode

CALL = dict(height=64, width=64, num_inference_steps=2, sampler="euler", seed=0)


def overflowing_fp16_pipe(vae_dtype=None):
    """The tiny model in fp16 with a VAE whose last conv's outputs (~1e5) pass fp16's 65504
    while its weights stay finite in fp16 (~6e3)."""
    c = tiny_components()
    with torch.no_grad():
        c.vae.decoder.conv_out.weight.mul_(2e5)
    for m in (c.text_encoder, c.unet, c.vae):
        m.to(torch.float16)
    return Pipeline(c, torch.device("cpu"), torch.float16, vae_dtype=vae_dtype)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_bf16_vae_decodes_what_fp16_overflows(static):
    # bf16 has float32's range: the decode that overflows in fp16 (and is done again in
    # float32, with a warning) stays finite in bf16, with no second decode.
    pipe = overflowing_fp16_pipe("bf16")
    assert pipe.vae_run_dtype() == torch.bfloat16
    if static:
        pipe.compile(**{k: v for k, v in CALL.items() if k != "seed"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflowed" warning, no fp32 fallback
        latents = pipe("a fox", output_type="latent", **CALL)
        image = pipe("a fox", output_type="np", **CALL)
    assert np.isfinite(image).all()
    # Exactly the bf16 copy of the VAE's decode of those latents.
    vae = pipe._vae_in(torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    assert next(pipe.vae.parameters()).dtype == torch.float16  # the pipeline's own is kept
    with torch.no_grad():
        expected = to_unit_images(vae_decode(vae, latents.to(torch.bfloat16)))
    np.testing.assert_array_equal(image, expected.numpy())
    # With diffusers' choice (the pipeline's fp16 here) the same call overflows.
    with pytest.warns(UserWarning, match="overflowed in torch.float16"):
        overflowing_fp16_pipe()("a fox", output_type="np", **CALL)


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    from sdrt.engine.tiny import tiny_config, write_model
    folder = str(tmp_path_factory.mktemp("sdxl") / "model")
    write_model(folder, tiny_config("sdxl"))
    return folder


def test_auto_is_diffusers_choice(tiny_sdxl_folder, tiny_sd1_folder):
    sdxl = Pipeline.from_pretrained(tiny_sdxl_folder, "cpu", torch.float16)
    assert sdxl.vae.config.force_upcast and sdxl.vae_run_dtype() == torch.float32
    assert Pipeline.from_pretrained(tiny_sdxl_folder, "cpu", torch.float16,
                                    vae_dtype="fp16").vae_run_dtype() == torch.float16
    assert Pipeline.from_pretrained(tiny_sdxl_folder, "cpu", torch.bfloat16,
                                    vae_dtype="auto").vae_run_dtype() == torch.bfloat16
    sd1 = Pipeline.from_pretrained(tiny_sd1_folder, "cpu", torch.float16)
    assert sd1.vae_run_dtype() == torch.float16
    assert Pipeline.from_pretrained(tiny_sd1_folder, "cpu", vae_dtype=torch.bfloat16
                                    ).vae_run_dtype() == torch.bfloat16


def test_img2img_encodes_in_the_vae_dtype(tiny_sd1_folder):
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, "cpu", torch.float32, vae_dtype="bf16")
    image = torch.rand(1, 3, 64, 64)
    gen = torch.Generator().manual_seed(3)
    latents = pipe.encode_image(image * 2 - 1, gen)
    assert latents.dtype == torch.float32  # handed on in the pipeline's dtype
    with torch.no_grad():
        mean, std = pipe._vae_in(torch.bfloat16).encode((image * 2 - 1).to(torch.bfloat16))
    # The sample is drawn in the VAE's dtype, then cast (as diffusers does).
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3),
                        dtype=torch.bfloat16)
    expected = (mean + std * noise).float() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=1e-6)
    out = pipe("a fox", image=image.permute(0, 2, 3, 1).numpy(), strength=0.5, output_type="np",
               **CALL)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("value", ["fp8", "half", 16, torch.int8])
def test_bad_vae_dtype_is_refused(tiny_sd1_folder, value):
    with pytest.raises(SdrtError, match=r"^vae_dtype must be auto, fp32, fp16 or bf16"):
        Pipeline.from_pretrained(tiny_sd1_folder, "cpu", vae_dtype=value)


def test_cli_vae_dtype(tmp_path, capsys):
    # The built-in model on the CPU (fp32): --vae-dtype fp32 is the default decode, bf16 the
    # same picture to within bf16's rounding, not a different one.
    from test_cli import _pixels, _run
    args = ["generate", "a red circle on a blue background", "--seed", "1", "--steps", "4"]
    paths = {v: tmp_path / f"{v}.png" for v in ("auto", "fp32", "bf16")}
    for v, path in paths.items():
        assert _run(args + ["--vae-dtype", v, "-o", str(path)], capsys)[0] == 0
    auto, fp32, bf16 = (_pixels(paths[v]).astype(int) for v in ("auto", "fp32", "bf16"))
    assert np.array_equal(auto, fp32)
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.max() <= 6 and diff.mean() < 1, (diff.max(), diff.mean())  # measured 2, 0.26
