"""Samplers: the denoising loops, as plain functions over a model, latents and a ``Schedule``.

Each one reproduces a diffusers scheduler step by step (``schedules.SAMPLER_CLASSES``); those
that step along noise levels also run along A1111's and ComfyUI's other schedules (sampler
"X_S", ``sigma_schedules``).
``model(x, t)`` returns the raw UNet output for input ``x`` at timestep ``t``: the noise, the
velocity or the clean latents, as the config's ``prediction_type`` says. The ``sample_*`` loops
work in float32; ``sample`` casts at the boundary. Per-step numbers come from the schedule's
tensors, so on a GPU nothing in a loop waits on the host.
"""
import math
import warnings

import torch

from .comfy_samplers import NOISY, SLOPE_HISTORY, SLOPE_WEIGHTS, STAGES, X0_WEIGHTS
from .errors import SdrtError
from .request import A1111_CFG_PP_DIVISOR, CFG_PP_PREFIX, sampler_family, split_sampler
from .schedules import (EDM_CLASSES, EXPONENTIAL, KARRAS_OFF, KARRAS_SAMPLERS, SAMPLER_CLASSES,
                        SAMPLERS, TWO_CALL_SAMPLERS, Schedule, SchedulerConfig, make_schedule,
                        vp_alpha_sigma)

__all__ = ["SAMPLERS", "Schedule", "SchedulerConfig", "default_sampler", "make_schedule", "sample",
           "sample_ddim", "sample_pndm", "sample_euler", "sample_euler_ancestral",
           "sample_two_call", "sample_dpmpp_2m", "sample_lms", "sample_unipc", "sample_deis",
           "sample_lcm", "sample_x0_multistep", "sample_stages", "sample_sa_solver",
           "switch_after"]


# --- model output conversions ---------------------------------------------------------------

def _x0_and_eps(out, x, alpha_bar, prediction_type):
    """(clean latents, noise) from a model output, for x = sqrt(a) x0 + sqrt(1 - a) eps."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (x - b * out) / a, out
    if prediction_type == "v_prediction":  # v = a eps - b x0 (Salimans & Ho 2022)
        return a * x - b * out, a * out + b * x
    return out, (x - a * out) / b


def _x0_ve(out, x, sigma, prediction_type):
    """Clean latents from a model output, for variance-exploding x = x0 + sigma eps (the UNet saw
    x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


def _denoised(model, x, t, sigma, sched, uncond=False):
    """The clean latents predicted from variance-exploding latents x = x0 + sigma eps. A model
    trained on alpha-bars sees x / sqrt(sigma^2 + 1) (``_x0_ve``); an EDM model (the schedule
    has a ``sigma_data``) sees c_in x and its output F gives c_skip x + c_out F, EDM's
    preconditioning (Karras et al. 2022, table 1; c_out negated for v_prediction, as
    diffusers' EDM schedulers). ``uncond``: (the guided ones, the unconditional half's)."""
    if sched.sigma_data is None:
        kind = sched.config.prediction_type
        if uncond:
            out, negative = model(x / (sigma**2 + 1) ** 0.5, t, uncond=True)
            return _x0_ve(out, x, sigma, kind), _x0_ve(negative, x, sigma, kind)
        out = model(x / (sigma**2 + 1) ** 0.5, t)
        return _x0_ve(out, x, sigma, kind)
    var = sigma**2 + sched.sigma_data**2
    out = model(x / var**0.5, t)
    c_out = sigma * sched.sigma_data / var**0.5
    if sched.config.prediction_type == "v_prediction":
        c_out = -c_out
    return sched.sigma_data**2 / var * x + c_out * out


def _after_step(step_end, i, t, x):
    """``step_end(i, t, x)`` after step ``i``; a tensor it returns replaces the latents."""
    replaced = step_end(i, t, x)
    return x if replaced is None else replaced


# --- samplers --------------------------------------------------------------------------------

def sample_ddim(model, x, sched: Schedule, step_end=None, generator=None, noise=None):
    """Deterministic DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12, eta = 0).

    Each step predicts x0 and the noise at alpha-bar a, then re-noises x0 to the next alpha-bar
    along that same noise. With clip_sample, x0 is clamped but the noise is not recomputed from it
    (diffusers' default use_clipped_model_output=False).

    cfgpp_ddim, A1111's "DDIM CFG++" (Chung et al. 2024, "CFG++: Manifold-constrained
    Classifier Free Guidance"; A1111's ``ddim_cfgpp``, eta 0): x0 from the prediction guided
    at the scale divided by ``A1111_CFG_PP_DIVISOR`` (A1111's mapping of its CFG scale onto
    CFG++'s lambda), renoised along the unconditional prediction's noise.

    ``sched.eta`` above 0 (``schedules.with_eta``): diffusers' DDIM with noise (eq. 12 at
    eta): sigma_t = eta · sqrt((1 − a_prev)/(1 − a) · (1 − a/a_prev)), the direction to x_t
    shortened to sqrt(1 − a_prev − sigma_t²), and sigma_t of fresh unit noise added (drawn
    from ``generator`` as diffusers' step draws it, or ``noise[i]``).
    """
    cfg = sched.config
    cfg_pp = sched.sampler == "cfgpp_ddim"
    for i, t in enumerate(sched.timesteps):
        a, a_prev = sched.alphas[i], sched.alphas_prev[i]
        if cfg_pp:
            guided, uncond = model(x, t, uncond=True)
            x0, _ = _x0_and_eps(uncond + (guided - uncond) / A1111_CFG_PP_DIVISOR, x, a,
                                cfg.prediction_type)
            _, eps = _x0_and_eps(uncond, x, a, cfg.prediction_type)
        else:
            x0, eps = _x0_and_eps(model(x, t), x, a, cfg.prediction_type)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        if sched.eta:
            std = sched.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            z = _randn(x, generator) if noise is None else noise[i].to(x.dtype)
            x = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps + std * z
        else:
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def _pndm_transfer(x, eps, a, a_prev):
    """PNDM's transfer from alpha-bar a to a_prev for a noise estimate (Liu et al. 2022, eq. 11)."""
    denom = a * (1 - a_prev).sqrt() + (a * (1 - a) * a_prev).sqrt()
    return (a_prev / a).sqrt() * x - (a_prev - a) * eps / denom


def _adams_bashforth(history):
    """Linear multistep extrapolation of the noise from the last 1-4 estimates (oldest first)."""
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / 2
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
    return (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24


def sample_pndm(model, x, sched: Schedule, step_end=None):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods
    for Diffusion Models on Manifolds"), with its pseudo Runge-Kutta (PRK) warm-up when the config
    has skip_prk_steps=false.

    Every step is the transfer of eq. 11 driven by a combined noise estimate. PRK: 4 calls per step
    (RK4 weights 1/6, 1/3, 1/3, 1/6), each intermediate call's input transferred from the step's
    start. PLMS: one call per step, extrapolated 4th-order Adams-Bashforth over past estimates
    (lower orders while fewer are known); without PRK its first step is taken twice, the second
    time with the mean of the first two estimates. The schedule lists the alpha-bars each call
    moves between.
    """
    kind = sched.config.prediction_type
    history = []  # noise estimates PLMS extrapolates from, oldest first
    step_start = x  # where the current RK step, or the redone first PLMS step, started from
    rk_sum = 0
    for i, t in enumerate(sched.timesteps):
        a, a_prev = sched.alphas[i], sched.alphas_prev[i]
        out = model(x, t)
        if i < sched.prk_calls:
            stage = i % 4
            if stage == 0:
                step_start = x
                history.append(out)
            if stage < 3:
                rk_sum = rk_sum + (1 / 6 if stage == 0 else 1 / 3) * out
            else:
                out, rk_sum = rk_sum + out / 6, 0
            x_from = step_start
        elif i == 1:
            out, x_from = (out + history[-1]) / 2, step_start
        else:
            history = history[-3:] + [out]
            out, x_from = _adams_bashforth(history), x
        # The multistep combination is of raw outputs; v becomes noise only now, with the sample
        # the transfer starts from.
        eps = out if kind == "epsilon" else a.sqrt() * out + (1 - a).sqrt() * x_from
        x = _pndm_transfer(x_from, eps, a, a_prev)
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_euler(model, x, sched: Schedule, step_end=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022,
    "Elucidating the Design Space of Diffusion-Based Generative Models", alg. 2 without churn)."""
    for i, t in enumerate(sched.timesteps):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        x0 = _denoised(model, x, t, sigma, sched)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def _randn(x, generator):
    """Unit noise shaped like x, drawn on the generator's device (as diffusers' randn_tensor does,
    so a CPU generator gives the same draws whatever device x is on); with a list of
    generators, row i from generator i."""
    if isinstance(generator, list):
        return torch.cat([_randn(x[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def sample_euler_ancestral(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """Euler ancestral (Karras et al. 2022 / k-diffusion's sample_euler_ancestral): an Euler step
    down to sigma_down, then fresh noise of std sigma_up, so that sigma_down^2 + sigma_up^2 is the
    next sigma^2 and the step follows the reverse SDE rather than the ODE.

    The noise is drawn from ``generator``, or taken from ``noise`` (N, *x.shape), unit noise drawn
    beforehand so a captured CUDA graph holds no RNG call.
    """
    for i, t in enumerate(sched.timesteps):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        x0 = _denoised(model, x, t, sigma, sched)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        # Drawn on the last step too (where sigma_up = 0) so the draws line up with diffusers'.
        z = _randn(x, generator) if noise is None else noise[i].to(x.dtype)
        x = x + z * sigma_up
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_two_call(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """Heun's method (heun*: Karras et al. 2022, alg. 1 without churn), DPM-Solver-2 (dpm2*:
    Lu et al. 2022, "DPM-Solver", alg. 1 with r = 1/2 in log sigma; k-diffusion's
    sample_dpm_2) and its ancestral form (dpm2_a*), as diffusers' HeunDiscreteScheduler and
    KDPM2(Ancestral)DiscreteScheduler run them: two model calls a step, the last step one;
    and DPM-Solver++(2S) ancestral (dpmpp_2s_a*: Lu et al. 2022, "DPM-Solver++", alg. 1 with
    r = 1/2; k-diffusion's sample_dpmpp_2s_ancestral), which no diffusers class has, on
    DPM2 a's calls.

    A step's first call takes an Euler step from x at sigma to a trial point; its second,
    there, redoes the step from x with the mean of both slopes (Heun) or with the trial
    point's slope (DPM2), to the next sigma, or for dpm2_a to sigma_down and then fresh
    noise of std sigma_up (drawn from ``generator``, or taken from ``noise``: one unit-noise
    tensor per second call). DPM++ 2S a's second call steps x from sigma to sigma_down
    along the exponential integrator with the midpoint's x0: x' = (sigma_down / sigma) x +
    (1 - sigma_down / sigma) x0_mid, the Euler step from x with the slope (x - x0_mid) / sigma;
    then its noise, as DPM2 a's. cfgpp_dpmpp_2s_a* (ComfyUI's dpmpp_2s_ancestral_cfg_pp)
    takes DPM++ 2S a's steps on the unconditional x0 of each call, then adds the step's
    guidance (its first call's x0 - x0u) after the noise. The schedule lays the sigmas out per
    call (``sigmas_in``, ``sigmas_to``, ``sigmas_up``); calls alternate first and second from
    its start.
    ``step_end`` sees every call, as diffusers' pipelines call back after every scheduler
    step.
    """
    cfg = sched.config
    heun = sched.sampler.startswith(("heun", "restart"))
    cfg_pp = sched.sampler.startswith(CFG_PP_PREFIX)
    solver_pp = sched.sampler.startswith(("dpmpp_2s_a", "cfgpp_dpmpp_2s_a"))
    draws = 0
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas_in[i]
        if cfg_pp:  # the steps run on the unconditional x0; the guidance is added at the end
            x0, x0u = _denoised(model, x, t, sigma, sched, uncond=True)
            if i % 2 == 0:
                guidance = x0 - x0u
            x0 = x0u
        else:
            x0 = _denoised(model, x, t, sigma, sched)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        slope = (x - x0) / sigma
        if i % 2 == 0:  # the trial step
            x_start, sigma_start, first_slope = x, sigma, slope
            x = x + slope * (sched.sigmas_to[i] - sigma)
            if cfg_pp and i == n - 1:  # the last step, one call: to the guided x0
                x = x + guidance
        else:
            if heun:
                slope = (first_slope + slope) / 2
            elif solver_pp:
                slope = (x_start - x0) / sigma_start
            if sched.sigmas_up is not None:  # a step down to sigma 0 keeps its Euler slope
                slope = torch.where(sigma > 0, slope, first_slope)
            x = x_start + slope * (sched.sigmas_to[i] - sigma_start)
            if sched.sigmas_up is not None:
                z = _randn(x, generator) if noise is None else noise[draws].to(x.dtype)
                x = x + z * sched.sigmas_up[i]
                draws += 1
            if cfg_pp:
                x = x + guidance
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_dpmpp_2m(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", alg. 2), midpoint form; dpmpp_2m_sde* is its SDE form
    (diffusers' algorithm_type "sde-dpmsolver++", k-diffusion's sample_dpmpp_2m_sde with
    eta = 1 and Gaussian noise): the same extrapolated x0,
    the sample kept with weight sigma_t/sigma_s e^-h, and fresh noise of std sigma_t
    sqrt(1 - e^-2h) every step (from ``generator``, or ``noise``: one tensor per step).
    dpmpp_2m_sde_heun* weighs the extrapolation as the exact integral of a linear x0 over the
    step (diffusers' solver_type "heun", k-diffusion's solver_type 'heun': A1111's "DPM++ 2M
    SDE Heun"). dpmpp_3m_sde* extrapolates x0 from the last three steps (diffusers'
    solver_order 3), its second to last step second order under 15 steps.

    Exact in the linear part of the variance-preserving ODE, it integrates the x0 prediction over
    log-SNR lambda, extrapolating it linearly from the previous step's. The first step, and the
    last where the schedule says so (a step to sigma = 0), are first order (DDIM-like). Karras
    sigmas or not is only a matter of the schedule. This is the sampler's definition: a config's
    algorithm_type, solver_order and solver_type are not read (``default_sampler`` warns when
    they ask for another variant).
    """
    kind = sched.config.prediction_type
    n = len(sched.timesteps)
    edm = sched.sigma_data is not None
    sde = "_sde" in sched.sampler
    third = sched.sampler.startswith("dpmpp_3m")
    heun = "_heun" in sched.sampler
    # EDM's latents are variance-exploding (alpha = 1), the others variance-preserving.
    alpha_sigma = (lambda s: (torch.ones_like(s), s)) if edm else vp_alpha_sigma
    x0_prev = lam_prev = x0_prev2 = lam_prev2 = None
    for i, t in enumerate(sched.timesteps):
        alpha_s, sigma_s = alpha_sigma(sched.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sched.sigmas[i + 1])
        lam_s, lam_t = alpha_s.log() - sigma_s.log(), alpha_t.log() - sigma_t.log()
        h = lam_t - lam_s
        if edm:
            x0 = _denoised(model, x, t, sched.sigmas[i], sched)
        else:
            out = model(x, t)
            if kind == "epsilon":
                x0 = (x - sigma_s * out) / alpha_s
            elif kind == "v_prediction":
                x0 = alpha_s * x - sigma_s * out
            else:
                x0 = out
        d2 = None
        if i == 0 or (i == n - 1 and sched.final_step_first_order):
            d = x0
        elif not third or i == 1 or (i == n - 2 and sched.second_last_lower):
            r = (lam_s - lam_prev) / h
            d = x0 + 0.5 / r * (x0 - x0_prev)
        else:  # third order: the first and second divided differences in lambda
            r0, r1 = (lam_s - lam_prev) / h, (lam_prev - lam_prev2) / h
            d1_0, d1_1 = (x0 - x0_prev) / r0, (x0_prev - x0_prev2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        if sde:
            z = _randn(x, generator) if noise is None else noise[i].to(x.dtype)
            e = torch.exp(-2.0 * h)
            if heun and d is not x0:  # d = x0 + D1 / 2, D1 the scaled difference
                x = torch.where(h == 0, x, (  # (a step of no length: x as it is)
                    (sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - e)) * x0
                    + (alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0)) * (2.0 * (d - x0))
                    + sigma_t * torch.sqrt(1.0 - e) * z))
            elif d2 is None:
                x = ((sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - e)) * d
                     + sigma_t * torch.sqrt(1.0 - e) * z)
            else:  # (a step of no length, Karras sigmas ending on sigma_min: x as it is)
                x = torch.where(h == 0, x, (
                    (sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1.0 - e)) * x0
                    + (alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0)) * d1
                    + (alpha_t * ((1.0 - e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
                    + sigma_t * torch.sqrt(1.0 - e) * z))
        else:
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d
        x0_prev2, lam_prev2, x0_prev, lam_prev = x0_prev, lam_prev, x0, lam_s
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_lms(model, x, sched: Schedule, step_end=None):
    """The linear multistep method (lms*: k-diffusion's sample_lms, diffusers'
    LMSDiscreteScheduler): each step extrapolates the probability-flow ODE's slope
    (x - x0) / sigma from up to four recent slopes, weighted by the integrals of their
    Lagrange polynomials over the step (``Schedule.coefficients``). ComfyUI's ipndm*,
    ipndm_v*, gradient_estimation* and comfy_deis* (its deis) are the same loop with their own
    weights (``comfy_samplers``)."""
    slopes = []  # newest first
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        x0 = _denoised(model, x, t, sigma, sched)
        slopes = [(x - x0) / sigma] + slopes[:3]
        x = x + sum(sched.coefficients[i, k] * slopes[k] for k in range(sched.orders[i]))
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_x0_multistep(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """ComfyUI's res_multistep*, res_multistep_a*, ddpm*, er_sde* and the CFG++ samplers
    (cfgpp_*): each step's latents are a weighed sum of the latents, the clean latents
    predicted at this step (guided, and for CFG++ the unconditional half's too), two earlier
    steps' clean latents (the unconditional ones for CFG++), and for the stochastic ones fresh
    unit noise, with the step's weights from ``Schedule.coefficients`` (``comfy_samplers``;
    cfgpp_gradient_estimation* keeps the unconditional slope instead).
    The noise is drawn from ``generator``, or taken from ``noise`` (N, *x.shape), as
    euler_a's."""
    cfg_pp = sched.sampler.startswith(CFG_PP_PREFIX)
    slopes = sampler_family(sched.sampler) in SLOPE_HISTORY
    h1 = h2 = torch.zeros_like(x)  # (weighed 0 until there are steps before)
    for i, t in enumerate(sched.timesteps):
        c = sched.coefficients[i]
        if cfg_pp:
            x0, x0u = _denoised(model, x, t, sched.sigmas[i], sched, uncond=True)
            x_next = c[0] * x + c[1] * x0 + c[2] * x0u + c[3] * h1 + c[4] * h2
            h1, h2 = ((x - x0u) / sched.sigmas[i] if slopes else x0u), h1
        else:
            x0 = _denoised(model, x, t, sched.sigmas[i], sched)
            x_next = c[0] * x + c[1] * x0 + c[3] * h1 + c[4] * h2
            h1, h2 = x0, h1
        if sched.noise_draws:
            z = _randn(x, generator) if noise is None else noise[i].to(x.dtype)
            x_next = x_next + c[5] * z
        x = x_next
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_stages(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """The samplers of several calls a step (dpm_fast*, dpm_fast_a*, heunpp2*, seeds_2*,
    seeds_3*; ``comfy_samplers.STAGES``): the point after each call (the next call's latents,
    or the step's end) is the step's start x, the x0s its calls predicted so far and the unit
    noise drawn after them (the calls ``Schedule.orders`` marks: from ``generator``, or
    ``noise``, one tensor per draw) weighed by the call's row of ``Schedule.coefficients``."""
    x_start, x0s, zs, draws = x, [], [], 0
    for i, t in enumerate(sched.timesteps):
        x0s.append(_denoised(model, x, t, sched.sigmas_in[i], sched))
        zs.append(None)  # (by the call's place in the step, as the rows weigh them)
        if sched.orders[i] & 2:
            zs[-1] = _randn(x, generator) if noise is None else noise[draws].to(x.dtype)
            draws += 1
        c = sched.coefficients[i]
        x = (c[0] * x_start + sum(c[1 + k] * x0 for k, x0 in enumerate(x0s))
             + sum(c[4 + k] * z for k, z in enumerate(zs) if z is not None))
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
        if sched.orders[i] & 1:  # the step's end
            x_start, x0s, zs = x, [], []
    return x


def sample_sa_solver(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """ComfyUI's sa_solver* (SA-Solver, Xue et al. 2023): each step's call is at the predicted
    latents; the corrector then redoes the step that led there with the x0s up to this call's
    (sa_solver_pece: and calls the model again at the corrected latents, that x0 replacing the
    newest), and the predictor steps on from the corrected latents, with fresh noise where the
    step is stochastic (from ``generator``, or ``noise``, one tensor per draw), all by the
    call's row of ``Schedule.coefficients`` and its flags in ``Schedule.orders``
    (``comfy_samplers.sa_solver``). ``step_end`` sees each call's next latents."""
    corrected, history, z_prev, draws = x, [], None, 0
    for i, t in enumerate(sched.timesteps):
        flags, c = sched.orders[i], sched.coefficients[i]
        x0 = _denoised(model, x, t, sched.sigmas[i], sched)
        if flags & 4:  # the PECE call, at the corrected latents
            history[0] = x0
        else:
            history = [x0] + history[:3]
            corrected = (c[0] * corrected + c[1] * x
                         + sum(c[2 + k] * x0 for k, x0 in enumerate(history)))
            if z_prev is not None:
                corrected = corrected + c[6] * z_prev
        if flags & 2:  # a PECE call follows, at the corrected latents
            x = corrected
        else:
            x = c[7] * corrected + sum(c[8 + k] * x0 for k, x0 in enumerate(history))
            z_prev = None
            if flags & 1:
                z_prev = _randn(x, generator) if noise is None else noise[draws].to(x.dtype)
                x = x + c[12] * z_prev
                draws += 1
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_deis(model, x, sched: Schedule, step_end=None):
    """DEIS (Zhang & Chen 2023), as diffusers' DEISMultistepScheduler runs it: each step's
    latents are the last ones plus the step's exponential-integrator weights
    (``Schedule.coefficients``, see ``schedules._deis_coefficients``) of the last one to
    three noise predictions."""
    kind = sched.config.prediction_type
    history = []  # noise predictions, newest first
    for i, t in enumerate(sched.timesteps):
        alpha, sigma = vp_alpha_sigma(sched.sigmas[i])
        out = model(x, t)
        # Through x0, as diffusers converts: the first steps of a huge sigma multiply the
        # rounding of this conversion by thousands.
        x0 = ((x - sigma * out) / alpha if kind == "epsilon" else
              alpha * x - sigma * out if kind == "v_prediction" else out)
        history = [(x - alpha * x0) / sigma] + history[:2]
        c, order = sched.coefficients[i], sched.orders[i]
        if order == 1:
            x = c[1] * x + c[2] * history[0]
        else:
            x = c[0] * (x / c[1] + sum(c[2 + k] * history[k] for k in range(order)))
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_unipc(model, x, sched: Schedule, step_end=None):
    """UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler runs it: at each step
    the model's output (as x0, or as the noise without predict_x0) first corrects the
    latents the previous step predicted (UniC, reusing this call: no extra model call), then
    a multistep predictor (UniP) extrapolates the next latents from this and earlier
    outputs. Both are linear in the latents and the outputs; the schedule holds their
    coefficients (``Schedule.coefficients``, solved per step on the host) and orders.
    """
    kind = sched.config.prediction_type
    history = []  # converted model outputs, newest first
    x_prev = None
    for i, t in enumerate(sched.timesteps):
        alpha, sigma = vp_alpha_sigma(sched.sigmas[i])
        out = model(x, t)
        if sched.config.predict_x0:
            m = ((x - sigma * out) / alpha if kind == "epsilon" else
                 alpha * x - sigma * out if kind == "v_prediction" else out)
        else:
            m = (out if kind == "epsilon" else alpha * out + sigma * x if kind == "v_prediction"
                 else (x - alpha * out) / sigma)
        history = [m] + history[:sched.config.solver_order]
        corrector, predictor = sched.orders[i]
        c = sched.coefficients[i]
        if corrector:
            x = c[0, 0] * x_prev + sum(c[0, 1 + k] * history[k] for k in range(corrector + 1))
        x_prev = x
        x = c[1, 0] * x + sum(c[1, 1 + k] * history[k] for k in range(predictor))
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_lcm(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models",
    alg. 1; diffusers' LCMScheduler).

    Each step maps x_t to the consistency function's estimate of the clean latents,
    c_skip(t) x_t + c_out(t) x0(x_t), and, except on the last step, noises that estimate
    afresh to the next timestep's alpha-bar. The noise is drawn from ``generator``, or taken
    from ``noise`` (N - 1, *x.shape), unit noise drawn beforehand (see euler_a).
    """
    cfg = sched.config
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        a, a_prev = sched.alphas[i], sched.alphas_prev[i]
        x0, _ = _x0_and_eps(model(x, t), x, a, cfg.prediction_type)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        denoised = sched.c_out[i] * x0 + sched.c_skip[i] * x
        if i < n - 1:
            z = _randn(denoised, generator) if noise is None else noise[i].to(x.dtype)
            x = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * z
        else:
            x = denoised
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def sample_dpmpp_sde(model, x, sched: Schedule, generator=None, noise=None, step_end=None):
    """DPM-Solver++(2S) as an SDE with Brownian-tree noise (Lu et al. 2022, "DPM-Solver++",
    alg. 1 with r = 1/2, eta = 1; k-diffusion's sample_dpmpp_sde, A1111's "DPM++ SDE"), as
    diffusers' DPMSolverSDEScheduler runs it: a step's first call takes an ancestral step
    from x to the midpoint sqrt(s s'), its second takes the step from x to s' with the
    midpoint's x0 (``_dpmpp_sde_schedule``'s coefficients), each adding a Brownian-tree
    increment; the last step is one call, to its x0. ``noise``: the increments
    (``Schedule.noise_draws`` of them, ``brownian_noise``), else drawn here from trees
    seeded by ``generator``."""
    if noise is None:
        noise = brownian_noise(sched, x.shape, generator).to(x.device)
    coef, last = sched.coefficients, len(sched.timesteps) - 1
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas_in[i]
        x0 = _denoised(model, x, t, sigma, sched)
        if i % 2 == 0:
            x_start = x
        if i == last and i % 2 == 0:  # a one-call step to sigma 0, rounded as diffusers does
            x = x + (x - x0) / sigma * (0 - sigma)
        else:
            x = coef[i, 0] * x_start - coef[i, 1] * x0 + noise[i].to(x.dtype) * coef[i, 2]
        if step_end is not None:
            x = _after_step(step_end, i, t, x)
    return x


def brownian_seeds(generator, rows):
    """One Brownian-tree seed per row, drawn from the row's CPU generator (a list of
    ``rows``), or in turn from the one generator of all rows."""
    generators = generator if isinstance(generator, list) else [generator] * rows
    return [int(torch.randint(0, 2**63 - 1, (), generator=g)) for g in generators]


def brownian_noise(sched: Schedule, shape, generator):
    """A dpmpp_sde* run's noise (draws, *shape), float32 on the CPU: for each of
    ``sched.noise_points`` (s, s'), the increment of a Brownian motion over [s', s] divided by
    sqrt(s - s'), one tree per row over the schedule's sigma range, seeded from ``generator``
    (``brownian_seeds``), as diffusers' BrownianTreeNoiseSampler draws it. Needs torchsde
    (the ``sde`` extra)."""
    try:
        import torchsde
    except ImportError:
        raise SdrtError(f"sampler {sched.sampler} needs torchsde (its Brownian-tree noise): "
                        f"pip install 'sdrt[sde]'") from None
    lo, hi = sched.noise_range
    w0 = torch.zeros(shape[1:])
    trees = [torchsde.BrownianTree(lo, w0, hi, entropy=seed)
             for seed in brownian_seeds(generator, shape[0])]
    out = torch.empty(sched.noise_draws, *shape)
    with warnings.catch_warnings():
        # A query a float32 rounding outside the tree's range (exp(log(s)) for s): torchsde
        # warns and clamps, as it does under diffusers.
        warnings.filterwarnings("ignore", "Should have", UserWarning)
        for i, (a, b) in enumerate(sched.noise_points):
            # Queried from the lower sigma up; over a descending step the increment is negated.
            low, high = (a, b) if a < b else (b, a)
            w = torch.stack([tree(low, high) for tree in trees]) * (1.0 if a < b else -1.0)
            out[i] = w / (high - low).abs().sqrt()
    return out


_SAMPLE_FNS = {
    "ddim": sample_ddim,
    "cfgpp_ddim": sample_ddim,
    "pndm": sample_pndm,
    "euler": sample_euler,
    "euler_karras": sample_euler,
    "euler_a": sample_euler_ancestral,
    "euler_a_karras": sample_euler_ancestral,
    **{name: sample_two_call for name in TWO_CALL_SAMPLERS},
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_karras": sample_dpmpp_sde,
    **{name: sample_dpmpp_2m for name in ("dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde",
                                          "dpmpp_2m_sde_karras", "dpmpp_2m_sde_heun",
                                          "dpmpp_2m_sde_heun_karras", "dpmpp_3m_sde",
                                          "dpmpp_3m_sde_karras", *EXPONENTIAL)},
    "lms": sample_lms,
    "lms_karras": sample_lms,
    "unipc": sample_unipc,
    "unipc_karras": sample_unipc,
    "deis": sample_deis,
    "deis_karras": sample_deis,
    **{name: sample_unipc for name in ("uni_pc", "uni_pc_karras", "uni_pc_bh2",
                                       "uni_pc_bh2_karras")},
    **{name: sample_lms for base in SLOPE_WEIGHTS for name in (base, f"{base}_karras")},
    **{name: sample_x0_multistep for base in X0_WEIGHTS for name in (base, f"{base}_karras")},
    **{name: sample_sa_solver for name in ("sa_solver", "sa_solver_karras", "sa_solver_pece",
                                           "sa_solver_pece_karras")},
    **{name: sample_stages for base in STAGES for name in (base, f"{base}_karras")},
    "lcm": sample_lcm,
}
assert set(_SAMPLE_FNS) == set(SAMPLERS)

# The samplers that draw fresh noise as they go (``Schedule.noise_draws`` tensors a run).
_NOISE_SAMPLERS = ("ddim", "euler_a", "euler_a_karras", "dpm2_a", "dpm2_a_karras", "dpmpp_2s_a",
                   "dpmpp_2s_a_karras", "cfgpp_dpmpp_2s_a", "cfgpp_dpmpp_2s_a_karras", "restart",
                   "restart_karras", "dpmpp_sde",
                   "dpmpp_sde_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras",
                   "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_karras", *EXPONENTIAL,
                   "dpmpp_3m_sde",
                   "dpmpp_3m_sde_karras", "lcm",
                   *(name for base in NOISY for name in (base, f"{base}_karras")),
                   "sa_solver", "sa_solver_karras", "sa_solver_pece", "sa_solver_pece_karras")


def sample(sampler: str, model, x: torch.Tensor, sched: Schedule, generator=None, callback=None,
           noise=None, step_end=None):
    """Run ``sampler`` from latents ``x`` (already noised: ``sched.noise_latents`` or
    ``sched.noise_image``) and return the denoised latents in x's dtype.

    The model sees inputs in x's dtype; the loop itself runs in float32. The stochastic
    samplers' noise (ddim with an eta, euler_a, dpm2_a*, dpmpp_sde*, dpmpp_2m_sde*,
    dpmpp_3m_sde*, lcm, res_multistep_a*, ddpm*, er_sde*, cfgpp_euler_a*, cfgpp_res_multistep_a*,
    cfgpp_dpmpp_2s_a*, dpm_fast_a*, seeds_2*, seeds_3*, sa_solver*) comes
    from ``generator``, or from ``noise`` when given: ``sched.noise_draws`` unit-noise tensors
    (dpmpp_sde*: Brownian increments, ``brownian_noise``), stacked.
    After each model call's step, ``callback(step_index, num_steps)`` reports progress and
    ``step_end(step_index, timestep, x)`` sees the float32 latents; a tensor it returns
    replaces them (diffusers' ``callback_on_step_end``).
    """
    if sampler != sched.sampler:
        raise SdrtError(f"schedule was made for sampler {sched.sampler}, not {sampler}")
    base = split_sampler(sampler)[0]
    if noise is not None:
        if base not in _NOISE_SAMPLERS or (base == "ddim" and not sched.eta):
            raise SdrtError(f"sampler {sampler} draws no noise; pass noise only to "
                            f"{' or '.join(_NOISE_SAMPLERS)}")
        if tuple(noise.shape) != (sched.noise_draws, *x.shape):
            raise SdrtError(f"{sampler} noise has shape {tuple(noise.shape)}, expected "
                            f"{(sched.noise_draws, *x.shape)}")
    dtype = x.dtype

    def model_f32(x_in, t, **uncond):
        out = model(x_in.to(dtype), t, **uncond)
        return tuple(o.float() for o in out) if uncond else out.float()

    if callback is not None:
        inner, n = step_end, len(sched.timesteps)

        def report(i, t, x):
            callback(i, n)
            return None if inner is None else inner(i, t, x)
        step_end = report

    extra = {"generator": generator, "noise": noise} if base in _NOISE_SAMPLERS else {}
    return _SAMPLE_FNS[base](model_f32, x.float(), sched, step_end=step_end, **extra).to(dtype)


# The inverse of SAMPLER_CLASSES and EDM_CLASSES: the first sampler listed for each class (Euler's
# use_karras_sigmas is honoured by make_schedule; DPM-Solver's picks dpmpp_2m_karras instead).
_CLASS_SAMPLERS = {cls: name for table in (SAMPLER_CLASSES, EDM_CLASSES)
                   for name, cls in reversed(table.items())}

# The DPM-Solver variant sample_dpmpp_2m is: DPMSolverMultistepScheduler's defaults.
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}


def default_sampler(cfg: SchedulerConfig) -> str:
    """The sampler matching the scheduler class a model ships with; dpmpp_2m, with a warning, for
    a class sdrt does not reproduce.

    A DPMSolverMultistepScheduler config gives dpmpp_2m (or dpmpp_2m_karras; with
    algorithm_type "sde-dpmsolver++", dpmpp_2m_sde or dpmpp_2m_sde_karras), with a warning
    when it asks for another variant (algorithm_type, solver_order, solver_type): sdrt
    implements only DPM-Solver++(2M) midpoint, as an ODE or an SDE. Asking for dpmpp_2m
    explicitly always means that variant, whatever the config says, and warns about nothing.
    """
    if _CLASS_SAMPLERS.get(cfg.class_name) == "dpmpp_2m":  # DPM-Solver, EDM's or not
        sde = cfg.algorithm_type == "sde-dpmsolver++" and not cfg.edm
        third = sde and cfg.solver_order == 3
        heun = sde and not third and cfg.solver_type == "heun"
        sampler = ("dpmpp_3m_sde" if third else "dpmpp_2m_sde_heun" if heun else
                   "dpmpp_2m_sde" if sde else "dpmpp_2m")
        if cfg.use_karras_sigmas and not cfg.edm:
            sampler += "_karras"
        other = {k: getattr(cfg, k) for k, v in _DPMPP_2M.items()
                 if getattr(cfg, k) != v and not (sde and k == "algorithm_type")
                 and not (third and k == "solver_order") and not (heun and k == "solver_type")}
        if other:
            settings = ", ".join(f"{k}={v!r}" for k, v in other.items())
            warnings.warn(f"scheduler config sets {settings}, which sdrt does not implement; using "
                          f"{sampler} (DPM-Solver++ {'3' if third else '2'}M"
                          f"{' SDE' if sde else ''}, midpoint)",
                          stacklevel=2)
        return sampler
    if cfg.class_name in _CLASS_SAMPLERS:
        sampler = _CLASS_SAMPLERS[cfg.class_name]
        # A sampler that does not read the config's Karras switch has its own Karras variant.
        return (KARRAS_SAMPLERS[sampler] if cfg.use_karras_sigmas and not cfg.edm
                and sampler in KARRAS_OFF else sampler)
    warnings.warn(f"scheduler class {cfg.class_name} has no sdrt sampler; using dpmpp_2m", stacklevel=2)
    return "dpmpp_2m"


def switch_after(scheduler_config, sampler, steps, base_steps):
    """The --refiner-start (a fraction of the noise schedule, diffusers' denoising_end) at
    which the base runs exactly its first ``base_steps`` of ``steps`` calls of ``sampler``
    (ComfyUI's end_at_step): the cutoff timestep is the whole number at or below the last of
    them, above the next."""
    sampler = sampler or default_sampler(scheduler_config)
    ts = make_schedule(scheduler_config, sampler, steps).timesteps.double().tolist()
    if len(ts) != steps or not 0 < base_steps < steps:
        raise SdrtError(f"a refiner after {base_steps} of {steps} steps needs a sampler of one "
                        f"call a step (ddim, euler, euler_a, dpmpp_2m and their schedules), "
                        f"got {sampler}")
    cutoff = math.floor(ts[base_steps - 1])
    if cutoff <= ts[base_steps]:
        raise SdrtError(f"steps {base_steps} and {base_steps + 1} of {sampler}'s {steps} are "
                        f"less than a timestep apart: no switch falls between them")
    total = scheduler_config.num_train_timesteps
    return (total - cutoff) / total
