"""Whole pipeline against diffusers on the same folder, the same latents and the same seeds."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError

IMAGE_ATOL = 2e-3  # float32; images are in [0, 1]
STEPS = 6
PROMPTS = ["a red fox in the snow, 35mm photo", "a lighthouse at dusk — oil painting!"]


def _diffusers_scheduler(ref, sampler):
    """The diffusers scheduler a sampler name stands for, from the folder's own scheduler config
    (never from whatever scheduler an earlier test left on the shared reference pipeline)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler, KDPM2DiscreteScheduler,
                           DEISMultistepScheduler, LMSDiscreteScheduler, PNDMScheduler,
                           UniPCMultistepScheduler)
    cls, kw = {"ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}),
               "euler": (EulerDiscreteScheduler, {}),
               "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
               "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
               "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
               "heun": (HeunDiscreteScheduler, {}),
               "dpm2_karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
               "unipc_karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
               "lms": (LMSDiscreteScheduler, {}),
               "deis": (DEISMultistepScheduler, {"use_karras_sigmas": False}),
               }[sampler]
    return cls.from_config(ref.original_scheduler_config, **kw)


@pytest.fixture(scope="module")
def pipes(tiny_model):
    family, folder, ref = tiny_model
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    return family, Pipeline.from_pretrained(folder, device="cpu"), ref


def _assert_lively(image, what):
    # Saturated or flat images would make the comparison pass without proving anything.
    inside = ((image > 0.02) & (image < 0.98)).mean()
    assert image.std() > 0.01 and inside > 0.5, f"{what}: reference image is degenerate"


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras",
                                     "euler_karras", "heun", "dpm2_karras", "unipc_karras",
                                     "lms", "deis"])
def test_txt2img_matches_diffusers(pipes, sampler):
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, sampler)
    h, w = 16, 24  # not square, so a height/width swap would fail
    latents = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(7))
    expected = ref(PROMPTS, negative_prompt=["blurry, low quality"] * 2, height=h, width=w,
                   num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                   output_type="np").images
    _assert_lively(expected, f"{family}/{sampler}")
    got = ours(PROMPTS, negative_prompt="blurry, low quality", height=h, width=w,
               num_inference_steps=STEPS, guidance_scale=7.5, sampler=sampler,
               latents=latents, output_type="np")
    assert got.dtype == np.float32
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} txt2img with {sampler}")


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_sde_karras"])
def test_dpmpp_sde_matches_diffusers(pipes, sampler):
    # DPMSolverSDEScheduler seeds its Brownian trees from its config: given the seeds sdrt
    # draws from the request's generator (one per image), it gives sdrt's image.
    pytest.importorskip("torchsde")
    from diffusers import DPMSolverSDEScheduler

    from sdrt.engine.samplers import brownian_seeds
    family, ours, ref = pipes
    seeds = brownian_seeds(torch.Generator().manual_seed(5), len(PROMPTS))
    ref.scheduler = DPMSolverSDEScheduler.from_config(
        ref.original_scheduler_config, use_karras_sigmas=sampler.endswith("_karras"),
        noise_sampler_seed=seeds)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    kw = dict(height=16, width=24, num_inference_steps=STEPS, guidance_scale=7.5,
              latents=latents, output_type="np")
    expected = ref(PROMPTS, negative_prompt=["blurry, low quality"] * 2, **kw).images
    _assert_lively(expected, f"{family}/{sampler}")
    got = ours(PROMPTS, negative_prompt="blurry, low quality", sampler=sampler, seed=5, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} txt2img with {sampler}")
    other = ours(PROMPTS, negative_prompt="blurry, low quality", sampler=sampler, seed=6, **kw)
    assert np.abs(other - got).max() > 10 * IMAGE_ATOL, "the seed does not reach the noise"


def test_no_guidance_and_images_per_prompt(pipes):
    # guidance ≤ 1 skips the unconditional pass; two images per prompt, as diffusers repeats.
    family, ours, ref = pipes
    ref.scheduler = _diffusers_scheduler(ref, "euler")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    expected = ref(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, latents=latents,
                   num_images_per_prompt=2, height=16, width=16, output_type="np").images
    got = ours(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, latents=latents,
               num_images_per_prompt=2, height=16, width=16, sampler="euler", output_type="np")
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} no-CFG batch")


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.6), ("euler", 0.75), ("pndm", 1.0)])
def test_img2img_matches_diffusers(pipes, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline
    family, ours, ref = pipes
    ref_i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    ref_i2i.scheduler = _diffusers_scheduler(ref, sampler)
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    expected = ref_i2i(PROMPTS[0], image=init, strength=strength, num_inference_steps=10,
                       guidance_scale=6.0, negative_prompt="ugly",
                       generator=torch.Generator().manual_seed(11), output_type="np").images
    got = ours(PROMPTS[0], image=init, strength=strength, num_inference_steps=10,
               guidance_scale=6.0, negative_prompt="ugly", seed=11, sampler=sampler,
               output_type="np")
    assert got.shape == (1, 16, 24, 3)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} img2img {sampler} {strength}")


def test_euler_ancestral_is_reproducible_per_seed(pipes):
    family, ours, _ = pipes
    run = lambda seed: ours(PROMPTS[0], num_inference_steps=4, sampler="euler_a", seed=seed,
                            height=16, width=16, output_type="np")
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b), "same seed, different images"
    assert np.abs(a - c).max() > 1e-3, "different seeds gave the same image"


def test_output_types(pipes):
    family, ours, _ = pipes
    kw = dict(num_inference_steps=2, seed=1, height=16, width=16)
    latents = ours(PROMPTS[0], output_type="latent", **kw)
    images = ours(PROMPTS[0], output_type="pil", **kw)
    array = ours(PROMPTS[0], output_type="np", **kw)
    assert latents.shape == (1, 4, 8, 8)
    assert isinstance(images[0], Image.Image) and images[0].size == (16, 16)
    assert np.array_equal(np.asarray(images[0]), (array[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=17), "height must be a multiple of 2"),
    (dict(width=0), "width must be an integer from 1 to 4096, got 0"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 1000"),
    (dict(sampler="dpm_adaptive"), "sampler must be one of ddim, .*, got 'dpm_adaptive'"),
    (dict(output_type="tensor"), "output_type must be one of pil, np, pt, latent, got 'tensor'"),
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt must be one string or a list of 1"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents have shape"),
    (dict(clip_skip=-1), "clip_skip must be an integer of 0 or more, got -1"),
    (dict(clip_skip=3), r"clip_skip must be from 0 to 2 \(the text encoder has 3 layers\)"),
    (dict(seed=-5), r"seed must be -1 \(random\) or an integer from 0 to 2\*\*64 - 1, got -5"),
    (dict(image=np.zeros((16, 16), dtype=np.float32)), r"\(H, W, 3\) or \(B, H, W, 3\)"),
    (dict(image=np.zeros((0, 0, 3), dtype=np.float32)),
     r"an image array must have no empty side, got shape \(0, 0, 3\)"),
    (dict(image=torch.zeros(1, 3, 0, 0)), "must have no empty side, got shape \\(1, 3, 0, 0\\)"),
    (dict(image=np.zeros((16, 16, 3), np.float32), mask_image=np.zeros((0, 0), np.float32)),
     "a mask_image array must have no empty side"),
    (dict(image=torch.zeros(1, 3, 16, 16, device="meta")), "got a meta tensor"),
    (dict(latents=torch.zeros(1, 4, 8, 8, device="meta"), height=16, width=16),
     "latents must hold their values \\(a tensor on a device\\), got a meta tensor"),
    (dict(latents=torch.full((1, 4, 8, 8), 1e38), height=16, width=16),
     "latents must be noise of unit scale .* within ±1000, got 1e\\+38"),
    (dict(negative_prompt="(" * 101 + "x" + ")" * 101),
     "negative_prompt must nest brackets at most 100 deep, got 101"),
])
def test_bad_arguments_raise_sdrt_error(pipes, kwargs, message):
    _, ours, _ = pipes
    with pytest.raises(SdrtError, match=message):
        ours(PROMPTS[0], **{"num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_trailing_euler_without_guidance(tiny_model, tmp_path, steps):
    # SD-Turbo ships EulerDiscreteScheduler with trailing timesteps and runs 1-4 steps with
    # guidance 0: the config is read from the folder's scheduler_config.json, as a user's is.
    import json
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    family, folder, _ = tiny_model
    turbo = tmp_path / "turbo"
    shutil.copytree(folder, turbo)
    config_path = turbo / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                  prediction_type="epsilon")
    config_path.write_text(json.dumps(config))
    index = json.loads((turbo / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]  # where diffusers looks
    (turbo / "model_index.json").write_text(json.dumps(index))
    ref = StableDiffusionPipeline.from_pretrained(str(turbo), safety_checker=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, EulerDiscreteScheduler)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = ref(PROMPTS[0], num_inference_steps=steps, guidance_scale=0.0, latents=latents,
                   height=16, width=16, output_type="np").images
    ours = Pipeline.from_pretrained(str(turbo), device="cpu")
    got = ours(PROMPTS[0], num_inference_steps=steps, guidance_scale=0.0, latents=latents,
               height=16, width=16, output_type="np")
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} turbo-style, {steps} steps")


def test_img2img_accepts_a_list_of_arrays(pipes):
    # A list of (H, W, 3) arrays means the same as one (B, H, W, 3) array.
    _, ours, _ = pipes
    rng = np.random.default_rng(5)
    arrays = [rng.random((16, 16, 3), dtype=np.float32) for _ in range(2)]
    kw = dict(num_inference_steps=4, strength=0.5, seed=3, sampler="ddim", output_type="np")
    from_list = ours(PROMPTS, image=arrays, **kw)
    assert from_list.shape == (2, 16, 16, 3)
    assert np.array_equal(from_list, ours(PROMPTS, image=np.stack(arrays), **kw))
