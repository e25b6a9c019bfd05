"""Samplers against diffusers' schedulers, call by call.

For every case both sides run the same deterministic model from the same starting latents: the
diffusers side is the loop of its StableDiffusion(Img2Img)Pipeline (set_timesteps, init_noise_sigma
or add_noise, then scale_model_input / model / step), built with ``XScheduler.from_config(cfg)``.
Each model call's input and timestep are recorded on both sides, so a mismatch names the first
call (hence the step before it) that diverged. Tolerance: max |ours - theirs| <= 1e-5 * max(1,
max |theirs|) per call, float32 rounding of a few dozen steps.

diffusers is imported where a scheduler is built (``_diffusers_scheduler``), so the file
collects where it is not installed (the GPU machine), and the comparisons skip there.
"""
import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

from sdrt.engine.errors import SdrtError
from sdrt.engine.samplers import (SAMPLERS, SchedulerConfig, brownian_noise, brownian_seeds,
                                  default_sampler, make_schedule, sample)

RTOL = 1e-5

_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "trained_betas": None}

CONFIGS = {
    # SD 1.5 / 2.1-base as shipped: the common case, and an old config missing timestep_spacing,
    # so each class falls back to its own default (leading for DDIM/PNDM, linspace otherwise).
    "sd15": {"_class_name": "PNDMScheduler", **_SD_BETAS, "clip_sample": False,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1},
    # SD 2.1 (768): v-prediction, DDIM class.
    "sd21": {"_class_name": "DDIMScheduler", **_SD_BETAS, "clip_sample": False,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "prediction_type": "v_prediction"},
    # SD-Turbo: trailing spacing (t = 999 first). No clip_sample key: DDIM's default clips x0.
    "turbo": {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS, "steps_offset": 1,
              "timestep_spacing": "trailing", "interpolation_type": "linear",
              "use_karras_sigmas": False},
    # linspace spacing on plain linear betas: fractional Euler timesteps, DDIM's round-half cases.
    "linspace": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
                 "beta_schedule": "linear", "timestep_spacing": "linspace", "clip_sample": False},
    # PNDM with its Runge-Kutta warm-up (12 extra calls, timesteps at half steps).
    "prk": {"_class_name": "PNDMScheduler", **_SD_BETAS, "clip_sample": False,
            "set_alpha_to_one": False, "skip_prk_steps": False, "steps_offset": 1},
}

# Less common fields, each exercised where it is read.
EXTRA_CONFIGS = {
    # zero-terminal-SNR fine-tunes: cosine betas rescaled, v-prediction, trailing, DDIM's alpha 1;
    # a lambda clip below the 2^-24 stand-in for the last alpha-bar (DPM must clip after it).
    "zsnr_cosine": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
                    "beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
                    "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                    "set_alpha_to_one": True, "clip_sample": False, "lambda_min_clipped": -10.0},
    # x0-predicting model with clipping on a short custom range, leading spacing with an offset.
    "sample_clip": {"_class_name": "DDIMScheduler", **_SD_BETAS, "prediction_type": "sample",
                    "clip_sample": True, "clip_sample_range": 1.5, "steps_offset": 1},
    # Euler with Karras sigmas on a leading grid (Karras range taken from the grid, not training).
    "euler_karras_leading": {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS,
                             "timestep_spacing": "leading", "steps_offset": 1,
                             "use_karras_sigmas": True},
    # log-linear Euler sigmas and continuous timesteps for v-prediction.
    "euler_loglinear_continuous": {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS,
                                   "interpolation_type": "log_linear", "timestep_type": "continuous",
                                   "prediction_type": "v_prediction"},
    # DPM-Solver with the final step to sigma_min (then 2nd order last unless < 15 steps),
    # leading spacing and a clipped lambda range.
    "dpm_sigma_min": {"_class_name": "DPMSolverMultistepScheduler", **_SD_BETAS,
                      "final_sigmas_type": "sigma_min", "timestep_spacing": "leading",
                      "steps_offset": 1, "lambda_min_clipped": -5.1},
    # explicit trained betas (ignore the beta_* fields).
    "trained_betas": {"_class_name": "PNDMScheduler", "num_train_timesteps": 100,
                      "trained_betas": torch.linspace(1e-4, 0.05, 100).tolist(),
                      "skip_prk_steps": True, "beta_schedule": "linear"},
}

DETERMINISTIC = ("ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras")


def _diffusers_scheduler(sampler, cfg):
    diffusers = pytest.importorskip("diffusers")
    name, extra = {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
        "dpm2": ("KDPM2DiscreteScheduler", {}),
        "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
        "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
        "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        "dpmpp_2m_sde": ("DPMSolverMultistepScheduler",
                         {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                                {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_2m_sde_heun": ("DPMSolverMultistepScheduler", {
            "use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++",
            "solver_type": "heun"}),
        "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {
            "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++",
            "solver_type": "heun"}),
        **{f"{name}_exponential": ("DPMSolverMultistepScheduler", {
            "use_exponential_sigmas": True, "use_karras_sigmas": False,
            "algorithm_type": "sde-dpmsolver++", **extra})
           for name, extra in (("dpmpp_2m_sde", {}),
                               ("dpmpp_2m_sde_heun", {"solver_type": "heun"}),
                               ("dpmpp_3m_sde", {"solver_order": 3}))},
        "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {
            "use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler", {
            "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        "lms": ("LMSDiscreteScheduler", {}),
        "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
        "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
        "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
        "deis": ("DEISMultistepScheduler", {"use_karras_sigmas": False}),
        "deis_karras": ("DEISMultistepScheduler", {"use_karras_sigmas": True}),
        "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
        "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    }[sampler]
    key = (name, json.dumps({**cfg, **extra}, sort_keys=True))
    if key not in _BUILT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT[key] = getattr(diffusers, name).from_config(cfg, **extra)
    return copy.deepcopy(_BUILT[key])


# (class, config) → a scheduler as built, never stepped: KDPM2's constructor alone maps its
# 1000 training sigmas to timesteps one by one (0.6 s), and hundreds of cases share a config.
_BUILT = {}


class LinearModel:
    """A stand-in UNet: a fixed random channel mix of x plus a timestep-dependent bias, so the
    output depends on both the input and the exact timestep. Records every call."""

    def __init__(self, channels=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.4 * torch.eye(channels) + 0.2 * torch.randn(channels, channels, generator=g)
        self.b = 0.5 + 0.3 * torch.randn(channels, 1, 1, generator=g)
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        tt = t.float() / 1000
        mixed = torch.einsum("oc,bchw->bohw", self.w, x.float())
        out = mixed * (1 - 0.5 * tt) + self.b * torch.sin(3 * tt + 0.1)
        return out.to(x.dtype)


def _latents(seed, shape=(1, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return -0.3 + torch.randn(shape, generator=g)


def _run_diffusers(sampler, cfg, steps, noise, x0=None, strength=1.0, generator=None):
    """diffusers' pipeline loop: returns (model, final latents, init_noise_sigma)."""
    step_kw = {"generator": generator} if generator is not None else {}
    if sampler.startswith("dpmpp_sde"):
        # DPMSolverSDEScheduler draws from Brownian trees seeded by its config, not from a
        # generator: seeded as sdrt seeds them from the same generator.
        pytest.importorskip("torchsde")
        cfg = {**cfg, "noise_sampler_seed": brownian_seeds(generator, noise.shape[0])}
        step_kw = {}
    sch = _diffusers_scheduler(sampler, cfg)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    if x0 is None:
        x = noise * sch.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = timesteps[t_start * sch.order:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        x = sch.add_noise(x0, noise, timesteps[:1])
    model = LinearModel()
    for t in timesteps:
        out = model(sch.scale_model_input(x, t), t)
        x = sch.step(out, t, x, **step_kw).prev_sample
    return model, x, float(sch.init_noise_sigma)


def _run_ours(sampler, cfg, steps, noise, x0=None, strength=1.0, generator=None):
    sched = make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps, strength)
    x = sched.noise_latents(noise) if x0 is None else sched.noise_image(x0, noise)
    model = LinearModel()
    seen = []
    x = sample(sampler, model, x, sched, generator=generator, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, len(sched.timesteps)) for i in range(len(sched.timesteps))], \
        f"callback calls {seen[:3]}... do not count 0..{len(sched.timesteps) - 1}"
    return model, x, sched


def _assert_close(ours, theirs, where, rtol=RTOL):
    assert ours.shape == theirs.shape, f"{where}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    scale = max(1.0, theirs.abs().max().item())
    err = (ours.float() - theirs.float()).abs().max().item()
    assert err <= rtol * scale, \
        f"{where}: max abs diff {err:.3g} > {rtol * scale:.3g} (|ref| max {scale:.3g})"


def _compare(sampler, cfg, steps, x0=None, strength=1.0, gen_seed=None, rtol=RTOL):
    noise = _latents(1)
    gens = [torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None for _ in range(2)]
    ref_model, ref_x, ref_sigma = _run_diffusers(sampler, cfg, steps, noise, x0, strength, gens[0])
    our_model, our_x, sched = _run_ours(sampler, cfg, steps, noise, x0, strength, gens[1])
    ref_t = torch.stack([t for _, t in ref_model.calls])
    if sampler.startswith(("dpm2", "dpmpp_sde")) and ref_t.dtype == torch.float64:
        # KDPM2 keeps rounded Karras timesteps in float64, DPMSolverSDE all of them; the
        # UNet's timestep embedding reads them as float32 (diffusers'
        # get_timestep_embedding), as sdrt holds them.
        ref_t = ref_t.float()
    our_t = torch.stack([t for _, t in our_model.calls])
    assert our_t.dtype == ref_t.dtype, f"timestep dtype {our_t.dtype} vs diffusers {ref_t.dtype}"
    assert torch.equal(our_t, ref_t), \
        f"timesteps differ:\n ours      {our_t.tolist()}\n diffusers {ref_t.tolist()}"
    assert torch.equal(sched.timesteps, our_t), "sched.timesteps is not the list of model calls"
    if x0 is None:
        assert sched.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6), \
            f"init_noise_sigma {sched.init_noise_sigma} vs diffusers {ref_sigma}"
    for i, ((ours, _), (theirs, t)) in enumerate(zip(our_model.calls, ref_model.calls)):
        _assert_close(ours, theirs, f"model input of call {i} (t={t.item()})", rtol)
    if not torch.isfinite(ref_x).all() and sampler.startswith(("unipc", "dpmpp_3m")):
        # UniPC's bh1, and its noise-extrapolating form, step to sigma 0 through 0 * inf in
        # diffusers (NaN); sdrt takes the limit (the clean latents of that last step).
        # DPM++ 3M divides by a last step of no length (Karras sigmas ending on sigma_min
        # with final_sigmas_type "sigma_min"); sdrt leaves the latents as they are.
        assert torch.isfinite(our_x).all(), "final latents not finite"
        return
    _assert_close(our_x, ref_x, "final latents", rtol)


# --- deterministic samplers, text-to-image ---------------------------------------------------

def _runs_prk(sampler, cfg):
    # PNDMScheduler.from_config runs the Runge-Kutta warm-up unless skip_prk_steps is true; it
    # defaults to false, so every non-PNDM config here asks for it.
    return sampler == "pndm" and not cfg.get("skip_prk_steps", False)


@pytest.mark.parametrize("steps", [
    1,   # a single step: first step is also the last (DPM lower order, PLMS alone)
    4,   # SD-Turbo-like; PLMS reaches its 4th-order formula; PRK's minimum
    10,  # ratio 100: PRK half steps of 50
    25,  # ratio 40, a common setting; DPM's rules for >= 15 steps
])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_matches_diffusers(sampler, config, steps):
    cfg = CONFIGS[config]
    if _runs_prk(sampler, cfg) and steps < 4:
        # diffusers fails to build PRK timesteps for < 4 steps (a numpy broadcast error).
        with pytest.raises(SdrtError, match="at least 4 steps"):
            make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps)
        return
    _compare(sampler, cfg, steps)


@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("config", list(EXTRA_CONFIGS))
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_matches_diffusers_extra_fields(sampler, config, steps):
    cfg = EXTRA_CONFIGS[config]
    if (sampler, config, steps) == ("dpmpp_2m_karras", "zsnr_cosine", 25):
        pytest.skip("diffusers cannot run it: see test_dpm_karras_repeated_first_timestep")
    if sampler == "pndm" and cfg.get("prediction_type") == "sample":
        with pytest.raises(SdrtError, match="prediction_type 'sample'"):
            make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps)
        return
    _compare(sampler, cfg, steps)


def test_dpm_karras_repeated_first_timestep():
    # Karras timesteps are not rounded for cosine betas, and with zero terminal SNR the first
    # seven truncate to 998. diffusers then starts at the second occurrence of its first
    # timestep and runs off the end of its sigmas; we start at the first and finish.
    cfg = EXTRA_CONFIGS["zsnr_cosine"]
    ref = _diffusers_scheduler("dpmpp_2m_karras", cfg)
    ref.set_timesteps(25)
    with pytest.raises(IndexError):
        _run_diffusers("dpmpp_2m_karras", cfg, 25, _latents(1))
    model, x, sched = _run_ours("dpmpp_2m_karras", cfg, 25, _latents(1))
    assert torch.equal(sched.timesteps, ref.timesteps), f"{sched.timesteps} vs {ref.timesteps}"
    assert sched.timesteps[0] == sched.timesteps[1], "the case no longer repeats its first timestep"
    assert torch.isfinite(x).all(), "non-finite latents"


# --- image-to-image ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps,strength", [
    (10, 0.75),  # the img2img default: 3 leading steps dropped
    (25, 0.3),   # few steps left; int(25 * 0.3) = 7 (float rounding in the product)
    (4, 1.0),    # strength 1 keeps everything but still starts from add_noise
])
@pytest.mark.parametrize("config", ["sd15", "turbo", "prk"])
@pytest.mark.parametrize("sampler", DETERMINISTIC + ("euler_a",))
def test_img2img_matches_diffusers(sampler, config, steps, strength):
    x0 = 0.5 * _latents(7)
    # euler_a: diffusers draws its noise from the generator the same way, so it matches too.
    _compare(sampler, CONFIGS[config], steps, x0=x0, strength=strength,
             gen_seed=11 if sampler == "euler_a" else None)


# --- Heun, DPM2 (two calls a step), DPM++ 2M SDE, Karras variants ------------------------------

TWO_CALL = ("heun", "heun_karras", "dpm2", "dpm2_karras")
MULTISTEP = ("lms", "lms_karras", "unipc", "unipc_karras", "deis", "deis_karras")
NOISY = ("dpm2_a", "dpm2_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_heun",
         "dpmpp_2m_sde_heun_karras", "dpmpp_3m_sde", "dpmpp_3m_sde_karras", "dpmpp_sde",
         "dpmpp_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_2m_sde_heun_exponential",
         "dpmpp_3m_sde_exponential")


def _diverges(sampler, config, steps):
    """Where diffusers cannot be the reference: why, or None."""
    if config == "zsnr_cosine" and sampler.endswith("_karras"):
        # Squared-cosine betas: the first Karras timesteps can repeat (see
        # test_dpm_karras_repeated_first_timestep); KDPM2 then starts at the second
        # occurrence, DPM-Solver runs off its sigmas. Checked below to run finitely.
        t = make_schedule(SchedulerConfig.from_dict(EXTRA_CONFIGS[config]), sampler,
                          steps).timesteps
        step_starts = t[0::2] if sampler.startswith("dpm2") else t
        if len(step_starts) > 1 and step_starts[0] == step_starts[1]:
            return "repeated first timestep"
    if sampler.startswith("dpm2_a"):
        sched = make_schedule(SchedulerConfig.from_dict({**CONFIGS, **EXTRA_CONFIGS}[config]),
                              sampler, steps)
        if (sched.sigmas_in[1::2] == 0).any():
            return "a sigma_down of 0, diffusers' midpoint NaN"
    if config == "zsnr_cosine" and sampler.endswith("_exponential"):
        # Exponential sigmas on zero-SNR squared-cosine betas truncate to repeated timesteps,
        # on which DPMSolverMultistepScheduler's step index runs past its sigmas.
        t = make_schedule(SchedulerConfig.from_dict(EXTRA_CONFIGS[config]), sampler,
                          steps).timesteps
        if (t[1:] == t[:-1]).any():
            return "repeated timesteps"
    if sampler.startswith("dpmpp_2m_sde_heun"):
        sched = make_schedule(SchedulerConfig.from_dict({**CONFIGS, **EXTRA_CONFIGS}[config]),
                              sampler, steps)
        if (sched.sigmas[1:] == sched.sigmas[:-1]).any():
            return "a step of no length, diffusers' Heun weight 0/0 NaN"
    return None


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("config", list(CONFIGS) + list(EXTRA_CONFIGS))
@pytest.mark.parametrize("sampler", ("euler_karras",) + TWO_CALL + MULTISTEP + NOISY)
def test_k_samplers_match_diffusers(sampler, config, steps):
    # Heun and KDPM2 lay out 2 * steps - 1 calls; their second calls' timesteps, KDPM2's
    # interpolated in log sigma, are compared exactly. The noisy ones draw the same noise
    # from the same seed on both sides.
    cfg = {**CONFIGS, **EXTRA_CONFIGS}[config]
    if cfg.get("prediction_type") == "sample" and sampler.startswith(("dpm2", "dpmpp_sde")):
        with pytest.raises(SdrtError, match="prediction_type 'sample'"):
            make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps)
        return
    seed = 5 if sampler in NOISY else None
    # DEIS on squared-cosine Karras sigmas (sigma_max 2e4) weighs outputs by thousands that
    # cancel: float32 rounding, on either side, grows past 1e-5 there.
    rtol = 1e-4 if sampler.startswith("deis") and config == "zsnr_cosine" else RTOL
    if _diverges(sampler, config, steps):
        sched = make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps)
        x = sample(sampler, LinearModel(), sched.noise_latents(_latents(1)), sched,
                   generator=torch.Generator().manual_seed(5) if seed else None)
        assert torch.isfinite(x).all(), f"{_diverges(sampler, config, steps)}: not finite"
        return
    _compare(sampler, cfg, steps, gen_seed=seed, rtol=rtol)


@pytest.mark.parametrize("steps,strength", [(10, 0.75), (25, 0.3), (4, 1.0)])
@pytest.mark.parametrize("config", ["sd15", "turbo", "sd21"])
@pytest.mark.parametrize("sampler", ("euler_karras",) + TWO_CALL + MULTISTEP + NOISY)
def test_k_samplers_img2img_match_diffusers(sampler, config, steps, strength):
    # A two-call sampler skips two calls a skipped step (diffusers' order 2).
    _compare(sampler, CONFIGS[config], steps, x0=0.5 * _latents(7), strength=strength,
             gen_seed=3 if sampler in NOISY else None)


# Settings of the multistep classes, each where it changes the weights the host solves.
MULTISTEP_VARIANTS = [
    ("unipc", {"solver_order": 3}),  # a solved predictor and corrector
    ("unipc", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc", {"solver_order": 1}),
    ("unipc", {"predict_x0": False}),  # extrapolates the noise
    ("unipc", {"disable_corrector": [0, 2]}),
    ("unipc", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_type": "midpoint"}),  # DPM-Solver's name: read as bh2
    ("unipc", {"solver_order": 3, "use_karras_sigmas": True,
               "prediction_type": "v_prediction"}),
    ("deis", {"solver_order": 3}),  # DEIS's third order (its class's default is 2)
    ("deis", {"solver_order": 1}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    ("deis", {"solver_order": 3, "prediction_type": "v_prediction", "use_karras_sigmas": True}),
]


@pytest.mark.parametrize("steps", [1, 3, 8, 20])
@pytest.mark.parametrize("family,variant", MULTISTEP_VARIANTS)
def test_multistep_variants_match_diffusers(family, variant, steps):
    cls = {"unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler"}[family]
    cfg = {**CONFIGS["sd15"], "_class_name": cls, **variant}
    sampler = family + ("_karras" if variant.get("use_karras_sigmas") else "")
    _compare(sampler, cfg, steps)
    if steps == 8:
        _compare(sampler, cfg, steps, x0=0.5 * _latents(7), strength=0.6)


@pytest.mark.parametrize("config", ["sd15", "turbo", "sd21", "linspace"])
@pytest.mark.parametrize("steps,strength", [(1, 1.0), (6, 1.0), (20, 1.0), (10, 0.6)])
def test_euler_a_karras_is_euler_a_on_eulers_karras_sigmas(config, steps, strength):
    # diffusers' ancestral class has no Karras switch: the reference is its step run on
    # EulerDiscreteScheduler's Karras table (A1111's and ComfyUI's Euler a on Karras sigmas).
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[config]
    euler = diffusers.EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)
    euler.set_timesteps(steps)
    ref = diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = euler.sigmas.clone(), euler.timesteps.clone()
    noise, x0 = _latents(1), 0.5 * _latents(7)
    timesteps = ref.timesteps
    if strength < 1:
        t_start = steps - int(steps * strength)
        timesteps = timesteps[t_start:]
        ref.set_begin_index(t_start)
        x = ref.add_noise(x0, noise, timesteps[:1])
    else:
        x = noise * ref.init_noise_sigma
    model, g = LinearModel(), torch.Generator().manual_seed(4)
    for t in timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    ours, our_x, sched = _run_ours("euler_a_karras", cfg, steps, noise,
                                   x0 if strength < 1 else None, strength,
                                   torch.Generator().manual_seed(4))
    assert torch.equal(sched.timesteps, timesteps.float())
    for i, ((a, _), (b, t)) in enumerate(zip(ours.calls, model.calls)):
        _assert_close(a, b, f"model input of call {i} (t={t.item()})")
    _assert_close(our_x, x, "final latents")


def test_two_call_layout():
    sched = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "dpm2", 6)
    assert len(sched.timesteps) == 11 and len(sched.sigmas) == 12
    assert (sched.sigmas_in > 0).all() and sched.sigmas_to[-1] == 0
    # Second calls sit at the geometric mean of their step's sigmas.
    steps = sched.sigmas_in[0::2]
    mid = (steps[:-1] * steps[1:]) ** 0.5
    assert torch.allclose(sched.sigmas_in[1::2], mid, rtol=1e-5)
    with pytest.raises(SdrtError, match="cannot run part of its schedule"):
        sched.window(0, 4)
    unipc = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "unipc", 6)
    with pytest.raises(SdrtError, match="unipc cannot run part of its schedule"):
        unipc.window(2, 6)


@pytest.mark.parametrize("sampler", NOISY)
def test_noisy_samplers_predrawn_noise(sampler):
    # The static runtime's pre-drawn noise, in draw order, gives the generator's result
    # (dpmpp_sde: its Brownian increments, one per call but the last).
    sched = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), sampler, 5)
    x = sched.noise_latents(_latents(2))
    brownian = sampler.startswith("dpmpp_sde")
    assert sched.noise_draws == (4 if sampler.startswith("dpm2_a") else 8 if brownian else 5)
    assert sched.second_last_lower == sampler.startswith(("dpmpp_2m", "dpmpp_3m"))
    g = torch.Generator().manual_seed(9)
    noise = (brownian_noise(sched, x.shape, g) if brownian else
             torch.stack([torch.randn(x.shape, generator=g) for _ in range(sched.noise_draws)]))
    a = sample(sampler, LinearModel(), x, sched, generator=torch.Generator().manual_seed(9))
    b = sample(sampler, LinearModel(), x, sched, noise=noise)
    assert torch.equal(a, b), f"pre-drawn noise differs by {(a - b).abs().max().item():.3g}"
    c = sample(sampler, LinearModel(), x, sched, generator=torch.Generator().manual_seed(10))
    assert (a - c).abs().max() > 1e-3, "the noise does not reach the result"


@pytest.mark.parametrize("class_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                        "LCMScheduler", "EulerDiscreteScheduler"])
def test_class_beta_defaults(class_name):
    # A config without its betas takes the sampler class's defaults (Heun's and KDPM2's are
    # SD's 0.00085..0.012, LCM's also scaled_linear), as XScheduler.from_config does.
    diffusers = pytest.importorskip("diffusers")
    sampler = default_sampler(SchedulerConfig.from_dict({"_class_name": class_name}))
    ours = make_schedule(SchedulerConfig.from_dict({"_class_name": class_name}), sampler, 4)
    theirs = getattr(diffusers, class_name)()
    theirs.set_timesteps(4)
    if ours.sigmas is not None:
        assert torch.allclose(ours.sigmas, theirs.sigmas[:len(ours.sigmas)].float(), rtol=1e-6)
    else:
        assert torch.equal(ours.timesteps, theirs.timesteps)
        assert torch.allclose(ours.alphas, theirs.alphas_cumprod[theirs.timesteps], rtol=1e-6)


# --- euler_a ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["sd15", "turbo", "sd21"])
def test_euler_a_matches_diffusers_draws(config):
    # Same seed on both sides: identical noise draws, so identical trajectories.
    _compare("euler_a", CONFIGS[config], 10, gen_seed=5)


def test_euler_a_seeded():
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    sched = make_schedule(cfg, "euler_a", 8)
    x = sched.noise_latents(_latents(2))

    def run(seed):
        return sample("euler_a", LinearModel(), x, sched, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b), f"same seed differs by {(a - b).abs().max().item():.3g}"
    diff = (a - c).abs().max().item()
    assert diff > 1e-3, f"different seeds agree to {diff:.3g}"


def test_ddim_eta_predrawn_noise():
    # DDIM with an eta draws one unit noise a call: pre-drawn, the generator's result; at eta
    # 0 (or another sampler) with_eta changes nothing.
    from sdrt.engine.schedules import with_eta
    base = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "ddim", 4)
    sched = with_eta(base, 0.5)
    assert (sched.eta, sched.noise_draws) == (0.5, 4) and with_eta(base, 0) is base
    euler = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "euler", 4)
    assert with_eta(euler, 0.5) is euler
    x = sched.noise_latents(_latents(2))
    g = torch.Generator().manual_seed(9)
    noise = torch.stack([torch.randn(x.shape, generator=g) for _ in range(4)])
    a = sample("ddim", LinearModel(), x, sched, generator=torch.Generator().manual_seed(9))
    b = sample("ddim", LinearModel(), x, sched, noise=noise)
    assert torch.equal(a, b)
    assert (a - sample("ddim", LinearModel(), x, base)).abs().max() > 1e-3


def test_euler_a_predrawn_noise():
    # The static runtime passes the noise drawn beforehand (no RNG inside a CUDA graph): the same
    # draws, in call order, must give the same result as the generator.
    sched = make_schedule(SchedulerConfig.from_dict(CONFIGS["turbo"]), "euler_a", 4)
    x = sched.noise_latents(_latents(2))
    g = torch.Generator().manual_seed(9)
    noise = torch.stack([torch.randn(x.shape, generator=g) for _ in range(len(sched.timesteps))])
    a = sample("euler_a", LinearModel(), x, sched, generator=torch.Generator().manual_seed(9))
    b = sample("euler_a", LinearModel(), x, sched, noise=noise)
    assert torch.equal(a, b), f"pre-drawn noise differs by {(a - b).abs().max().item():.3g}"
    with pytest.raises(SdrtError, match="expected"):
        sample("euler_a", LinearModel(), x, sched, noise=noise[:2])
    with pytest.raises(SdrtError, match="draws no noise"):
        ddim = make_schedule(SchedulerConfig.from_dict(CONFIGS["turbo"]), "ddim", 4)
        sample("ddim", LinearModel(), x, ddim, noise=noise)


# --- dtype ------------------------------------------------------------------------------------

def test_low_precision_input_keeps_dtype():
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    sched = make_schedule(cfg, "dpmpp_2m", 10)
    x = sched.noise_latents(_latents(3))
    ref = sample("dpmpp_2m", LinearModel(), x, sched)
    model = LinearModel()
    out = sample("dpmpp_2m", model, x.bfloat16(), sched)
    assert out.dtype == torch.bfloat16
    assert all(xi.dtype == torch.bfloat16 for xi, _ in model.calls), "model saw non-bf16 input"
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), f"bf16 run off by {err:.3g}"


# --- config parsing and defaults --------------------------------------------------------------

@pytest.mark.parametrize("class_name,extra,expected", [
    ("PNDMScheduler", {}, "pndm"),
    ("DDIMScheduler", {}, "ddim"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),  # euler honours karras itself
    ("EulerAncestralDiscreteScheduler", {}, "euler_a"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                     "use_karras_sigmas": True}, "dpmpp_2m_sde_karras"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
     "dpmpp_3m_sde"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "use_karras_sigmas": True}, "dpmpp_2m_sde_heun_karras"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun"),  # honours karras itself
    ("KDPM2DiscreteScheduler", {}, "dpm2"),
    ("KDPM2AncestralDiscreteScheduler", {}, "dpm2_a"),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "unipc_karras"),
    ("DEISMultistepScheduler", {"solver_order": 3}, "deis"),
    ("LMSDiscreteScheduler", {}, "lms"),
])
def test_default_sampler(class_name, extra, expected):
    cfg = SchedulerConfig.from_dict({"_class_name": class_name, **_SD_BETAS, **extra})
    assert default_sampler(cfg) == expected


def test_default_sampler_unknown_class_warns():
    cfg = SchedulerConfig.from_dict({"_class_name": "DPMSolverSinglestepScheduler", **_SD_BETAS})
    with pytest.warns(UserWarning, match="DPMSolverSinglestepScheduler"):
        assert default_sampler(cfg) == "dpmpp_2m"


def test_dpmpp_sde_without_torchsde_is_refused_up_front(monkeypatch):
    # Named in the request (one line naming the field, before any work), and as a model's
    # default sampler when its schedule is made.
    import sys

    from sdrt.engine.request import GenerationRequest
    monkeypatch.setitem(sys.modules, "torchsde", None)  # as if it were not installed
    with pytest.raises(SdrtError, match=r"sampler must be a sampler whose package is "
                                        r"installed .*pip install 'sdrt\[sde\]'"):
        GenerationRequest(prompt="a fox", sampler="dpmpp_sde_karras").check()
    with pytest.raises(SdrtError, match=r"^sampler dpmpp_sde draws its Brownian-tree noise with "
                                        r"torchsde: pip install 'sdrt\[sde\]'$"):
        make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "dpmpp_sde", 4)
    GenerationRequest(prompt="a fox", sampler="dpmpp_2m_sde").check()  # needs nothing more


@pytest.mark.parametrize("karras", [False, True])
def test_default_sampler_of_dpm_sde_configs(karras):
    # DPMSolverSDEScheduler configs (A1111's "DPM++ SDE Karras" models ship them) run
    # dpmpp_sde, which reads the config's Karras switch as heun does.
    cfg = SchedulerConfig.from_dict({"_class_name": "DPMSolverSDEScheduler", **_SD_BETAS,
                                     "use_karras_sigmas": karras})
    assert default_sampler(cfg) == "dpmpp_sde"
    sched = make_schedule(cfg, "dpmpp_sde", 6)
    karras_sched = make_schedule(cfg, "dpmpp_sde_karras", 6)
    assert torch.equal(sched.sigmas, karras_sched.sigmas) == karras


@pytest.mark.parametrize("extra,settings", [
    ({"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver'"),
    ({"solver_order": 3, "solver_type": "heun"}, "solver_order=3, solver_type='heun'"),
])
def test_default_sampler_warns_for_other_dpm_variants(extra, settings):
    cfg = SchedulerConfig.from_dict({"_class_name": "DPMSolverMultistepScheduler", **_SD_BETAS,
                                     **extra})
    with pytest.warns(UserWarning, match=f"sets {re.escape(settings)},.*using dpmpp_2m"):
        assert default_sampler(cfg) == "dpmpp_2m"
    # Asked for by name, dpmpp_2m is DPM-Solver++(2M) whatever the config says: no warning,
    # and the same schedule as for the default variant.
    plain = SchedulerConfig.from_dict({"_class_name": "DPMSolverMultistepScheduler", **_SD_BETAS})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, ref = make_schedule(cfg, "dpmpp_2m", 10), make_schedule(plain, "dpmpp_2m", 10)
        assert default_sampler(plain) == "dpmpp_2m"
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_from_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**CONFIGS["sd15"], "_diffusers_version": "0.6.0", "unknown": 1}))
    cfg = SchedulerConfig.from_file(path)
    assert cfg.class_name == "PNDMScheduler" and cfg.steps_offset == 1 and cfg.skip_prk_steps
    assert cfg.timestep_spacing is None, "absent field must stay unset for the class default"
    assert SAMPLERS == ("ddim", "pndm", "euler", "euler_karras", "euler_a", "euler_a_karras",
                        "heun", "heun_karras",
                        "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras", "dpmpp_2s_a",
                        "dpmpp_2s_a_karras", "dpmpp_sde",
                        "dpmpp_sde_karras", "dpmpp_2m",
                        "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
                        "dpmpp_2m_sde_exponential", "dpmpp_2m_sde_heun",
                        "dpmpp_2m_sde_heun_karras", "dpmpp_2m_sde_heun_exponential",
                        "dpmpp_3m_sde", "dpmpp_3m_sde_karras", "dpmpp_3m_sde_exponential", "lms",
                        "lms_karras", "unipc", "unipc_karras", "deis", "deis_karras", "lcm",
                        "restart", "restart_karras", "uni_pc", "uni_pc_karras", "uni_pc_bh2",
                        "uni_pc_bh2_karras", "ipndm", "ipndm_karras", "ipndm_v",
                        "ipndm_v_karras", "gradient_estimation", "gradient_estimation_karras",
                        "comfy_deis", "comfy_deis_karras", "res_multistep",
                        "res_multistep_karras", "res_multistep_a", "res_multistep_a_karras",
                        "ddpm", "ddpm_karras", "er_sde", "er_sde_karras", "cfgpp_euler",
                        "cfgpp_euler_karras", "cfgpp_euler_a", "cfgpp_euler_a_karras",
                        "cfgpp_dpmpp_2m", "cfgpp_dpmpp_2m_karras", "cfgpp_res_multistep",
                        "cfgpp_res_multistep_karras", "cfgpp_res_multistep_a",
                        "cfgpp_res_multistep_a_karras", "cfgpp_gradient_estimation",
                        "cfgpp_gradient_estimation_karras", "dpm_fast", "dpm_fast_karras",
                        "dpm_fast_a", "dpm_fast_a_karras", "heunpp2", "heunpp2_karras",
                        "cfgpp_dpmpp_2s_a", "cfgpp_dpmpp_2s_a_karras", "cfgpp_ddim",
                        "seeds_2", "seeds_2_karras", "seeds_3", "seeds_3_karras", "sa_solver",
                        "sa_solver_karras", "sa_solver_pece", "sa_solver_pece_karras")


@pytest.mark.parametrize("content,match", [
    (None, "cannot read"),                            # missing file
    ("{not json", "cannot read"),                     # malformed JSON
    ("[1, 2]", "JSON object"),                        # valid JSON, wrong shape
    ('{"beta_schedule": "cubic"}', "beta_schedule"),  # unknown choice
    ('{"thresholding": true}', "thresholding"),      # option we do not implement
    ('{"trained_betas": "x"}', "trained_betas"),
    # Each field against its type. A string "false" would be truthy and silently skip PRK.
    ('{"beta_start": "x"}', "beta_start must be a number, got 'x'"),
    ('{"beta_end": true}', "beta_end must be a number"),           # a bool is not a number
    ('{"steps_offset": "1"}', "steps_offset must be an integer"),
    ('{"steps_offset": 1.5}', "steps_offset must be an integer"),
    ('{"num_train_timesteps": true}', "num_train_timesteps must be an integer"),
    ('{"skip_prk_steps": "false"}', "skip_prk_steps must be true or false"),
    ('{"clip_sample": 0}', "clip_sample must be true or false"),   # an int is not a bool
    ('{"timestep_spacing": 1}', "timestep_spacing must be a string"),
    ('{"_class_name": ["DDIMScheduler"]}', "_class_name must be a string"),
    ('{"trained_betas": [0.1, "x"]}', "trained_betas must be a list of numbers"),
    ('{"num_train_timesteps": 10, "trained_betas": [0.1, 0.2]}', "trained_betas has 2 values"),
    ('{"_class_name": "UniPCMultistepScheduler", "solver_order": 0}', "solver_order must be at"),
])
def test_from_file_errors(tmp_path, content, match):
    path = tmp_path / "scheduler_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SdrtError, match=match) as e:
        SchedulerConfig.from_file(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sampler,steps,strength,match", [
    ("dpm_adaptive", 10, 1.0, "unknown sampler.*ddim, pndm"),
    ("ddim", 0, 1.0, "steps"),
    ("ddim", 1001, 1.0, "steps"),     # more steps than training timesteps
    ("euler", 10, 0.0, "strength"),
    ("euler", 10, 1.5, "strength"),
    ("euler", 10, 0.05, "no denoising step"),  # int(10 * 0.05) = 0 steps left
    ("pndm", 10, 1.0, "prediction_type 'sample'"),
    ("euler_a", 10, 1.0, "prediction_type 'sample'"),
    ("euler_a_karras", 10, 1.0, "prediction_type 'sample'"),
    ("dpm2", 10, 1.0, "prediction_type 'sample'"),
    ("dpm2_a_karras", 10, 1.0, "prediction_type 'sample'"),
    ("dpmpp_sde_karras", 10, 1.0, "prediction_type 'sample'"),
])
def test_make_schedule_errors(sampler, steps, strength, match):
    cfg = SchedulerConfig.from_dict({**CONFIGS["sd15"],
                                     **({"prediction_type": "sample"} if "sample" in match else {})})
    with pytest.raises(SdrtError, match=match):
        make_schedule(cfg, sampler, steps, strength)


def test_sample_rejects_other_samplers_schedule():
    sched = make_schedule(SchedulerConfig.from_dict(CONFIGS["sd15"]), "euler", 4)
    with pytest.raises(SdrtError, match="made for sampler euler"):
        sample("ddim", LinearModel(), _latents(0), sched)


# --- DPM++ 2S a, which no diffusers class has --------------------------------------------------

def _dpmpp_2s_ancestral(model, x, sigmas, noises, train):
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, alg. 1 with r = 1/2, each step's landing
    level split into sigma_down and fresh noise of std sigma_up as Euler a splits it), written
    from the algorithm over a table of levels: the step from s to sigma_down takes x0 at s,
    the exponential integrator's half step to sqrt(s sigma_down), x0 there, and the full step
    with it; a step down to 0 is Euler's."""
    from sdrt.engine.schedules import sigma_to_timestep

    def denoise(x, s):  # an epsilon-predicting UNet fed x / sqrt(s^2 + 1) at s's timestep
        t = torch.tensor(sigma_to_timestep(np.array([s]), train), dtype=torch.float32)
        return x - s * model((x / (s**2 + 1) ** 0.5).float(), t.reshape(())).double()

    k = 0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoise(x, s)
        up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        if down == 0:
            x = x0
        else:
            mid = (s * down) ** 0.5
            x0_mid = denoise((mid / s) * x + (1 - mid / s) * x0, mid)
            x = (down / s) * x + (1 - down / s) * x0_mid
        if s_next > 0:
            x = x + noises[k].double() * up
            k += 1
    return x


@pytest.mark.parametrize("sampler,steps", [
    ("dpmpp_2s_a", 1), ("dpmpp_2s_a", 4), ("dpmpp_2s_a", 12), ("dpmpp_2s_a_karras", 1),
    ("dpmpp_2s_a_karras", 12),
    # (one beta step: A1111's level is sigma_max, diffusers' sigma_min)
    ("dpmpp_2s_a_beta", 2), ("dpmpp_2s_a_beta", 12)])
def test_dpmpp_2s_ancestral_matches_the_algorithm(sampler, steps):
    # Its levels are diffusers' Euler's (plain or Karras) or a sigma schedule's; the
    # reference takes them from diffusers and scipy, the noise from the same draws.
    from sdrt.engine.schedules import train_alphas_cumprod
    from sdrt.engine.sigma_schedules import levels
    cfg = CONFIGS["sd15"]
    if sampler.endswith("_beta"):
        pytest.importorskip("scipy")
        sch = _diffusers_scheduler("euler", {**cfg, "use_beta_sigmas": True})
    else:
        sch = _diffusers_scheduler("euler_karras" if sampler.endswith("_karras") else "euler",
                                   cfg)
    sch.set_timesteps(steps)
    table = sch.sigmas.double().tolist()
    ac = train_alphas_cumprod(SchedulerConfig.from_dict(cfg).for_sampler("euler"))
    train = (((1 - ac) / ac) ** 0.5).numpy()
    if sampler.endswith("_beta"):
        assert np.allclose(levels("beta", steps, train), table, rtol=1e-5)
    sched = make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps)
    noise = _latents(2)
    draws = (torch.stack([_latents(10 + k) for k in range(sched.noise_draws)])
             if sched.noise_draws else torch.zeros(0, *noise.shape))
    x = sched.noise_latents(noise)
    ours = sample(sampler, LinearModel(), x, sched, noise=draws)
    ref = _dpmpp_2s_ancestral(LinearModel(), x.double(), table, draws, train)
    _assert_close(ours, ref, f"{sampler}, {steps} steps: final latents", rtol=1e-4)


# --- Restart, which no diffusers class has -----------------------------------------------------

def _restart(model, x, levels, noises, train):
    """Restart sampling as A1111 runs it (Xu et al. 2023), written from its description: Heun
    steps along the levels (Euler's for a step to 0); from 20 steps the levels are Karras'
    over the table's range, less the restart steps, and where they reach sigma 0.1 the
    latents are noised back up to sigma 2 and brought down again over Karras levels, once (9
    steps) or, from 36 steps, twice (steps // 4 each). The noise before step j is sdrt's
    draw j - 1 (one per step but the last)."""
    from sdrt.engine.schedules import karras_sigmas, sigma_to_timestep

    def denoise(x, s):
        t = torch.tensor(sigma_to_timestep(np.array([s]), train), dtype=torch.float32)
        return x - s * model((x / (s**2 + 1) ** 0.5).float(), t.reshape(())).double()

    def heun(x, s, s_next):
        d = (x - denoise(x, s)) / s
        if s_next == 0:
            return x + d * (s_next - s)
        trial = x + d * (s_next - s)
        return x + (d + (trial - denoise(trial, s_next)) / s_next) / 2 * (s_next - s)

    n = len(levels) - 1
    steps = list(zip(levels[:-1], levels[1:]))
    if n >= 20:
        k, times = (n // 4, 2) if n >= 36 else (9, 1)
        levels = list(karras_sigmas(levels[-2], levels[0], n - k * times)) + [0.0]
        steps = list(zip(levels[:-1], levels[1:]))
        low = int(np.argmin([abs(s - 0.1) for s in levels]))
        high = int(np.argmin([abs(s - 2.0) for s in levels]))
        if high < low:
            again = karras_sigmas(levels[low], levels[high], k + 1)
            steps = steps[:low] + list(zip(again[:-1], again[1:])) * times + steps[low:]
    last = steps[0][0]
    for j, (s, s_next) in enumerate(steps):
        if s > last:
            x = x + noises[j - 1].double() * (s**2 - last**2) ** 0.5
        x = heun(x, s, s_next)
        last = s_next
    return x


@pytest.mark.parametrize("sampler,steps,strength", [
    ("restart_karras", 8, 1.0),  # under 20 steps: Heun along the table
    ("restart_karras", 20, 1.0),  # one restart of 9 steps
    ("restart", 40, 1.0),  # two of 10
    ("restart_karras", 30, 0.7),  # image to image: the rest of the table, 21 steps, restarted
    # SGM Uniform's lowest level is nearer 0 than 0.1: the restart follows the step to 0
    ("restart_sgm_uniform", 20, 1.0),
])
def test_restart_matches_the_algorithm(sampler, steps, strength):
    from sdrt.engine.schedules import train_alphas_cumprod
    from sdrt.engine.sigma_schedules import levels
    cfg = CONFIGS["sd15"]
    keep = int(steps * strength)
    ac = train_alphas_cumprod(SchedulerConfig.from_dict(cfg).for_sampler("euler"))
    train = (((1 - ac) / ac) ** 0.5).numpy()
    if sampler.endswith("_sgm_uniform"):
        table = levels("sgm_uniform", steps, train).tolist()
    else:
        sch = _diffusers_scheduler("euler_karras" if sampler.endswith("_karras") else "euler",
                                   cfg)
        sch.set_timesteps(steps)
        table = sch.sigmas.double().tolist()
    table = table[steps - keep:]
    sched = make_schedule(SchedulerConfig.from_dict(cfg), sampler, steps, strength)
    draws = torch.stack([_latents(10 + k) for k in range(sched.noise_draws)])
    x = _latents(2) * table[0]
    ours = sample(sampler, LinearModel(), x, sched, noise=draws)
    ref = _restart(LinearModel(), x.double(), table, draws, train)
    _assert_close(ours, ref, f"{sampler}, {steps} steps: final latents", rtol=1e-4)
    assert (sched.sigmas_up > 0).sum() == (0 if steps < 20 else 1 if keep < 36 else 2)
