"""SDXL base, refiner and Turbo against diffusers: the same folders, latents and seeds.

Tiny random models (``sdxl_models.py``) that diffusers builds and saves; sdrt loads the very
folders. Text encoders and the UNet are compared on their own (relative error), then whole
pipelines per sampler and per SDXL feature (prompt_2, the zeroed negative, micro-conditioning,
clip_skip, seeded ancestral noise, the base as img2img, the refiner's aesthetic score, the
base → refiner hand-off, Turbo), then sdrt's static plans against its own eager path.
diffusers tokenises plainly, so every sdrt call here uses ``prompt_syntax="plain"``.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_abs, assert_close_rel, run_eagerly

IMAGE_ATOL = 2e-3  # float32; images are in [0, 1]
LATENT_REL = 1e-4  # float32 latents after a few steps, ‖ours − ref‖ / ‖ref‖
MODULE_REL = 1e-4  # one float32 network on the same weights and inputs
STATIC_ATOL = 1e-5  # a static plan on the CPU runs the same ops as the eager path
H, W = 32, 48  # not square, so a height/width swap (in the latents or the time ids) fails
STEPS = 4
PROMPTS = ["a red fox in the snow, 35mm photo", "a lighthouse at dusk — oil painting!"]
PROMPTS_2 = ["watercolor, soft light", "sharp focus, high contrast"]
NEGATIVE, NEGATIVE_2 = "blurry, low quality", "jpeg artifacts"
# Past 77 tokens: both tokenisers cut it (BOS, 75 tokens, EOS).
LONG_PROMPT = ", ".join(f"detail number {i}" for i in range(40))


pytestmark = pytest.mark.usefixtures("one_thread")


def _ours(folder):
    from sdrt.engine import Pipeline
    return Pipeline.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def base(sdxl_base_folder):
    folder, ref = sdxl_base_folder
    return _ours(folder), ref


@pytest.fixture(scope="module")
def refiner(sdxl_refiner_folder):
    folder, ref = sdxl_refiner_folder
    return _ours(folder), ref


@pytest.fixture(scope="module")
def turbo(sdxl_turbo_folder):
    folder, ref = sdxl_turbo_folder
    return _ours(folder), ref


def _scheduler(ref, sampler):
    """The diffusers scheduler a sampler name stands for, fresh from the folder's own config
    (a used scheduler keeps a begin index and step counters)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           PNDMScheduler)
    cls, kw = {"ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}),
               "euler": (EulerDiscreteScheduler, {}),
               "euler_a": (EulerAncestralDiscreteScheduler, {}),
               "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
               "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
               }[sampler]
    return cls.from_config(ref.original_scheduler_config, **kw)


def _reference(ref, sampler, *args, **kwargs):
    """diffusers' output for one call, with a fresh scheduler of ``sampler``."""
    ref.scheduler = _scheduler(ref, sampler)
    with torch.no_grad():
        return ref(*args, **kwargs).images


def _latents(batch, seed, h=H, w=W):
    return torch.randn(batch, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def _assert_lively(image, what):
    # Saturated or flat images would make the comparison pass without proving anything.
    inside = ((image > 0.02) & (image < 0.98)).mean()
    assert image.std() > 0.01 and inside > 0.5, f"{what}: reference image is degenerate"


def _assert_differs(a, b, what):
    # The feature under test must change the reference, or matching it proves nothing.
    assert np.abs(a - b).max() > 1e-2, f"{what} does not change diffusers' image"


# -- text encoders ------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip,prompt_2", [(0, ["", "a cat", LONG_PROMPT]), (1, None)],
                         ids=["prompt_2", "clip_skip-1"])
def test_base_text_states_and_pooled_match_diffusers(base, clip_skip, prompt_2):
    # states = [encoder 1 | encoder 2] penultimate (+clip_skip) layer, no final LayerNorm;
    # pooled = encoder 2's projected EOS state; prompt_2 (default: prompt) goes to encoder 2.
    ours, ref = base
    prompts = [LONG_PROMPT, "", "a red fox"]
    with torch.no_grad():
        states, _, pooled, _ = ref.encode_prompt(
            prompts, prompt_2=prompt_2, device="cpu", num_images_per_prompt=1,
            do_classifier_free_guidance=False, clip_skip=clip_skip or None)
    got = ours.encode_prompt(prompts, prompt_2=prompt_2, clip_skip=clip_skip,
                             prompt_syntax="plain")
    assert got.states.shape == (3, 77, 64) and got.text_embeds.shape == (3, 32)
    assert_close_rel(got.states[..., :32], states[..., :32], MODULE_REL, "text encoder 1 states")
    assert_close_rel(got.states[..., 32:], states[..., 32:], MODULE_REL, "text encoder 2 states")
    assert_close_rel(got.text_embeds, pooled, MODULE_REL, "pooled text embeddings")


def test_refiner_text_states_and_pooled_match_diffusers(refiner):
    # The refiner has text encoder 2 only: states (B, 77, 32), pooled from the same encoder.
    ours, ref = refiner
    prompts = [LONG_PROMPT, "", "a red fox"]
    with torch.no_grad():
        states, _, pooled, _ = ref.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    got = ours.encode_prompt(prompts, prompt_syntax="plain")
    assert got.states.shape == (3, 77, 32) and got.text_embeds.shape == (3, 32)
    assert_close_rel(got.states, states, MODULE_REL, "refiner text states")
    assert_close_rel(got.text_embeds, pooled, MODULE_REL, "refiner pooled text embeddings")


# -- UNet ---------------------------------------------------------------------------------------

# One row at the tiny size, one at SDXL's real sizes and crop; the refiner's last number is the
# aesthetic score.
TIME_IDS = {"base": [[H, W, 0, 0, H, W], [1024, 768, 16, 8, 960, 640]],
            "refiner": [[H, W, 0, 0, 6.0], [1024, 768, 16, 8, 2.5]]}


@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_unet_with_added_conditioning_matches_diffusers(request, variant):
    from sdrt.engine.loading import build
    folder, ref = request.getfixturevalue(f"sdxl_{variant}_folder")
    with open(os.path.join(folder, "unet", "config.json")) as f:
        ours = build("unet", json.load(f), device="cpu")
    ours.load_state_dict(ref.unet.state_dict())
    ours.eval()
    assert ours.config.addition_embed_type == "text_time"
    g = torch.Generator().manual_seed(1)
    x = -0.3 + torch.randn(2, 4, 6, 10, generator=g)  # odd 6→3 on the way down
    ctx = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor(TIME_IDS[variant])
    for t in (torch.tensor(999), torch.tensor([1.0, 500.5])):
        with torch.no_grad():
            expected = ref.unet(x, t, ctx, added_cond_kwargs={
                "text_embeds": text_embeds, "time_ids": time_ids}).sample
            got = ours(x, t, ctx, text_embeds=text_embeds, time_ids=time_ids)
            assert_close_rel(got, expected, MODULE_REL, f"{variant} unet at t={t.tolist()}")
    with torch.no_grad():
        other = ref.unet(x, t, ctx, added_cond_kwargs={
            "text_embeds": text_embeds, "time_ids": time_ids.flip(0)}).sample
    assert (other - expected).abs().max() > 1e-3, "the time ids do not reach diffusers' UNet"


# -- base, text to image ------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_txt2img_matches_diffusers(base, sampler):
    # Two prompts, a different prompt_2 for encoder 2, a negative prompt (and its own
    # negative_prompt_2), classifier-free guidance.
    ours, ref = base
    latents = _latents(2, 7)
    kw = dict(prompt_2=PROMPTS_2, height=H, width=W, num_inference_steps=STEPS,
              guidance_scale=5.0, latents=latents, output_type="np")
    expected = _reference(ref, sampler, PROMPTS, negative_prompt=[NEGATIVE] * 2,
                          negative_prompt_2=[NEGATIVE_2] * 2, **kw)
    _assert_lively(expected, sampler)
    got = ours(PROMPTS, negative_prompt=NEGATIVE, negative_prompt_2=NEGATIVE_2, sampler=sampler,
               prompt_syntax="plain", **kw)
    assert got.dtype == np.float32
    assert_close_abs(got, expected, IMAGE_ATOL, f"SDXL txt2img with {sampler}")


def test_zeroed_and_empty_negative_prompts_and_images_per_prompt(base):
    # force_zeros_for_empty_prompt: no negative prompt means zero states and zero pooled
    # embeddings for the unconditional half; negative_prompt="" is encoded like any prompt.
    # Two images of one prompt, repeated as diffusers repeats them.
    ours, ref = base
    latents = _latents(2, 8)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0, latents=latents,
              num_images_per_prompt=2, output_type="np")
    expected = {}
    for negative in (None, ""):
        expected[negative] = _reference(ref, "euler", PROMPTS[0], negative_prompt=negative, **kw)
        _assert_lively(expected[negative], f"negative {negative!r}")
        got = ours(PROMPTS[0], negative_prompt=negative, sampler="euler", prompt_syntax="plain",
                   **kw)
        assert_close_abs(got, expected[negative], IMAGE_ATOL,
                         f"negative_prompt={negative!r}, 2 per prompt")
    _assert_differs(expected[None], expected[""], "negative_prompt None vs ''")


MICRO = dict(original_size=(96, 64), crops_coords_top_left=(8, 4), target_size=(48, 32))
NEGATIVE_MICRO = dict(negative_original_size=(24, 40), negative_crops_coords_top_left=(2, 6),
                      negative_target_size=(32, 48))


@pytest.mark.parametrize("micro", [MICRO, {**MICRO, **NEGATIVE_MICRO}],
                         ids=["positive", "with-negative"])
def test_micro_conditioning_matches_diffusers(base, micro):
    # Time ids (original size, crop corner, target size), (h, w) order; without negative_*
    # sizes diffusers gives the unconditional half the positive time ids.
    ours, ref = base
    latents = _latents(1, 9)
    kw = dict(negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=3,
              guidance_scale=5.0, latents=latents, output_type="np")
    expected = _reference(ref, "euler", PROMPTS[1], **micro, **kw)
    _assert_lively(expected, "micro-conditioning")
    _assert_differs(expected, _reference(ref, "euler", PROMPTS[1], **kw), "micro-conditioning")
    got = ours(PROMPTS[1], sampler="euler", prompt_syntax="plain", **micro, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"micro-conditioning {sorted(micro)}")


def test_clip_skip_matches_diffusers(base):
    # No negative prompt (zeroed): diffusers encodes a negative prompt at the penultimate layer
    # whatever clip_skip says, so only the positive half is compared here.
    ours, ref = base
    latents = _latents(2, 10)
    kw = dict(prompt_2=PROMPTS_2, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
              latents=latents, clip_skip=1, output_type="np")
    expected = _reference(ref, "euler", PROMPTS, **kw)
    _assert_lively(expected, "clip_skip 1")
    got = ours(PROMPTS, sampler="euler", prompt_syntax="plain", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "clip_skip=1")


def test_euler_ancestral_seed_matches_diffusers(base):
    # The seed's CPU generator draws the initial latents, then each step's noise, as diffusers'
    # generator does.
    ours, ref = base
    kw = dict(negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=STEPS,
              guidance_scale=5.0, num_images_per_prompt=2, output_type="np")
    expected = _reference(ref, "euler_a", PROMPTS[0],
                          generator=torch.Generator().manual_seed(5), **kw)
    _assert_lively(expected, "euler_a")
    got = ours(PROMPTS[0], sampler="euler_a", seed=5, prompt_syntax="plain", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "euler_a, seed 5")


@pytest.mark.parametrize("negative", ["ugly", None])
def test_base_img2img_matches_diffusers(base, negative):
    # The base model given an image runs as diffusers' StableDiffusionXLImg2ImgPipeline on the
    # same components: six time ids from the image's size, strength 0.6 of 5 steps (the last 3),
    # the zeroed negative when there is none.
    from diffusers import StableDiffusionXLImg2ImgPipeline
    ours, ref = base
    ref_i2i = StableDiffusionXLImg2ImgPipeline(**ref.components)
    ref_i2i.original_scheduler_config = ref.original_scheduler_config
    ref_i2i.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8))
    kw = dict(image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              negative_prompt=negative, output_type="np")
    expected = _reference(ref_i2i, "euler", PROMPTS[0],
                          generator=torch.Generator().manual_seed(2), **kw)
    _assert_lively(expected, "base img2img")
    got = ours(PROMPTS[0], sampler="euler", seed=2, prompt_syntax="plain", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"base img2img, negative {negative!r}")


# -- refiner ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,scores", [
    ("euler", dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)),
    ("ddim", {}),  # the defaults, 6.0 and 2.5
], ids=["euler-scores", "ddim-default-scores"])
def test_refiner_img2img_matches_diffusers(refiner, sampler, scores):
    # Strength 0.5 of 4 steps: the last 2. Same seed: the VAE's posterior draw, then the noise.
    ours, ref = refiner
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8))
    kw = dict(image=init, strength=0.5,
              num_inference_steps=STEPS, guidance_scale=5.0, negative_prompt="ugly",
              output_type="np", **scores)
    expected = _reference(ref, sampler, PROMPTS[0], generator=torch.Generator().manual_seed(11),
                          **kw)
    _assert_lively(expected, f"refiner {sampler}")
    if scores:
        _assert_differs(expected, _reference(ref, sampler, PROMPTS[0],
                                             generator=torch.Generator().manual_seed(11),
                                             **{**kw, "aesthetic_score": 6.0,
                                                "negative_aesthetic_score": 2.5}),
                        "the aesthetic score")
    got = ours(PROMPTS[0], sampler=sampler, seed=11, prompt_syntax="plain", **kw)
    assert got.shape == (1, H, W, 3)
    assert_close_abs(got, expected, IMAGE_ATOL, f"refiner img2img {sampler} {scores}")


def test_refiner_refuses_prompt_2(refiner):
    # diffusers' refiner silently drops prompt_2 (its one encoder reads `prompt`); sdrt says so.
    from sdrt.engine import SdrtError
    ours, _ = refiner
    with pytest.raises(SdrtError, match="prompt_2"):
        ours(PROMPTS[0], prompt_2="a cat", image=np.zeros((H, W, 3), dtype=np.float32),
             num_inference_steps=2, prompt_syntax="plain")


@pytest.mark.parametrize("field,value", [("original_size", (0, 3)), ("target_size", (64,)),
                                         ("crops_coords_top_left", (-8, 0)),
                                         ("negative_original_size", (64.5, 64))])
def test_base_refuses_bad_micro_conditioning(base, field, value):
    # Through the API, before any text encoding: one error naming the field.
    from sdrt.engine import SdrtError
    ours, _ = base
    with pytest.raises(SdrtError, match=f"^{field} must be a pair"):
        ours(PROMPTS[0], num_inference_steps=2, prompt_syntax="plain", **{field: value})


def test_base_to_refiner_hand_off_matches_diffusers(base, refiner):
    # The base stops at denoising_end=0.8 and returns its latents; the refiner takes them as
    # `image` and runs the remaining timesteps (denoising_start=0.8) without adding noise.
    (ours_base, ref_base), (ours_refiner, ref_refiner) = base, refiner
    steps, kw = 5, dict(negative_prompt=NEGATIVE, guidance_scale=5.0)
    latents = _latents(1, 12)
    expected_latents = _reference(ref_base, "euler", PROMPTS[0], height=H, width=W,
                                  num_inference_steps=steps, latents=latents, denoising_end=0.8,
                                  output_type="latent", **kw)
    expected = _reference(ref_refiner, "euler", PROMPTS[0], image=expected_latents,
                          num_inference_steps=steps, denoising_start=0.8, output_type="np", **kw)
    _assert_lively(expected, "hand-off")
    # Leading timesteps 801, 601, 401, 201, 1: the cut at 1000·(1 − 0.8) = 200 gives 4 + 1.
    assert (ref_base.num_timesteps, ref_refiner.num_timesteps) == (4, 1)

    got_latents = ours_base(PROMPTS[0], height=H, width=W, num_inference_steps=steps,
                            latents=latents, denoising_end=0.8, output_type="latent",
                            sampler="euler", prompt_syntax="plain", **kw)
    assert ours_base.num_timesteps == 4
    assert_close_rel(got_latents, expected_latents, LATENT_REL, "base latents at denoising_end")
    got = ours_refiner(PROMPTS[0], image=got_latents, num_inference_steps=steps,
                       denoising_start=0.8, output_type="np", sampler="euler",
                       prompt_syntax="plain", **kw)
    assert ours_refiner.num_timesteps == 1
    assert_close_abs(got, expected, IMAGE_ATOL, "base → refiner hand-off")


# -- Turbo --------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_without_guidance_matches_diffusers(turbo, steps):
    # The folder's scheduler (Euler ancestral, trailing) and default size (64 px), guidance 0:
    # no unconditional half. The seed draws the latents and the ancestral noise.
    ours, ref = turbo
    ref.scheduler = _scheduler(ref, "euler_a")
    with torch.no_grad():
        expected = ref(PROMPTS[0], num_inference_steps=steps, guidance_scale=0.0,
                       generator=torch.Generator().manual_seed(3), output_type="np").images
    _assert_lively(expected, "turbo")
    got = ours(PROMPTS[0], num_inference_steps=steps, guidance_scale=0.0, seed=3,
               prompt_syntax="plain", output_type="np")
    assert got.shape == (1, 64, 64, 3)
    assert_close_abs(got, expected, IMAGE_ATOL, f"turbo, {steps} steps")


# -- static plans -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_static(sdxl_base_folder):
    """A pipeline of its own: compiling changes how later calls run."""
    return _ours(sdxl_base_folder[0])


@pytest.mark.parametrize("sampler,extra", [
    ("dpmpp_2m", dict(negative_prompt=NEGATIVE)),
    ("euler_a", dict(negative_prompt=NEGATIVE, **MICRO)),  # per-call time ids, step noise
    ("euler", {}),  # no negative prompt: the unconditional half's states and pooled are zeros
], ids=["dpmpp_2m", "euler_a-micro", "euler-zeroed-negative"])
def test_static_plan_equals_eager(base_static, sampler, extra):
    # The plan's conditioning buffers (states, pooled embeddings, time ids) are filled per call.
    pipe = base_static
    pipe.runtime = None
    plan = pipe.compile(height=H, width=W, batch_size=2, num_inference_steps=3, sampler=sampler)
    kw = dict(prompt=PROMPTS, prompt_2=PROMPTS_2, height=H, width=W, num_inference_steps=3,
              sampler=sampler, guidance_scale=5.0, seed=4, prompt_syntax="plain",
              output_type="np", **extra)
    static = pipe(**kw)
    eager = run_eagerly(pipe, **kw)
    assert list(pipe.runtime.plans.values()) == [plan], "the call did not use the built plan"
    assert_close_abs(static, eager, STATIC_ATOL, f"static plan vs eager, {sampler} {sorted(extra)}")
