"""Sigma schedules (sampler "X_S"): the tables against A1111's, ComfyUI's and diffusers' ways of
computing them, and every sampler that steps along noise levels run along each.

The references here are written from each tool's definition in torch, float32, the way those
tools compute them (k-diffusion's discrete-time wrapper interpolates log sigma between
training levels); sdrt builds its tables in float64 from the same float32 training levels:
rtol 1e-5. Where diffusers has the schedule (beta, exponential, and Euler along any table),
diffusers is the reference.
"""
import math

import numpy as np
import pytest
import torch
from test_samplers import LinearModel, _assert_close, _diffusers_scheduler, _latents

from sdrt.engine import comfy
from sdrt.engine.errors import SdrtError
from sdrt.engine.families import AYS_SD15, AYS_SDXL, SD1, SDXL
from sdrt.engine.infotext import (Infotext, parse, sampler_id, sampler_label, schedule_kind,
                                  written_schedule)
from sdrt.engine.request import (SAMPLER_NAMES, SIGMA_SAMPLERS, SIGMA_SCHEDULES,
                                 GenerationRequest, Limits, split_sampler)
from sdrt.engine.samplers import SchedulerConfig, make_schedule, sample
from sdrt.engine.schedules import train_alphas_cumprod
from sdrt.engine.sigma_schedules import levels, log_interp

SD15 = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "skip_prk_steps": True, "clip_sample": False, "set_alpha_to_one": False}
CONFIGS = {
    "sd15": SD15,
    # plain linear betas: another range of levels (sigma_max 157)
    "linear": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
               "beta_schedule": "linear"},
}
# 1: the one-step edge; 10, 11: Align Your Steps interpolated and as published; 7, 37: strides
# that do not divide 1000 (ddim_uniform then takes more levels than steps)
STEPS = [1, 2, 7, 10, 11, 37]


def _train(config):
    ac = train_alphas_cumprod(SchedulerConfig.from_dict(config).for_sampler("euler"))
    return ((1 - ac) / ac) ** 0.5  # float32, ascending


def _t_to_sigma(t, train):
    """k-diffusion's DiscreteSchedule.t_to_sigma."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * train.log()[low] + w * train.log()[high]).exp()


# ComfyUI's NOISE_LEVELS of its AlignYourStepsScheduler
COMFY_AYS_LEVELS = {
    "comfy_ays_sd1": np.array([14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520,
                               1.8841921177, 1.3943805092, 0.9642583904, 0.6523686016,
                               0.3977456272, 0.1515232662, 0.0291671582]),
    "comfy_ays_sdxl": np.array([14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769,
                                1.3405244945, 0.8620721141, 0.5550693289, 0.3798540708,
                                0.2332364134, 0.1114188177, 0.0291671582])}


def _reference(schedule, n, train, table=AYS_SD15):
    """Schedule ``schedule``'s levels as A1111 (or, comfy_*, ComfyUI) computes them."""
    from scipy import stats
    lo, hi, big_t = float(train[0]), float(train[-1]), len(train)
    zero = torch.zeros(1)
    if schedule == "exponential":
        return torch.cat([torch.linspace(math.log(hi), math.log(lo), n).exp(), zero])
    if schedule == "normal":
        return torch.cat([_t_to_sigma(torch.linspace(big_t - 1, 0, n), train), zero])
    if schedule == "sgm_uniform":
        return torch.cat([_t_to_sigma(torch.linspace(big_t - 1, 0, n + 1)[:-1], train), zero])
    if schedule == "simple":
        step = big_t / n
        return torch.tensor([float(train[-(1 + int(x * step))]) for x in range(n)] + [0.0])
    if schedule == "ddim_uniform":
        out, step, x = [], max(big_t // n, 1), 1
        while x < big_t:
            out.append(float(train[x]))
            x += step
        return torch.tensor(out[::-1] + [0.0])
    if schedule == "beta":
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.tensor([lo + x * (hi - lo) for x in ts] + [0.0])
    if schedule == "comfy_beta":
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6)
                     * (big_t - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(float(train[int(t)]))
            last = t
        return torch.tensor(out + [0.0])
    if schedule == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * math.atan(lo) + (1.0 - i / n) * math.atan(hi))
    if schedule == "comfy_kl_optimal":
        i = torch.arange(n, dtype=torch.float).div_(max(n - 1, 1))
        return torch.cat([(i * math.atan(lo) + (1 - i) * math.atan(hi)).tan(), zero])
    if schedule == "linear_quadratic":  # ComfyUI's (Genmo's Mochi), in Python floats
        if n == 1:
            return torch.tensor([hi, 0.0])
        lin, threshold = n // 2, 0.025
        gap, quad = lin - threshold * n, n - lin
        qc = gap / (lin * quad ** 2)
        lc = threshold / lin - 2 * gap / (quad ** 2)
        fraction = ([i * threshold / lin for i in range(lin)]
                    + [qc * i ** 2 + lc * i + qc * lin ** 2 for i in range(lin, n)] + [1.0])
        return torch.tensor([1.0 - f for f in fraction]) * hi
    if schedule.startswith("comfy_ays"):  # ComfyUI's AlignYourStepsScheduler, denoise 1
        levels_ = COMFY_AYS_LEVELS[schedule]
        if n + 1 != len(levels_):
            xs = np.linspace(0, 1, len(levels_))
            levels_ = np.exp(np.interp(np.linspace(0, 1, n + 1), xs,
                                       np.log(levels_[::-1])))[::-1]
        return torch.tensor(list(levels_[:-1]) + [0.0])
    assert schedule == "align_your_steps"
    if n == len(table):
        return torch.tensor(list(table) + [0.0])
    if n == 1:
        return torch.tensor([table[0], 0.0])
    xs, ys = np.linspace(0, 1, len(table)), np.log(np.array(table)[::-1])
    return torch.tensor(np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1], 0.0))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES)
def test_levels_match_the_tools(schedule, config, steps):
    train = _train(CONFIGS[config])
    ours = levels(schedule, steps, train.numpy(), AYS_SD15)
    ref = _reference(schedule, steps, train).double()
    assert ours.shape == tuple(ref.shape), f"{len(ours)} levels, the reference has {len(ref)}"
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [2, 10, 25])
@pytest.mark.parametrize("schedule", ["beta", "exponential"])
def test_levels_match_diffusers(schedule, steps):
    # diffusers' use_beta_sigmas / use_exponential_sigmas, on its Euler's linspace grid
    # (whose levels run from the first training level to the last, as sdrt's range).
    pytest.importorskip("scipy")
    sch = _diffusers_scheduler("euler", {**SD15, f"use_{schedule}_sigmas": True})
    sch.set_timesteps(steps)
    ours = levels(schedule, steps, _train(SD15).numpy())
    np.testing.assert_allclose(ours, sch.sigmas.double().numpy(), rtol=1e-5, atol=0)


def test_align_your_steps_as_published_for_each_family():
    train = _train(SD15).numpy()
    for family, table in ((SD1, AYS_SD15), (SDXL, AYS_SDXL)):
        assert family.align_your_steps == table
        sched = make_schedule(SchedulerConfig.from_dict(SD15), "euler_align_your_steps",
                              len(table), align_your_steps=family.align_your_steps)
        assert sched.sigmas.tolist() == pytest.approx(list(table) + [0.0], rel=1e-6)
    assert AYS_SD15 != AYS_SDXL
    with pytest.raises(SdrtError, match="align_your_steps needs"):
        levels("align_your_steps", 10, train, ())


@pytest.mark.parametrize("steps", [1, 4, 13])
@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES)
def test_euler_along_a_schedule_matches_diffusers_euler_along_its_sigmas(schedule, steps):
    # diffusers' EulerDiscreteScheduler.set_timesteps(sigmas=...) runs any table: given the
    # reference levels, it must call the model at the same timesteps and land where sdrt does.
    pytest.importorskip("scipy")
    ref_levels = _reference(schedule, steps, _train(SD15))
    sch = _diffusers_scheduler("euler", SD15)
    sch.set_timesteps(sigmas=ref_levels.tolist())
    noise = _latents(3)
    ref_model, x = LinearModel(), noise * ref_levels[0]
    for t in sch.timesteps:
        x = sch.step(ref_model(sch.scale_model_input(x, t), t), t, x).prev_sample
    sched = make_schedule(SchedulerConfig.from_dict(SD15), f"euler_{schedule}", steps,
                          align_your_steps=AYS_SD15)
    model = LinearModel()
    ours = sample(f"euler_{schedule}", model, sched.noise_latents(noise), sched)
    our_t = torch.stack([t for _, t in model.calls])
    ref_t = torch.stack([t for _, t in ref_model.calls])
    torch.testing.assert_close(our_t, ref_t.to(our_t.dtype), rtol=1e-5, atol=1e-3)
    _assert_close(ours, x, "final latents", rtol=1e-4)


def _perfect_denoiser(x0, train):
    """A model that knows the clean latents: the noise that takes x0 to its input at the
    level of its timestep (``log_interp``, the inverse of the schedules' timesteps). For a
    CFG++ sampler its unconditional prediction is the same."""
    def model(x, t, uncond=False):
        s = torch.from_numpy(log_interp(t.double().numpy().reshape(-1), train))
        s = s.reshape(-1, 1, 1, 1)
        alpha = 1 / (s**2 + 1) ** 0.5
        out = ((x.double() - alpha * x0) / (s * alpha)).to(x.dtype)
        return (out, out) if uncond else out
    return model


# An Align Your Steps table within the training levels (the published ones end below the
# first, where the perfect denoiser below cannot follow: the UNet there sees timestep 0)
_IN_RANGE = (14.0, 5.0, 1.2, 0.3, 0.05)


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (3, 1.0), (20, 1.0), (3, 0.6),
                                            (20, 0.6)])
@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_every_sampler_along_every_schedule_reaches_the_clean_latents(sampler, steps, strength):
    # With the clean latents known exactly, every solver's step along the probability-flow
    # ODE (or, ancestral and SDE samplers, its noise removed again) is exact: a run ending at
    # 0 returns x0, one ending at sigma_min (A1111's KL Optimal) the ODE's point there,
    # x0 + sigma_min (x_T - x0) / sigma_T, for the deterministic samplers (within float32's
    # rounding of a step from sigma_max, magnified by a slope taken at sigma_min; ComfyUI's
    # UniPC, which stops at 0.001, the ODE's point there). Wrong
    # timesteps, levels or coefficients move it. (LMS's image to image counts its order from
    # the schedule's start, as diffusers' does: its first steps lack slopes, and are not exact.)
    train = _train(SD15).numpy()
    x0 = (-0.3 + torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))).double()
    model = _perfect_denoiser(x0, train)
    cfg = SchedulerConfig.from_dict(SD15)
    for schedule in SIGMA_SCHEDULES:
        sid = f"{sampler}_{schedule}"
        if sid in SAMPLER_NAMES or (sampler == "lms" and strength < 1):
            continue  # (diffusers' exponential DPM-Solvers: test_samplers)
        sched = make_schedule(cfg, sid, steps, strength, align_your_steps=_IN_RANGE)
        noise = _latents(6)
        x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(x0.float(), noise)
        out = sample(sid, model, x, sched, generator=torch.Generator().manual_seed(1)).double()
        assert torch.isfinite(out).all(), sid
        last = float(sched.sigmas[-1])
        positive = sched.sigmas[sched.sigmas > 0]
        if (positive < train[0] * (1 - 1e-6)).any():
            continue  # below the training levels (a restart down to 0): the UNet sees t = 0
        if last == 0 and sampler.startswith("uni_pc"):
            # ComfyUI's UniPC stops at sigma 0.001: the ODE's point there, the noise read off
            # the variance-preserving start x = (x0 + sigma eps) / sqrt(sigma^2 + 1)
            top = float(sched.sigmas[0])
            expected = x0 + 0.001 * (x.double() * (1 + top ** 2) ** 0.5 - x0) / top
            err = (out - expected).abs().max().item()
            assert err <= 1e-4, f"{sid}, {steps} steps: {err:.3g} from the ODE at 0.001"
        elif last == 0:
            # (float32 latents of the size of the level the last step leaves, magnified by a
            # multistep's weights: linear_quadratic's few steps end far above sigma 1)
            tol = 1e-4 * max(1.0, float(positive[-1]))
            err = (out - x0).abs().max().item()
            assert err <= tol, f"{sid}, {steps} steps: {err:.3g} from x0"
        elif sampler in ("euler", "heun", "dpm2", "lms") and strength == 1:
            top = float(sched.sigmas[0])
            expected = x0 + last * (x.double() - x0) / top
            err = (out - expected).abs().max().item()
            assert err <= 2e-3, f"{sid}, {steps} steps: {err:.3g} from the ODE at {last:.4g}"


def test_call_layouts():
    cfg = SchedulerConfig.from_dict(SD15)
    calls = lambda sid, n=7: len(make_schedule(cfg, sid, n, align_your_steps=AYS_SD15).timesteps)
    assert calls("euler_normal") == 7
    assert calls("euler_ddim_uniform") == 8  # 1000 // 7 = 142 apart from timestep 1: 8 levels
    assert calls("heun_normal") == 13  # two calls a step, the last (to 0) one
    assert calls("heun_kl_optimal") == 14  # ... but A1111's KL Optimal ends on sigma_min
    assert calls("dpmpp_sde_kl_optimal") == 14
    assert calls("dpm2_a_kl_optimal") == 14
    assert calls("euler_comfy_beta", 200) < 200  # ComfyUI drops a repeated timestep
    sched = make_schedule(cfg, "heun_kl_optimal", 7)
    assert float(sched.sigmas_to[-1]) == pytest.approx(float(_train(SD15)[0]), rel=1e-6)
    # image to image skips whole steps of the table it runs
    assert len(make_schedule(cfg, "heun_kl_optimal", 10, 0.5).timesteps) == 10
    assert len(make_schedule(cfg, "euler_ddim_uniform", 7, 0.5).timesteps) == 4


def test_sampler_names():
    assert split_sampler("euler_beta") == ("euler", "beta")
    assert split_sampler("dpmpp_2m_sde_heun_comfy_kl_optimal") == ("dpmpp_2m_sde_heun",
                                                                     "comfy_kl_optimal")
    # diffusers' exponential variant stays itself; others take the sigma schedule
    assert split_sampler("dpmpp_2m_sde_exponential") == ("dpmpp_2m_sde_exponential", None)
    assert split_sampler("dpmpp_2m_exponential") == ("dpmpp_2m", "exponential")
    for name in ("ddim_beta", "lcm_normal", "euler_karras_beta", "euler_", "euler_bogus", None, 3):
        assert split_sampler(name) is None, name
    assert not set(SIGMA_SAMPLERS) - set(SAMPLER_NAMES)


@pytest.mark.parametrize("sampler,match", [
    ("ddim_beta", "unknown sampler 'ddim_beta'; choose one of ddim"),
    ("euler_karras_normal", "unknown sampler"),
])
def test_make_schedule_refuses(sampler, match):
    with pytest.raises(SdrtError, match=match):
        make_schedule(SchedulerConfig.from_dict(SD15), sampler, 10)


def test_edm_models_refuse_sigma_schedules():
    edm = SchedulerConfig.from_dict({"_class_name": "EDMDPMSolverMultistepScheduler",
                                     "prediction_type": "v_prediction"})
    with pytest.raises(SdrtError, match="does not run an EDM model"):
        make_schedule(edm, "euler_sgm_uniform", 10)


def test_request_checks_the_sampler():
    GenerationRequest(prompt="x", sampler="dpmpp_2m_align_your_steps").check(limits=Limits())
    with pytest.raises(SdrtError, match=r"^sampler must be one of .*X_S for X one of euler, "
                                        r".* got 'pndm_beta'$"):
        GenerationRequest(prompt="x", sampler="pndm_beta").check(limits=Limits())


def test_beta_schedules_without_scipy_are_refused_up_front(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if it were not installed
    for sampler in ("euler_beta", "dpmpp_2m_comfy_beta"):
        with pytest.raises(SdrtError, match=r"^sampler must be a sampler whose package is "
                                            r"installed \(\w+ takes the beta distribution's "
                                            r"quantiles from scipy: pip install "
                                            r"'sdrt\[schedules\]'\), got"):
            GenerationRequest(prompt="x", sampler=sampler).check(limits=Limits())
        with pytest.raises(SdrtError, match="quantiles from scipy"):
            make_schedule(SchedulerConfig.from_dict(SD15), sampler, 4)
    GenerationRequest(prompt="x", sampler="euler_kl_optimal").check(limits=Limits())


@pytest.mark.parametrize("label,schedule_type,expected", [
    ("Euler", "Beta", "euler_beta"),
    ("DPM++ 2M", "SGM Uniform", "dpmpp_2m_sgm_uniform"),
    ("DPM++ 2M", "sgm_uniform", "dpmpp_2m_sgm_uniform"),  # the API's name
    ("DPM++ 2M", "SGMUniform", "dpmpp_2m_sgm_uniform"),  # A1111's alias
    ("Euler a", "Polyexponential", "euler_a_exponential"),  # rho 1: the same levels
    ("DPM++ 2M SDE", "Exponential", "dpmpp_2m_sde_exponential"),  # diffusers' variant
    ("UniPC", "DDIM", "unipc_ddim_uniform"),
    ("Heun", "KL Optimal", "heun_kl_optimal"),
    ("LMS", "Align Your Steps", "lms_align_your_steps"),
    ("DPM++ SDE", "simple", "dpmpp_sde_simple"),
    ("DEIS", "Normal", "deis_normal"),
    ("euler", "comfy_beta", "euler_comfy_beta"),  # sdrt's names for ComfyUI's
    ("euler_beta", None, "euler_beta"),  # an sdrt id as it is
    ("euler_beta", "Uniform", "euler"),
    ("euler_beta", "Beta", "euler_beta"),
    ("euler_beta", "Karras", None),
    ("Euler Karras", "Beta", None),
    ("DDIM", "Beta", None),  # DDIM, PLMS and LCM step along their own grids
    ("LCM", "Simple", None),
    ("Euler", "Karras Exponential", None),  # A1111's newest, not in sdrt
    # a schedule type's label at the end of the sampler's, as A1111 reads "X Karras"
    ("DPM++ 2M SGM Uniform", None, "dpmpp_2m_sgm_uniform"),
    ("Euler a Align Your Steps", "Automatic", "euler_a_align_your_steps"),
    ("DDIM Beta", None, None), ("Euler Bogus", None, None),
])
def test_a1111_schedule_types(label, schedule_type, expected):
    assert sampler_id(label, schedule_type) == expected


def test_infotext_round_trip():
    for sid in ("dpmpp_2m_align_your_steps", "euler_a_sgm_uniform", "heun_ddim_uniform",
                "euler_comfy_beta", "dpmpp_3m_sde_exponential", "dpmpp_2m_exponential"):
        info = Infotext(prompt="a", negative_prompt="", steps=20, sampler=sid, cfg_scale=7.0,
                        seed=1, width=64, height=64)
        _, _, pairs = parse(str(info))
        assert pairs["Sampler"] == sampler_label(sid)
        assert sampler_id(pairs["Sampler"], pairs.get("Schedule type")) == sid, pairs
    info = Infotext(prompt="a", negative_prompt="", steps=20, sampler="dpmpp_2m_beta",
                    cfg_scale=7.0, seed=1, width=64, height=64)
    assert "Sampler: DPM++ 2M, Schedule type: Beta," in str(info)
    assert written_schedule("euler_normal") == "Normal"
    assert written_schedule("euler") is None and written_schedule("dpmpp_2m") == "Uniform"
    assert schedule_kind("Karras Exponential") is None


@pytest.mark.parametrize("pair,expected", [
    (("euler", "normal"), "euler_normal"), (("euler", "simple"), "euler_simple"),
    (("euler_ancestral", "sgm_uniform"), "euler_a_sgm_uniform"),
    (("dpmpp_2m", "beta"), "dpmpp_2m_comfy_beta"),
    (("uni_pc_bh2", "kl_optimal"), "uni_pc_bh2_comfy_kl_optimal"),
    (("dpmpp_2m_sde_gpu", "exponential"), "dpmpp_2m_sde_exponential"),
    (("euler", "exponential"), "euler_exponential"),
    (("ddim", "ddim_uniform"), "euler_ddim_uniform"),  # ComfyUI's ddim is Euler
    (("ddim", "karras"), "euler_karras"),
    (("lcm", "normal"), "lcm"),
    (("dpm_2", "karras"), "dpm2_karras"),
    # ComfyUI's own samplers (tests/test_comfy_samplers.py), its deis not diffusers'
    (("deis", "karras"), "comfy_deis_karras"), (("deis", "simple"), "comfy_deis_simple"),
    (("res_multistep_ancestral", "karras"), "res_multistep_a_karras"),
    (("ddpm", "beta"), "ddpm_comfy_beta"), (("er_sde", "normal"), "er_sde_normal"),
    (("ipndm_v", "kl_optimal"), "ipndm_v_comfy_kl_optimal"),
    (("gradient_estimation", "sgm_uniform"), "gradient_estimation_sgm_uniform"),
])
def test_comfy_schedulers(pair, expected):
    assert comfy.SAMPLERS[pair] == expected
    assert ("lcm", "karras") not in comfy.SAMPLERS
