"""A1111's img2img resize modes: "resize", "crop" and "fill" (``engine.images.fit_image``)
pixel for pixel against diffusers' ``VaeImageProcessor`` (which implements A1111's crop and
fill), and "latent" (the pipeline's ``latent_resize``) against its definition: the init
image encoded at its own size, its latents resized bilinearly, then noised as usual."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError
from sdrt.engine.images import RESIZE_MODES, fit_image

pytestmark = pytest.mark.usefixtures("one_thread")
DIFFUSERS_MODE = {"resize": "default", "crop": "crop", "fill": "fill"}
SOURCES = [(300, 200), (200, 300), (256, 256), (123, 457), (640, 96), (513, 511)]
TARGETS = [(512, 512), (64, 128), (768, 512), (96, 640)]


def _noise_image(width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("mode", RESIZE_MODES[:3])
@pytest.mark.parametrize("source", SOURCES)
def test_fit_image_is_diffusers_image_processor(mode, source):
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor
    processor = VaeImageProcessor(resample="lanczos")
    image = _noise_image(*source, seed=sum(source))
    for width, height in TARGETS:
        ours = np.asarray(fit_image(image, width, height, mode))
        theirs = np.asarray(processor.resize(image, height, width,
                                             resize_mode=DIFFUSERS_MODE[mode]))
        assert ours.shape == (height, width, 3)
        assert np.array_equal(ours, theirs), (mode, source, (width, height))


def test_crop_and_fill_keep_the_aspect_ratio_and_centre():
    """A wide image in a square: "crop" cuts its sides (every pixel from the image), "fill"
    keeps all of it in the middle band and repeats its first and last rows over the bands
    above and below."""
    image = _noise_image(200, 100, seed=3)
    crop = np.asarray(fit_image(image, 64, 64, "crop"))
    middle = np.asarray(image.crop((50, 0, 150, 100)).resize((64, 64), Image.LANCZOS))
    assert np.abs(crop.astype(int) - middle).mean() < 8  # the middle square, resampled
    fill = np.asarray(fit_image(image, 64, 64, "fill"))
    band = np.asarray(image.resize((64, 32), Image.LANCZOS))
    assert np.array_equal(fill[16:48], band)
    assert (fill[:16] == fill[15]).all() and (fill[48:] == fill[48]).all()
    # The edge rows, stretched (bicubic over a zero-height box: near them, not equal).
    assert np.abs(fill[15].astype(int) - band[0]).mean() < 5
    assert np.abs(fill[48].astype(int) - band[-1]).mean() < 5
    assert np.abs(fill[15].astype(int) - band[-1]).mean() > 20


@pytest.mark.parametrize("source", SOURCES)
def test_crop_of_a_picture_too_large_to_resize_whole(monkeypatch, source):
    # Past MAX_FIT_PIXELS "crop" resizes only the framed part: the same sampling positions,
    # so within two units of the last place of resizing the whole picture and cropping it
    # (PIL rounds to 8 bits between its horizontal and vertical passes).
    from sdrt.engine import images
    image = _noise_image(*source, seed=7)
    whole = {t: np.asarray(fit_image(image, *t, "crop"), dtype=int) for t in TARGETS}
    monkeypatch.setattr(images, "MAX_FIT_PIXELS", 0)
    for t in TARGETS:
        part = np.asarray(fit_image(image, *t, "crop"), dtype=int)
        assert part.shape == whole[t].shape and np.abs(part - whole[t]).max() <= 2, t


def test_a_long_thin_picture_is_cropped_in_bounded_memory():
    # 16000 × 2 covering 2048 × 2048 would be resized to 16384000 × 2048 (100 GB) first.
    ramp = np.tile(np.linspace(0, 255, 16000).astype(np.uint8)[None, :, None], (2, 1, 3))
    out = np.asarray(fit_image(Image.fromarray(ramp), 2048, 2048, "crop"))
    assert out.shape == (2048, 2048, 3) and (out == out[:1]).all()
    assert abs(int(out[0, 1024, 0]) - 127) <= 1  # the middle of the ramp


@pytest.mark.parametrize("pil_mode", ["L", "F", "RGBA"])
def test_fit_image_keeps_the_pil_mode(pil_mode):
    image = _noise_image(90, 30, seed=5, mode=pil_mode)
    for mode in RESIZE_MODES[:3]:
        out = fit_image(image, 40, 40, mode)
        assert out.mode == pil_mode and out.size == (40, 40)
    assert fit_image(image, 90, 30, "crop") is image  # already that size: untouched


def test_fit_image_refuses_other_modes():
    with pytest.raises(SdrtError, match="resize mode must be one of resize, crop, fill, got "
                                        "'latent'"):
        fit_image(_noise_image(8, 8, 0), 16, 16, "latent")


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return Pipeline.from_pretrained(tiny_sd1_folder)


CALL = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=4,
            guidance_scale=6.0, output_type="np")


@pytest.mark.parametrize("sampler,strength", [("euler_a", 0.7), ("ddim", 0.5),
                                              ("dpmpp_2m", 1.0)])
def test_latent_resize_is_encode_then_bilinear(pipe, sampler, strength):
    """Encoded at 16×8, resized to 32×24 latent-wise (bilinear, not antialiased), then the
    same as image-to-image from those latents: same draws, same image."""
    image = _noise_image(16, 8, seed=11)
    out = pipe(image=image, latent_resize=True, height=24, width=32, strength=strength,
               sampler=sampler, generator=torch.Generator().manual_seed(4), **CALL)
    assert out.shape == (1, 24, 32, 3) and out.std() > 0.01
    g = torch.Generator().manual_seed(4)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    x0 = pipe.encode_image((pixels[None] * 2 - 1).to(pipe.dtype), g)
    f = pipe.vae_scale_factor
    x0 = torch.nn.functional.interpolate(x0, size=(24 // f, 32 // f), mode="bilinear",
                                         align_corners=False)
    reference = pipe(image=x0, strength=strength, sampler=sampler, generator=g, **CALL)
    np.testing.assert_allclose(out, reference, atol=1e-6, rtol=0)
    # Not the same as resizing the pixels first.
    pixel_resized = pipe(image=image, height=24, width=32, strength=strength, sampler=sampler,
                         generator=torch.Generator().manual_seed(4), **CALL)
    assert np.abs(out - pixel_resized).max() > 0.01


def test_latent_resize_without_a_size_changes_nothing(pipe):
    image = _noise_image(24, 16, seed=12)
    a = pipe(image=image, latent_resize=True, seed=9, **CALL)
    b = pipe(image=image, seed=9, **CALL)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,message", [
    (dict(latent_resize=1), "latent_resize must be True or False, got 1"),
    (dict(latent_resize=True, image=None), "latent_resize=True needs image"),
    (dict(latent_resize=True, mask_image=np.ones((16, 24), np.float32)),
     "latent_resize=True cannot be combined with mask_image"),
])
def test_latent_resize_refusals(pipe, kwargs, message):
    call = {**CALL, "image": _noise_image(24, 16, seed=1), "seed": 1, **kwargs}
    with pytest.raises(SdrtError, match=message):
        pipe(**call)
