"""Latent consistency models: the lcm sampler against diffusers' LCMScheduler call by call, a
guidance-distilled UNet (``time_cond_proj_dim``) against diffusers', and whole images of a tiny
LCM pipeline against diffusers' StableDiffusionPipeline, eager and under a static plan.

Tolerances: sampler, 1e-5 relative per call (as tests/test_samplers.py); UNet output, 1e-4 max
abs (float32 accumulation order); images in [0, 1], 2e-3 max abs (as tests/test_pipeline.py).
"""
import warnings

import numpy as np
import pytest
import torch

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.samplers import SchedulerConfig, default_sampler, make_schedule, sample
from test_samplers import LinearModel, _assert_close, _latents

IMAGE_ATOL = 2e-3
UNET_ATOL = 1e-4
COND_DIM = 32

# LCM-Dreamshaper-v7's scheduler config (the common case: leading spacing, steps_offset 1).
LCM_CONFIG = {"_class_name": "LCMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
              "set_alpha_to_one": True, "steps_offset": 1, "prediction_type": "epsilon",
              "original_inference_steps": 50, "timestep_spacing": "leading"}

CONFIGS = {
    "dreamshaper": LCM_CONFIG,
    # a distillation on a coarser grid (k = 50), v-prediction, a smaller boundary time scale
    "v_coarse": {**LCM_CONFIG, "prediction_type": "v_prediction", "original_inference_steps": 20,
                 "timestep_scaling": 5.0},
    # x0 prediction with clipping, linear betas, alpha-bar 0 not forced to 1
    "sample_clip": {**LCM_CONFIG, "prediction_type": "sample", "clip_sample": True,
                    "clip_sample_range": 0.8, "beta_schedule": "linear", "beta_start": 0.0001,
                    "beta_end": 0.02, "set_alpha_to_one": False},
}


def _run_diffusers(cfg, steps, noise, generator, x0=None, strength=1.0, original=None):
    """LatentConsistencyModel(Img2Img)Pipeline's loop around LCMScheduler.from_config(cfg)."""
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = diffusers.LCMScheduler.from_config(cfg)
    sch.set_timesteps(steps, strength=strength, original_inference_steps=original)
    x = noise * sch.init_noise_sigma if x0 is None else sch.add_noise(x0, noise,
                                                                      sch.timesteps[:1])
    model = LinearModel()
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    return model, x


def _run_ours(cfg, steps, noise, generator, x0=None, strength=1.0, original=None):
    config = SchedulerConfig.from_dict(cfg if original is None else
                                       {**cfg, "original_inference_steps": original})
    sched = make_schedule(config, "lcm", steps, strength)
    x = sched.noise_latents(noise) if x0 is None else sched.noise_image(x0, noise)
    model = LinearModel()
    return model, sample("lcm", model, x, sched, generator=generator), sched


def _generators(seed, n):
    """n CPU generators, or a list of n per-row generators when seed is a list."""
    if isinstance(seed, list):
        return [[torch.Generator().manual_seed(s) for s in seed] for _ in range(n)]
    return [torch.Generator().manual_seed(seed) for _ in range(n)]


def _compare(cfg, steps, x0=None, strength=1.0, original=None, gen_seed=5, batch=1):
    noise = _latents(1, (batch, 4, 8, 8))
    gens = _generators(gen_seed, 2)
    ref_model, ref_x = _run_diffusers(cfg, steps, noise, gens[0], x0, strength, original)
    our_model, our_x, sched = _run_ours(cfg, steps, noise, gens[1], x0, strength, original)
    ref_t = torch.stack([t for _, t in ref_model.calls])
    our_t = torch.stack([t for _, t in our_model.calls])
    assert torch.equal(our_t, ref_t), \
        f"timesteps differ:\n ours      {our_t.tolist()}\n diffusers {ref_t.tolist()}"
    assert len(our_t) == steps, f"{len(our_t)} model calls for {steps} steps"
    for i, ((ours, _), (theirs, t)) in enumerate(zip(our_model.calls, ref_model.calls)):
        _assert_close(ours, theirs, f"model input of call {i} (t={t.item()})")
    _assert_close(our_x, ref_x, "final latents")
    assert our_x.std() > 0.1, "final latents are flat: the comparison proves nothing"
    return sched


@pytest.mark.parametrize("steps", [
    1,  # one call: the denoised prediction itself, no noise drawn
    2,  # one noise draw
    4, 8,  # the usual LCM step counts
    13,  # a count that does not divide the 50 original steps (floor'd indices)
])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lcm_matches_diffusers(config, steps):
    if steps > CONFIGS[config]["original_inference_steps"]:
        pytest.skip("more steps than the distillation grid holds")
    sched = _compare(CONFIGS[config], steps)
    assert sched.noise_draws == steps - 1


@pytest.mark.parametrize("original", [10, 25, 1000])  # an override of the config's 50
def test_lcm_original_inference_steps(original):
    _compare(LCM_CONFIG, 4, original=original)


@pytest.mark.parametrize("steps,strength", [
    (4, 0.5),  # the LCM img2img default: 4 steps over the lower half of the grid
    (4, 0.3),  # int(50 · 0.3) = 15 original timesteps left
    (8, 0.9),
    (1, 0.25),
])
def test_lcm_img2img_matches_diffusers(steps, strength):
    x0 = 0.2 + 0.8 * _latents(2)
    _compare(LCM_CONFIG, steps, x0=x0, strength=strength)


def test_lcm_per_row_generators():
    # A list of generators draws row i of every step's noise from generator i, as diffusers'
    # randn_tensor does with a list.
    _compare(LCM_CONFIG, 4, gen_seed=[3, 9], batch=2)


def test_lcm_predrawn_noise_equals_generator():
    # The static runtime's path: the noise drawn beforehand, in the sampler's order of draws.
    config = SchedulerConfig.from_dict(LCM_CONFIG)
    sched = make_schedule(config, "lcm", 4)
    x = _latents(3, (2, 4, 8, 8))
    drawn = sample("lcm", LinearModel(), x, sched, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    noise = torch.stack([torch.randn(x.shape, generator=g) for _ in range(sched.noise_draws)])
    given = sample("lcm", LinearModel(), x, sched, noise=noise)
    assert torch.equal(given, drawn), f"max diff {(given - drawn).abs().max():.3g}"
    with pytest.raises(SdrtError, match="noise has shape"):
        sample("lcm", LinearModel(), x, sched, noise=noise[:2])


def test_lcm_refusals_and_default():
    config = SchedulerConfig.from_dict(LCM_CONFIG)
    assert default_sampler(config) == "lcm"
    with pytest.raises(SdrtError, match="at most original_inference_steps"):
        make_schedule(config, "lcm", 51)
    with pytest.raises(SdrtError, match="strength 0.1 keeps 5"):
        make_schedule(config, "lcm", 8, strength=0.1)


# --- a guidance-distilled UNet and whole images ------------------------------------------------

@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    """(folder, diffusers pipeline, sdrt pipeline) of a tiny SD-1-like model whose UNet has
    time_cond_proj_dim, with an LCMScheduler: what LCM-distilled checkpoints ship."""
    pytest.importorskip("diffusers")
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tiny_models import build_diffusers_pipeline, unet_kwargs
    root = tmp_path_factory.mktemp("tiny-lcm")
    ref = build_diffusers_pipeline("sd1", str(root / "tokenizer"))
    torch.manual_seed(1)
    ref.unet = UNet2DConditionModel(**unet_kwargs("sd1"), time_cond_proj_dim=COND_DIM).eval()
    # diffusers initialises cond_proj like any Linear; make its contribution visible.
    with torch.no_grad():
        ref.unet.time_embedding.cond_proj.weight.mul_(4)
    ref.register_modules(unet=ref.unet, scheduler=LCMScheduler.from_config(
        {k: v for k, v in LCM_CONFIG.items() if k != "_class_name"}))
    folder = str(root / "model")
    ref.save_pretrained(folder, safe_serialization=True)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, LCMScheduler)
    return folder, ref, Pipeline.from_pretrained(folder, device="cpu")


def test_cfg_pp_sampler_is_refused(lcm_model):
    # A guidance-distilled UNet runs no unconditional pass for a CFG++ sampler to step along.
    with pytest.raises(SdrtError, match="cfgpp_euler \\(CFG\\+\\+\\) needs the unconditional "
                       "pass, which this guidance-distilled UNet"):
        lcm_model[2]("a fox", height=32, width=32, num_inference_steps=2, sampler="cfgpp_euler")


def test_unet_with_timestep_cond_matches_diffusers(lcm_model):
    _, ref, ours = lcm_model
    g = torch.Generator().manual_seed(0)
    x = -0.3 + torch.randn(2, 4, 8, 8, generator=g)
    states = 0.5 + torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(759)
    cond = 0.2 + torch.randn(2, COND_DIM, generator=g)
    with torch.no_grad():
        expected = ref.unet(x, t, states, timestep_cond=cond).sample
        got = torch.full_like(expected, float("nan"))
        got.copy_(ours.unet(x, t, states, timestep_cond=cond))
        plain = ours.unet(x, t, states)
    assert_close_abs(got, expected, UNET_ATOL, "UNet output with timestep_cond")
    # The condition must matter, or the comparison above would not test cond_proj.
    assert (plain - expected).abs().max() > 100 * UNET_ATOL, "timestep_cond changes nothing"


PROMPTS = ["a red fox in the snow, 35mm photo", "a lighthouse at dusk, oil painting"]


def _assert_lively(image, what):
    inside = ((image > 0.02) & (image < 0.98)).mean()
    assert image.std() > 0.01 and inside > 0.5, f"{what}: reference image is degenerate"


@pytest.mark.parametrize("steps,guidance", [
    (4, 1.5),  # the usual LCM call
    (1, 8.0),  # one step; a scale > 1 that must not turn on classifier-free guidance
    (6, 0.5),  # w < 0: the embedding takes the scale as given, not clamped to 1
])
def test_lcm_images_match_diffusers(lcm_model, steps, guidance):
    _, ref, ours = lcm_model
    h, w = 16, 24
    latents = torch.randn(2, 4, h // 2, w // 2,  # the tiny VAE scales by 2
                           generator=torch.Generator().manual_seed(7))
    expected = ref(PROMPTS, height=h, width=w, num_inference_steps=steps,
                   guidance_scale=guidance, latents=latents, output_type="np",
                   generator=torch.Generator().manual_seed(11)).images
    _assert_lively(expected, f"lcm {steps} steps")
    got = ours(PROMPTS, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
               latents=latents, output_type="np", generator=torch.Generator().manual_seed(11))
    assert ours.timings["unet_calls"] == steps
    assert_close_abs(got, expected, IMAGE_ATOL, f"lcm images, {steps} steps, scale {guidance}")


def test_lcm_static_plan_equals_eager(lcm_model):
    _, _, ours = lcm_model
    kw = dict(height=16, width=24, num_inference_steps=4, output_type="np")
    scales = [1.5, 3.0]  # one per prompt: the static guidance embedding is filled per request
    eager = ours(PROMPTS, guidance_scale=scales, generator=torch.Generator().manual_seed(3), **kw)
    try:
        plan = ours.compile(16, 24, batch_size=2, num_inference_steps=4, sampler="lcm",
                            strict=True)
        assert plan.step_noise is not None and plan.step_noise.shape[0] == 3
        assert plan.timestep_cond is not None and not plan.shape.guidance
        plan.step_noise.fill_(float("nan"))
        plan.timestep_cond.fill_(float("nan"))
        static = ours(PROMPTS, guidance_scale=scales, sampler="lcm",
                      generator=torch.Generator().manual_seed(3), **kw)
        again = ours(PROMPTS, guidance_scale=[3.0, 1.5], sampler="lcm",
                     generator=torch.Generator().manual_seed(3), **kw)
    finally:
        ours.runtime = None
    assert_close_abs(static, eager, 1e-6, "lcm static plan vs eager")
    assert np.abs(again - static).max() > 1e-3, "a new guidance scale did not reach the plan"


def test_lcm_batch_rows_equal_single_images(lcm_model):
    # Per-image generators and per-prompt scales: each image as it comes out alone. A scale
    # below 1 next to one above it stays as given (no CFG clamping to 1 for these UNets).
    _, _, ours = lcm_model
    kw = dict(height=16, width=16, num_inference_steps=4, output_type="np")
    batch = ours(PROMPTS, guidance_scale=[0.5, 2.5], generator=[
        torch.Generator().manual_seed(s) for s in (21, 22)], **kw)
    for i, (prompt, scale, seed) in enumerate(zip(PROMPTS, (0.5, 2.5), (21, 22))):
        alone = ours(prompt, guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
                     **kw)
        assert_close_abs(batch[i:i + 1], alone, 1e-5, f"row {i} of the batch vs alone")
    assert np.abs(batch[0] - batch[1]).max() > 1e-2, "the two rows are the same image"


def test_lcm_img2img_images_match_diffusers(lcm_model):
    # LatentConsistencyModelImg2ImgPipeline: strength picks the lower part of the LCM grid and
    # all the steps run there; the VAE's posterior sample, then the noise, from one generator.
    from diffusers import LatentConsistencyModelImg2ImgPipeline
    _, ref, ours = lcm_model
    ref_i2i = LatentConsistencyModelImg2ImgPipeline(**ref.components,
                                                    requires_safety_checker=False)
    g = torch.Generator().manual_seed(4)
    image = (0.5 + 0.25 * torch.randn(2, 3, 16, 24, generator=g)).clamp(0, 1)
    kw = dict(num_inference_steps=4, guidance_scale=1.5, strength=0.6, output_type="np")
    expected = ref_i2i(PROMPTS, image=image, generator=torch.Generator().manual_seed(8),
                       **kw).images
    _assert_lively(expected, "lcm img2img")
    got = ours(PROMPTS, image=image, sampler="lcm", generator=torch.Generator().manual_seed(8),
               **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "lcm img2img images")
