"""The samplers of several model calls a step against their loops written out here, as
k-diffusion and ComfyUI step them: DPM-Solver-Fast (k-diffusion's ``DPMSolver.dpm_solver_fast``,
A1111's "DPM fast" at eta 1, ComfyUI's dpm_fast at eta 0), ComfyUI's heunpp2, seeds_2 and
seeds_3, and ComfyUI's dpmpp_2s_ancestral_cfg_pp.

The references run in float64 on their own levels: k-diffusion's uniform table
(``get_sigmas``: timesteps 999 to 0, log sigma interpolated), Karras', or ComfyUI's scheduler
tables (sdrt's ``sigma_schedules.levels``, checked against ComfyUI's in
``test_sigma_schedules``), cut for image to image; each call's timestep is k-diffusion's
``sigma_to_t``. Both sides run the same stand-in model from the same latents (and the same unit
noise), so the calls' timesteps and the final latents must agree."""
import math

import numpy as np
import pytest
import torch

from sdrt.engine import comfy
from sdrt.engine.infotext import sampler_id, sampler_label
from sdrt.engine.request import GenerationRequest, sampler_family, split_sampler
from sdrt.engine.samplers import SchedulerConfig, make_schedule, sample
from sdrt.engine.schedules import train_alphas_cumprod
from sdrt.engine.sigma_schedules import levels
from test_comfy_samplers import GuidedModel
from test_samplers import CONFIGS, LinearModel, _latents


def _train(cfg):
    ac = train_alphas_cumprod(cfg.for_sampler("euler")).double()
    return ((1 - ac) / ac) ** 0.5  # ascending


def _sigma_to_t(sigma, train):
    """k-diffusion's DiscreteSchedule.sigma_to_t (fractional, log sigma interpolated)."""
    log_sigmas = train.log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(())


def _run_levels(sampler, cfg, steps, strength):
    """The levels of the run, as the tools hand them to the sampler."""
    base, schedule = split_sampler(sampler)
    train = _train(cfg)
    big_t = len(train)
    if schedule is not None:
        table = torch.from_numpy(levels(schedule, steps, train.float().numpy()))
    elif base.startswith("dpm_fast") and steps == 1:
        table = torch.stack([train[-1], train[0]])  # A1111: the model's range itself
    elif base.endswith("_karras"):
        # k-diffusion's get_sigmas_karras over the model's range (heunpp2: over Euler's
        # levels', which for one step are the lowest alone)
        lo, hi = train[0], train[-1] if steps > 1 or base.startswith("dpm_fast") else train[0]
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        table = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        table = torch.cat([table, table.new_zeros(1)])
    elif base.startswith("dpm_fast"):
        t = torch.linspace(big_t - 1, 0, steps, dtype=torch.float64)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        table = ((1 - w) * train.log()[low] + w * train.log()[high]).exp()
        table = torch.cat([table, table.new_zeros(1)])
    else:  # heunpp2 on EulerDiscreteScheduler's linspace levels
        t = torch.linspace(big_t - 1, 0, steps, dtype=torch.float64) if steps > 1 else \
            torch.zeros(1, dtype=torch.float64)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        table = ((1 - w) * train.log()[low] + w * train.log()[high]).exp()
        table = torch.cat([table, table.new_zeros(1)])
    n = len(table) - 1
    return table[n - min(int(n * strength), n):]


def _dpm_fast(denoise, x, sigmas, eta, noise):
    """k-diffusion's sample_dpm_fast from sigma_max = the run's first level to sigma_min = its
    last above 0 (ComfyUI's and A1111's choice), n = the run's steps."""
    sigma_min = sigmas[sigmas > 0][-1]
    n = len(sigmas) - 1
    t_of, sigma_of = (lambda s: -torch.log(s)), (lambda t: torch.exp(-t))

    def eps(x, t):
        return (x - denoise(x, sigma_of(t))) / sigma_of(t)

    def step1(x, t, tn, e0):
        return x - sigma_of(tn) * torch.expm1(tn - t) * e0

    def step2(x, t, tn, e0, r1=0.5):
        h = tn - t
        s1 = t + r1 * h
        u1 = x - sigma_of(s1) * torch.expm1(r1 * h) * e0
        e1 = eps(u1, s1)
        return (x - sigma_of(tn) * torch.expm1(h) * e0
                - sigma_of(tn) / (2 * r1) * torch.expm1(h) * (e1 - e0))

    def step3(x, t, tn, e0, r1=1 / 3, r2=2 / 3):
        h = tn - t
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - sigma_of(s1) * torch.expm1(r1 * h) * e0
        e1 = eps(u1, s1)
        u2 = (x - sigma_of(s2) * torch.expm1(r2 * h) * e0
              - sigma_of(s2) * (r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
        e2 = eps(u2, s2)
        return (x - sigma_of(tn) * torch.expm1(h) * e0
                - sigma_of(tn) / r2 * (torch.expm1(h) / h - 1) * (e2 - e0))

    t_start, t_end = t_of(sigmas[0]), t_of(sigma_min)
    m = n // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, dtype=torch.float64)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, tn = ts[i], ts[i + 1]
        if eta:
            s, sn = sigma_of(t), sigma_of(tn)
            up = min(sn, eta * (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5)
            down = (sn ** 2 - up ** 2) ** 0.5
            tn_ = torch.minimum(t_end, t_of(down))
            up = (sn ** 2 - sigma_of(tn_) ** 2) ** 0.5
        else:
            tn_, up = tn, 0.0
        e0 = eps(x, t)
        x = (step1, step2, step3)[order - 1](x, t, tn_, e0)
        if eta:
            x = x + up * noise[i]
    return x


def _heunpp2(denoise, x, s):
    """ComfyUI's sample_heunpp2 (no churn)."""
    end = s[-1]
    for i in range(len(s) - 1):
        d = (x - denoise(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == end:
            x = x + d * dt
        elif s[i + 2] == end:
            x2 = x + d * dt
            d2 = (x2 - denoise(x2, s[i + 1])) / s[i + 1]
            w2 = s[i + 1] / (2 * s[0])
            x = x + (d * (1 - w2) + d2 * w2) * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoise(x2, s[i + 1])) / s[i + 1]
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            d3 = (x3 - denoise(x3, s[i + 2])) / s[i + 2]
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def _seeds(denoise, x, s, noise, stages, eta=1.0):
    """ComfyUI's sample_seeds_2 (r 1/2, phi_1) and sample_seeds_3 (r 1/3, 2/3) for a model of
    discrete levels (lambda = -log sigma, alpha 1), noise drawn in call order."""
    def phi1(z):
        return torch.expm1(z)

    def phi2(z):
        return (torch.expm1(z) - z) / z

    draws = iter(noise)
    for i in range(len(s) - 1):
        x0 = denoise(x, s[i])
        if s[i + 1] == 0:
            x = x0
            continue
        h = torch.log(s[i]) - torch.log(s[i + 1])
        h_eta = h * (eta + 1)
        if stages == 2:
            r = 0.5
            s1 = s[i] * torch.exp(-r * h)
            x2 = s1 / s[i] * torch.exp(-r * h * eta) * x - phi1(-r * h_eta) * x0
            sde = torch.sqrt(-torch.expm1(-2 * r * h * eta)) * next(draws)
            x2 = x2 + sde * s1
            x0_2 = denoise(x2, s1)
            mixed = torch.lerp(x0, x0_2, 1 / (2 * r))
            x = s[i + 1] / s[i] * torch.exp(-h * eta) * x - phi1(-h_eta) * mixed
            segment = (r - 1) * h * eta
            sde = sde * segment.exp() + torch.sqrt(-torch.expm1(2 * segment)) * next(draws)
            x = x + sde * s[i + 1]
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = s[i] * torch.exp(-r1 * h), s[i] * torch.exp(-r2 * h)
            x2 = s1 / s[i] * torch.exp(-r1 * h * eta) * x - phi1(-r1 * h_eta) * x0
            sde = torch.sqrt(-torch.expm1(-2 * r1 * h * eta)) * next(draws)
            x2 = x2 + sde * s1
            x0_2 = denoise(x2, s1)
            a32 = r2 / r1 * phi2(-r2 * h_eta)
            a31 = phi1(-r2 * h_eta) - a32
            x3 = s2 / s[i] * torch.exp(-r2 * h * eta) * x - (a31 * x0 + a32 * x0_2)
            segment = (r1 - r2) * h * eta
            sde = sde * segment.exp() + torch.sqrt(-torch.expm1(2 * segment)) * next(draws)
            x3 = x3 + sde * s2
            x0_3 = denoise(x3, s2)
            b3 = phi2(-h_eta) / r2
            b1 = phi1(-h_eta) - b3
            x = s[i + 1] / s[i] * torch.exp(-h * eta) * x - (b1 * x0 + b3 * x0_3)
            segment = (r2 - 1) * h * eta
            sde = sde * segment.exp() + torch.sqrt(-torch.expm1(2 * segment)) * next(draws)
            x = x + sde * s[i + 1]
    return x


def _denoiser(model, cfg, uncond=False):
    """The clean latents ``model`` predicts from VE latents x at ``sigma``, float64: it sees x
    scaled by 1 / sqrt(sigma^2 + 1) at k-diffusion's timestep of sigma. ``uncond``: the model
    answers (guided, unconditional), and so does the denoiser."""
    train = _train(cfg)
    kind = cfg.for_sampler("euler").prediction_type

    def denoise(x, sigma):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        outs = model((x * c_in).float(), _sigma_to_t(sigma, train).float(),
                     **({"uncond": True} if uncond else {}))
        x0s = [x - sigma * o.double() if kind == "epsilon" else
               o.double() * (-sigma * c_in) + x * c_in ** 2
               for o in (outs if uncond else (outs,))]
        return x0s if uncond else x0s[0]
    return denoise


def _reference(sampler, model, x, run, cfg, noise):
    """The loop of ``sampler`` over the run's levels, float64 (``_denoiser``)."""
    denoise = _denoiser(model, cfg)
    family = sampler_family(sampler)
    if family.startswith("seeds"):
        return _seeds(denoise, x.double(), run, () if noise is None else noise.double(),
                      int(family[-1]))
    if family.startswith("dpm_fast"):
        return _dpm_fast(denoise, x.double(), run, 1.0 if family == "dpm_fast_a" else 0.0,
                         None if noise is None else noise.double())
    return _heunpp2(denoise, x.double(), run)


SAMPLERS = ["dpm_fast", "dpm_fast_a", "dpm_fast_karras", "dpm_fast_a_karras",
            "dpm_fast_exponential", "dpm_fast_a_simple", "heunpp2", "heunpp2_karras",
            "heunpp2_normal", "heunpp2_linear_quadratic", "seeds_2", "seeds_2_karras",
            "seeds_3", "seeds_3_beta"]


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (8, 1.0),
                                            (10, 0.6)])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_matches_the_tools_loops(sampler, steps, strength, config):
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps, strength)
    run = _run_levels(sampler, cfg, steps, strength)
    noise = _latents(steps)
    x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(_latents(99), noise)
    assert float(sched.sigmas[0]) == pytest.approx(float(run[0]), rel=1e-5)
    draws = None
    if sched.noise_draws:
        g = torch.Generator().manual_seed(steps)
        draws = torch.randn((sched.noise_draws, *x.shape), generator=g)
    theirs_model = LinearModel()
    theirs = _reference(sampler, theirs_model, x, run, cfg, draws)
    _assert_ours_match(sampler, steps, sched, x, draws, LinearModel(), theirs_model, theirs)


def _assert_ours_match(sampler, steps, sched, x, draws, model, theirs_model, theirs):
    """sdrt's run of ``sampler`` from ``x`` (with the unit noise ``draws``) with ``model``
    calls the model at the reference's timesteps and lands on its latents ``theirs``."""
    ours = torch.full_like(x, math.nan)
    ours.copy_(sample(sampler, model, x, sched, noise=draws))
    ref_t = torch.stack([t for _, t in theirs_model.calls]).double()
    our_t = torch.stack([t for _, t in model.calls]).double()
    assert len(our_t) == len(ref_t) == len(sched.timesteps)
    np.testing.assert_allclose(our_t.numpy(), ref_t.numpy(), rtol=1e-4, atol=2e-3)
    scale = max(1.0, theirs.abs().max().item())
    err = (ours.double() - theirs).abs().max().item()
    assert err <= 2e-5 * scale, f"{sampler}, {steps} steps: max abs diff {err:.3g}"


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 9, 20])
def test_dpm_fast_spends_exactly_its_steps_in_calls_and_ends_above_zero(steps):
    # k-diffusion's DPM-Solver-Fast: n model calls for n steps, ending on sigma_min (A1111's
    # and ComfyUI's pictures keep that last bit of noise).
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    for sampler in ("dpm_fast", "dpm_fast_a"):
        sched = make_schedule(cfg, sampler, steps)
        assert len(sched.timesteps) == steps
        assert float(sched.sigmas[-1]) == pytest.approx(float(_train(cfg)[0]), rel=1e-5)
        assert float(sched.sigmas[0]) == pytest.approx(float(_train(cfg)[-1]), rel=1e-5)
    # the ancestral one draws one noise tensor a step (floor(n / 3) + 1 steps, n > 2)
    assert make_schedule(cfg, "dpm_fast_a", 9).noise_draws == 4


def test_heunpp2_takes_three_calls_a_step_but_the_last_two():
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    for steps in (1, 2, 5, 12):
        sched = make_schedule(cfg, "heunpp2", steps)
        assert len(sched.timesteps) == max(3 * steps - 3, 1)


@pytest.mark.parametrize("sampler,draws", [("dpm_fast_a", 3), ("seeds_2", 14), ("seeds_3", 21)])
def test_stochastic_ones_draw_their_noise_from_the_generator(sampler, draws):
    # One draw a step (dpm_fast_a: 8 calls in 3 steps), or one after each call but the last
    # step's (SEEDS: 8 steps, the last to 0).
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    sched = make_schedule(cfg, sampler, 8)
    assert sched.noise_draws == draws
    x = sched.noise_latents(_latents(1))
    a, b, c = (sample(sampler, LinearModel(), x, sched,
                      generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert make_schedule(cfg, "dpm_fast", 8).noise_draws == 0


def test_names_from_a1111_and_comfyui():
    # A1111's "DPM fast" (and its API alias) is the eta-1 one; ComfyUI's dpm_fast the ODE one.
    assert sampler_id("DPM fast") == "dpm_fast_a"
    assert sampler_id("k_dpm_fast") == "dpm_fast_a"
    assert sampler_id("DPM fast", "Karras") == "dpm_fast_a_karras"
    assert sampler_id("DPM fast", "Exponential") == "dpm_fast_a_exponential"
    assert sampler_label("dpm_fast_a_karras") == "DPM fast Karras"
    assert comfy.SAMPLERS[("dpm_fast", "karras")] == "dpm_fast_karras"
    assert comfy.SAMPLERS[("dpm_fast", "normal")] == "dpm_fast_normal"
    assert comfy.SAMPLERS[("heunpp2", "simple")] == "heunpp2_simple"
    assert comfy.SAMPLERS[("heunpp2", "linear_quadratic")] == "heunpp2_linear_quadratic"
    assert comfy.SAMPLERS[("euler", "linear_quadratic")] == "euler_linear_quadratic"
    GenerationRequest(prompt="a", sampler="heunpp2_beta")  # a request takes the ids


def test_partial_runs_are_refused_in_one_line():
    # A window of a several-calls-a-step run (SDXL's base/refiner split) is refused.
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    from sdrt.engine.errors import SdrtError
    with pytest.raises(SdrtError, match="cannot run part of its schedule"):
        make_schedule(cfg, "heunpp2", 10, denoising_end=0.8)


def _dpmpp_2s_ancestral_cfg_pp(model, x, s, cfg, noise):
    """ComfyUI's sample_dpmpp_2s_ancestral_cfg_pp over levels ``s`` (eta 1), float64: the
    steps run on the unconditional x0, each step's guidance x0 - x0u (of its first call) added
    after its noise."""
    denoise = _denoiser(model, cfg, uncond=True)

    for i in range(len(s) - 1):
        guided, uncond = denoise(x, s[i])
        guidance = guided - uncond
        up = min(s[i + 1], (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5)
        down = (s[i + 1] ** 2 - up ** 2) ** 0.5
        if down == 0:
            x = x + (x - uncond) / s[i] * (down - s[i])
        else:
            t, t_next = -torch.log(s[i]), -torch.log(down)
            h = t_next - t
            mid = torch.exp(-(t + h / 2))
            x2 = (mid / s[i]) * x - torch.expm1(-h / 2) * uncond
            uncond2 = denoise(x2, mid)[1]
            x = (down / s[i]) * x - torch.expm1(-h) * uncond2
        if s[i + 1] > 0:
            x = x + noise[i] * up
        x = x + guidance
    return x


# (Not one step to sigma_min, nor two to 0: DPM2 a's float32 sigma_down of a step from
# sigma_max to the last level cancels to a few digits, as diffusers' does, and the step
# magnifies that.)
@pytest.mark.parametrize("sampler,steps,strength", [
    ("cfgpp_dpmpp_2s_a", 1, 1.0), ("cfgpp_dpmpp_2s_a", 3, 1.0), ("cfgpp_dpmpp_2s_a", 10, 0.6),
    ("cfgpp_dpmpp_2s_a_karras", 5, 1.0), ("cfgpp_dpmpp_2s_a_karras", 10, 0.6),
    ("cfgpp_dpmpp_2s_a_normal", 6, 1.0), ("cfgpp_dpmpp_2s_a_kl_optimal", 4, 1.0)])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_dpmpp_2s_ancestral_cfg_pp_matches_comfyuis_loop(sampler, steps, strength, config):
    # Its levels are DPM++ 2S a's (test_samplers checks those): the first calls' levels, then
    # where the last step lands.
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps, strength)
    last = 0.0 if len(sched.timesteps) % 2 else float(sched.sigmas[-1])
    run = torch.cat([sched.sigmas_in[0::2].double(), torch.tensor([last], dtype=torch.float64)])
    noise = _latents(steps)
    x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(_latents(99), noise)
    g = torch.Generator().manual_seed(steps)
    draws = torch.randn((sched.noise_draws, *x.shape), generator=g)
    theirs_model = GuidedModel()
    theirs = _dpmpp_2s_ancestral_cfg_pp(theirs_model, x.double(), run, cfg,
                                        torch.cat([draws, draws[:1] * 0]).double())
    _assert_ours_match(sampler, steps, sched, x, draws, GuidedModel(), theirs_model, theirs)
    assert comfy.SAMPLERS[("dpmpp_2s_ancestral_cfg_pp", "karras")] == "cfgpp_dpmpp_2s_a_karras"


def _sa_weights(lambdas, s, t, tau):
    """SA-Solver's b_k: (1 + tau^2) times the integral over [s, t] of exp(-(1 + tau^2)(t - l))
    times the Lagrange basis polynomial k through ``lambdas`` (Xue et al. 2023, eqs. 15 and
    18, data prediction), by 64-point Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    lam = (t - s) / 2 * nodes + (t + s) / 2
    kernel = (1 + tau ** 2) * np.exp(-(1 + tau ** 2) * (t - lam)) * (t - s) / 2
    out = []
    for k, lk in enumerate(lambdas):
        basis = np.ones_like(lam)
        for m, lm in enumerate(lambdas):
            if m != k:
                basis *= (lam - lm) / (lk - lm)
        out.append(np.sum(weights * kernel * basis))
    return out


def _sa_solver(denoise, x, s, noise, span, pece=False, orders=(3, 4)):
    """ComfyUI's sample_sa_solver (``pece``: sample_sa_solver_pece) over levels ``s``: lambda =
    -log sigma, tau 1 between ``span``'s sigmas (its default tau_func), orders lowered towards
    a last level of 0."""
    lam = [-math.log(float(v)) if v > 0 else 0.0 for v in s]
    draws = iter(noise)
    x_pred, x, history, tau, h, z = x, x, [], 0.0, 0.0, None
    n = len(s) - 1
    for i in range(n):
        history = (history + [denoise(x_pred, s[i])])[-max(orders):]
        p = min(orders[0], len(history))
        c = 0 if i == 0 or (s[i + 1] == 0 and not pece) else min(orders[1], len(history))
        if s[-1] == 0:
            p, c = min(p, n - 1 - i), min(c, n - i)
        if c == 0:
            x = x_pred
        else:
            b = _sa_weights(lam[i - c + 1:i + 1], lam[i - 1], lam[i], tau)
            x = (float(s[i] / s[i - 1]) * math.exp(-tau ** 2 * h) * x
                 + sum(bk * x0 for bk, x0 in zip(b, history[-c:])))
            if tau > 0:
                x = x + z
            if pece:  # the corrected latents evaluated, that x0 the newest
                history[-1] = denoise(x, s[i])
        if s[i + 1] == 0:
            x_pred = history[-1]
            continue
        tau = 1.0 if span[0] >= s[i + 1] >= span[1] else 0.0
        b = _sa_weights(lam[i - p + 1:i + 1], lam[i], lam[i + 1], tau)
        h = lam[i + 1] - lam[i]
        x_pred = (float(s[i + 1] / s[i]) * math.exp(-tau ** 2 * h) * x
                  + sum(bk * x0 for bk, x0 in zip(b, history[-p:])))
        if tau > 0:
            z = next(draws) * float(s[i + 1]) * math.sqrt(-math.expm1(-2 * tau ** 2 * h))
            x_pred = x_pred + z
    return x_pred


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (3, 1.0), (6, 1.0), (12, 1.0),
                                            (20, 0.5)])
@pytest.mark.parametrize("sampler", ["sa_solver", "sa_solver_karras", "sa_solver_exponential",
                                     "sa_solver_pece", "sa_solver_pece_simple"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_sa_solver_matches_comfyuis_loop(sampler, steps, strength, config):
    # Its levels are Euler's (or the schedule's), cut for image to image; the stochastic span
    # is between the levels at 20% and 80% of the timesteps, as ComfyUI's percent_to_sigma.
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps, strength)
    train = _train(cfg)
    span = tuple(float(torch.exp(torch.lerp(train.log()[int(t)], train.log()[int(t) + 1],
                                            t - int(t)))) for t in (0.8 * 999, 0.2 * 999))
    run = sched.sigmas.double()
    noise = _latents(steps)
    x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(_latents(99), noise)
    g = torch.Generator().manual_seed(steps)
    draws = torch.randn((sched.noise_draws, *x.shape), generator=g)
    if sampler.startswith("sa_solver_pece"):  # (the levels of the steps, not of the calls)
        run = torch.cat([torch.unique_consecutive(run[:-1]), run[-1:]])
    theirs_model = LinearModel()
    theirs = _sa_solver(_denoiser(theirs_model, cfg), x.double(), run, draws.double(), span,
                        pece=sampler.startswith("sa_solver_pece"))
    if steps >= 6 and strength == 1:
        assert sched.noise_draws > 0, "no step in the stochastic span"
    _assert_ours_match(sampler, steps, sched, x, draws, LinearModel(), theirs_model, theirs)


@pytest.mark.parametrize("sampler", ["dpm_fast", "heunpp2_beta", "seeds_2", "sa_solver_karras",
                                     "sa_solver_pece"])
def test_a_run_with_no_step_left_is_refused_in_one_line(sampler):
    # One step at strength 0.3 keeps none (as for every sampler); said, not an IndexError.
    from sdrt.engine.errors import SdrtError
    if sampler.endswith("beta"):
        pytest.importorskip("scipy")
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    with pytest.raises(SdrtError, match="leaves no denoising step"):
        make_schedule(cfg, sampler, 1, 0.3)


def test_sa_solver_refuses_levels_it_has_no_weights_through():
    # A zero-terminal-SNR model's linear_quadratic table over 999 steps starts with levels
    # about 4096 spaced by 0.2: in log sigma too close for the Vandermonde system of SA-Solver's
    # weights, which float64 finds singular.
    from sdrt.engine.errors import SdrtError
    cfg = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", "beta_start": 0.00085,
                                     "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                     "prediction_type": "v_prediction",
                                     "timestep_spacing": "trailing",
                                     "rescale_betas_zero_snr": True})
    with pytest.raises(SdrtError, match="too close together in log sigma"):
        make_schedule(cfg, "sa_solver_linear_quadratic", 999)
