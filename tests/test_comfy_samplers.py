"""ComfyUI's samplers that sdrt runs under their own names against its sampling loops written
out here.

uni_pc and uni_pc_bh2: UniPC (Zhao et al. 2023) predicting x0, of order min(3, steps - 1), each
update corrected with the model's output at the point it predicted (but the last), the
orders winding down at the end, along the scheduler's sigmas with the last level, 0, replaced
by 0.001 and the result divided by that level's alpha. The samplers on Euler's levels
(ipndm, ipndm_v, gradient_estimation, deis, res_multistep, res_multistep_ancestral, ddpm,
er_sde, and the CFG++ ones euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2m_cfg_pp,
res_multistep_cfg_pp, res_multistep_ancestral_cfg_pp, gradient_estimation_cfg_pp on a
stand-in with an unconditional half): each loop as ComfyUI's k_diffusion/sampling.py steps
it, in sigmas, the steps counted from the run's first.
Both sides run the same stand-in model from the same latents (and, for the stochastic ones,
the same unit noise); the references in float64."""
import math

import numpy as np
import pytest
import torch

from sdrt.engine.request import sampler_family
from sdrt.engine.samplers import SchedulerConfig, make_schedule, sample
from test_samplers import CONFIGS, LinearModel, _latents


def _reference(model, x, sched, variant):
    """ComfyUI's sample_unipc over the schedule's calls (timesteps and sigmas), in float64."""
    s = sched.sigmas.double().clone()
    s[-1] = 0.001 if s[-1] == 0 else s[-1]
    alpha = 1 / torch.sqrt(1 + s ** 2)
    sig = s * alpha
    lam = torch.log(alpha) - torch.log(sig)
    steps = len(s) - 1
    order = min(3, steps - 1)
    kind = sched.config.prediction_type

    def x0_of(x, i):  # the model's clean latents at call i (VP latents x)
        out = model(x.float(), sched.timesteps[i]).double()
        if kind == "epsilon":
            return (x - sig[i] * out) / alpha[i]
        return alpha[i] * x - sig[i] * out  # v_prediction

    def update(x, history, t, k, correct):
        """From the newest point of ``history`` [(index, x0), ...] to level ``t`` at order k."""
        p0, m0 = history[-1]
        h = lam[t] - lam[p0]
        rks, d1s = [], []
        for i in range(1, k):
            pi, mi = history[-(i + 1)]
            rk = (lam[pi] - lam[p0]) / h
            rks.append(rk)
            d1s.append((mi - m0) / rk)
        rks.append(torch.tensor(1.0, dtype=torch.float64))
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for i in range(1, k + 1):
            rows.append(torch.stack(rks) ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, b = torch.stack(rows), torch.stack(b)
        base = sig[t] / sig[p0] * x - alpha[t] * h_phi_1 * m0
        pred = 0
        if d1s:
            rho_p = (torch.tensor([0.5], dtype=torch.float64) if k == 2 else
                     torch.linalg.solve(r[:-1, :-1], b[:-1]))
            pred = sum(c * d for c, d in zip(rho_p, d1s))
        x_t = base - alpha[t] * b_h * pred
        if not correct:
            return x_t, None
        m_t = x0_of(x_t, t)
        rho_c = (torch.tensor([0.5], dtype=torch.float64) if k == 1 else
                 torch.linalg.solve(r, b))
        corr = sum(c * d for c, d in zip(rho_c[:-1], d1s)) if d1s else 0
        return base - alpha[t] * b_h * (corr + rho_c[-1] * (m_t - m0)), m_t

    x = x.double()
    history = [(0, x0_of(x, 0))]
    for step in range(1, steps + 1):
        k = min(step, order, steps + 1 - step)  # warm up, then wind down
        x, m = update(x, history, step, k, correct=step < steps)
        if m is not None:
            history = (history + [(step, m)])[-order:]
    return x / alpha[-1]


@pytest.mark.parametrize("steps", [2, 3, 5, 12])
@pytest.mark.parametrize("sampler", ["uni_pc_normal", "uni_pc_bh2_karras", "uni_pc_bh2_simple",
                                     "uni_pc_karras"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_matches_comfyuis_loop(sampler, steps, config):
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps)
    assert float(sched.sigmas[-1]) == 0 and len(sched.timesteps) == steps
    noise = _latents(steps)
    theirs = _reference(LinearModel(), sched.noise_latents(noise).double(), sched,
                        "bh2" if "bh2" in sampler else "bh1")
    model = LinearModel()
    ours = torch.full_like(noise, math.nan)
    ours.copy_(sample(sampler, model, sched.noise_latents(noise), sched))
    assert len(model.calls) == steps
    scale = max(1.0, theirs.abs().max().item())
    err = (ours.double() - theirs).abs().max().item()
    assert err <= 1e-5 * scale, f"{sampler}, {steps} steps: max abs diff {err:.3g}"


@pytest.mark.parametrize("comfy_name,sdrt_name,diffusers_name", [
    # Order 3 and the last level: not diffusers' UniPC on the same sigmas.
    ("uni_pc_bh2", "uni_pc_bh2_karras", "unipc_karras"),
    # ComfyUI's deis (tAB, EDM's VP SDE): not diffusers' DEIS (sdrt's deis).
    ("deis", "comfy_deis_karras", "deis_karras")])
def test_differs_from_diffusers(comfy_name, sdrt_name, diffusers_name):
    # A workflow naming ComfyUI's sampler runs ComfyUI's, which differs from the diffusers
    # scheduler of a like name on the same levels.
    from sdrt.engine import comfy
    assert comfy.SAMPLERS[(comfy_name, "karras")] == sdrt_name
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    noise = _latents(1)
    out = {}
    for name in (sdrt_name, diffusers_name):
        sched = make_schedule(cfg, name, 10)
        out[name] = sample(name, LinearModel(), sched.noise_latents(noise), sched)
    assert (out[sdrt_name] - out[diffusers_name]).abs().max() > 1e-3


def _ipndm(denoise, x, s, noise):
    weights = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
               4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    history = []  # slopes, newest last
    for i in range(len(s) - 1):
        x0 = denoise(x, i)
        d = (x - x0) / s[i]
        if s[i + 1] == 0:
            x = x0
        else:
            slopes = [d] + history[::-1]
            x = x + (s[i + 1] - s[i]) * sum(w * g for w, g in zip(weights[min(4, i + 1)],
                                                                  slopes))
        history = (history + [d])[-3:]
    return x


def _ipndm_v(denoise, x, s, noise):
    buf = []  # slopes, newest last
    for i in range(len(s) - 1):
        x0 = denoise(x, i)
        d = (x - x0) / s[i]
        order = min(4, i + 1)
        hn = s[i + 1] - s[i]
        if s[i + 1] == 0:
            new = x0
        elif order == 1:
            new = x + hn * d
        elif order == 2:
            hn1 = s[i] - s[i - 1]
            new = x + hn * ((2 + hn / hn1) / 2 * d - (hn / hn1) / 2 * buf[-1])
        elif order == 3:
            hn1, hn2 = s[i] - s[i - 1], s[i - 1] - s[i - 2]
            temp = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
            c1 = (2 + (hn / hn1)) / 2 + temp
            c2 = -(hn / hn1) / 2 - (1 + hn1 / hn2) * temp
            c3 = temp * hn1 / hn2
            new = x + hn * (c1 * d + c2 * buf[-1] + c3 * buf[-2])
        else:
            hn1, hn2, hn3 = s[i] - s[i - 1], s[i - 1] - s[i - 2], s[i - 2] - s[i - 3]
            t1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
            t2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1)))
                  * hn / (6 * (hn + hn1 + hn2))) \
                * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
            q = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
            c1 = (2 + (hn / hn1)) / 2 + t1 + t2
            c2 = -(hn / hn1) / 2 - (1 + hn1 / hn2) * t1 - (1 + (hn1 / hn2) + q) * t2
            c3 = t1 * hn1 / hn2 + ((hn1 / hn2) + q * (1 + hn2 / hn3)) * t2
            c4 = -t2 * q * hn1 / hn2
            new = x + hn * (c1 * d + c2 * buf[-1] + c3 * buf[-2] + c4 * buf[-3])
        buf = (buf + [d])[-3:]
        x = new
    return x


def _gradient_estimation(denoise, x, s, noise, gamma=2.0, cfg_pp=False):
    old_d = None
    for i in range(len(s) - 1):
        x0, x0u = denoise(x, i, uncond=True) if cfg_pp else (denoise(x, i), None)
        d = (x - (x0u if cfg_pp else x0)) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x0
        else:
            x = x0 + d * s[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def _deis_coefficients(s, max_order=3, n=10000):
    """zju-pi's tAB DEIS weights over sigmas s (EDM's default range's VP SDE), the integrand
    from autograd as theirs."""
    eps_s, smin, smax = 1e-3, torch.tensor(0.002, dtype=torch.float64), \
        torch.tensor(80.0, dtype=torch.float64)
    beta_d = 2 * (torch.log(smin ** 2 + 1) / eps_s - torch.log(smax ** 2 + 1)) / (eps_s - 1)
    beta_min = torch.log(smax ** 2 + 1) - 0.5 * beta_d
    t = ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    b0, b1 = beta_min, beta_d + beta_min
    out = []
    for i in range(len(s) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), n, dtype=torch.float64)
        dtau = (t[i + 1] - t[i]) / n
        prev = t[[i - k for k in range(order)]]
        taus_g = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus_g ** 2 * (b1 - b0) - taus_g * b0)
        alpha.log().sum().backward()
        integrand = -0.5 * taus_g.grad / torch.sqrt(alpha.detach() * (1 - alpha.detach()))
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(torch.sum(integrand * poly) * dtau)
        out.append(row)
    return out


def _deis(denoise, x, s, noise):
    coefficients = _deis_coefficients(s)
    buf = []
    for i in range(len(s) - 1):
        x0 = denoise(x, i)
        d = (x - x0) / s[i]
        order = 1 if s[i + 1] <= 0 else min(3, i + 1)
        if order == 1:
            new = x + (s[i + 1] - s[i]) * d
        else:
            c = coefficients[i]
            new = x + c[0] * d + sum(c[k] * buf[-k] for k in range(1, order))
        buf = (buf + [d])[-2:]
        x = new
    return x


def _ancestral_step(s_from, s_to, eta):
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
    return (s_to ** 2 - up ** 2) ** 0.5, up


def _res_multistep(denoise, x, s, noise, eta=0.0, cfg_pp=False):
    t_fn = lambda sigma: -torch.log(sigma)  # noqa: E731
    phi1 = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2 = lambda t: (phi1(t) - 1.0) / t  # noqa: E731
    old_down = old_x0 = None
    for i in range(len(s) - 1):
        x0, x0u = denoise(x, i, uncond=True) if cfg_pp else (denoise(x, i), None)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        down = torch.as_tensor(down, dtype=torch.float64)
        if (down == 0 or old_x0 is None) and cfg_pp:
            x = x0 + (x - x0u) / s[i] * down
        elif down == 0 or old_x0 is None:
            x = x + (x - x0) / s[i] * (down - s[i])
        else:
            t, t_old, t_next, t_prev = t_fn(s[i]), t_fn(old_down), t_fn(down), t_fn(s[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = torch.nan_to_num(phi1(-h) - phi2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2(-h) / c2, nan=0.0)
            if cfg_pp:
                x = x + (x0 - x0u)
                x = torch.exp(-h) * x + h * (b1 * x0u + b2 * old_x0)
            else:
                x = torch.exp(-h) * x + h * (b1 * x0 + b2 * old_x0)
        if s[i + 1] > 0 and eta:
            x = x + noise[i] * up
        old_x0, old_down = (x0u if cfg_pp else x0), down
    return x


def _euler_cfg_pp(denoise, x, s, noise, eta=0.0):
    for i in range(len(s) - 1):
        x0, x0u = denoise(x, i, uncond=True)
        if s[i + 1] == 0:
            x = x0
        else:
            alpha_s = s[i] * torch.exp(-torch.log(s[i]))  # sigma e^(half log SNR): 1
            alpha_t = s[i + 1] * torch.exp(-torch.log(s[i + 1]))
            d = (x - alpha_s * x0u) / s[i]
            down, up = _ancestral_step(s[i] / alpha_s, s[i + 1] / alpha_t, eta)
            x = alpha_t * x0 + alpha_t * down * d
            if eta:
                x = x + alpha_t * noise[i] * up
    return x


def _dpmpp_2m_cfg_pp(denoise, x, s, noise):
    old_x0u = None
    for i in range(len(s) - 1):
        x0, x0u = denoise(x, i, uncond=True)
        t, t_next = -torch.log(s[i]), -torch.log(s[i + 1])
        h = t_next - t
        if old_x0u is None or s[i + 1] == 0:
            mix = -torch.exp(-h) * x0u
        else:
            r = (t + torch.log(s[i - 1])) / h
            mix = -torch.exp(-h) * x0u - torch.expm1(-h) * (1 / (2 * r)) * (x0 - old_x0u)
        x = x0 + mix + torch.exp(-h) * x
        old_x0u = x0u
    return x


def _ddpm(denoise, x, s, noise):
    for i in range(len(s) - 1):
        x0 = denoise(x, i)
        eps = (x - x0) / s[i]
        xv = x / torch.sqrt(1.0 + s[i] ** 2)
        a, a_prev = 1 / (s[i] ** 2 + 1), 1 / (s[i + 1] ** 2 + 1)
        alpha = a / a_prev
        mu = (1.0 / alpha).sqrt() * (xv - (1 - alpha) * eps / (1 - a).sqrt())
        if s[i + 1] > 0:
            mu = mu + ((1 - alpha) * (1. - a_prev) / (1. - a)).sqrt() * noise[i]
            mu = mu * torch.sqrt(1.0 + s[i + 1] ** 2)
        x = mu
    return x


def _er_sde(denoise, x, s, noise):
    scaler = lambda v: v * ((v ** 0.3).exp() + 10.0)  # noqa: E731
    points = torch.arange(0, 200.0, dtype=torch.float64)
    lam = s  # sigma / alpha, alpha = 1
    old_x0 = old_dd = None
    for i in range(len(s) - 1):
        x0 = denoise(x, i)
        stage = min(3, i + 1)
        if s[i + 1] == 0:
            x = x0
        else:
            ls, lt = lam[i], lam[i + 1]
            r = scaler(lt) / scaler(ls)
            x = r * x + (1 - r) * x0
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200.0
                pos = lt + points * step
                scaled = scaler(pos)
                integral = torch.sum(1 / scaled) * step
                dd = (x0 - old_x0) / (ls - lam[i - 1])
                x = x + (dt + integral * scaler(lt)) * dd
                if stage >= 3:
                    integral_u = torch.sum((pos - ls) / scaled) * step
                    du = (dd - old_dd) / ((ls - lam[i - 2]) / 2)
                    x = x + ((dt ** 2) / 2 + integral_u * scaler(lt)) * du
                old_dd = dd
            x = x + noise[i] * (lt ** 2 - ls ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old_x0 = x0
    return x


REFERENCES = {"ipndm": _ipndm, "ipndm_v": _ipndm_v, "gradient_estimation": _gradient_estimation,
              "comfy_deis": _deis, "res_multistep": _res_multistep,
              "res_multistep_a": lambda *a: _res_multistep(*a, eta=1.0), "ddpm": _ddpm,
              "er_sde": _er_sde, "cfgpp_euler": _euler_cfg_pp,
              "cfgpp_euler_a": lambda *a: _euler_cfg_pp(*a, eta=1.0),
              "cfgpp_dpmpp_2m": _dpmpp_2m_cfg_pp,
              "cfgpp_res_multistep": lambda *a: _res_multistep(*a, cfg_pp=True),
              "cfgpp_res_multistep_a": lambda *a: _res_multistep(*a, eta=1.0, cfg_pp=True),
              "cfgpp_gradient_estimation": lambda *a: _gradient_estimation(*a, cfg_pp=True)}


class GuidedModel:
    """A stand-in for the guided UNet of the CFG++ samplers: two stand-in UNets, the guided
    output and the unconditional half's (``uncond=True`` returns both)."""

    def __init__(self):
        self.guided, self.negative = LinearModel(seed=0), LinearModel(seed=1)
        self.calls = self.guided.calls

    def __call__(self, x, t, uncond=False):
        out = self.guided(x, t)
        return (out, self.negative(x, t)) if uncond else out


def _comfy_loop(family, model, x, sched, noise):
    """ComfyUI's loop of ``family`` over the schedule's calls, in float64 (VE latents)."""
    s = sched.sigmas.double()
    kind = sched.config.prediction_type

    def denoise(x, i, uncond=False):
        c_in = 1 / (s[i] ** 2 + 1) ** 0.5
        outs = model((x * c_in).float(), sched.timesteps[i], **({"uncond": True} if uncond
                                                                 else {}))
        x0s = [(x - s[i] * out.double() if kind == "epsilon" else
                out.double() * (-s[i] * c_in) + x * c_in ** 2)  # v_prediction
               for out in (outs if uncond else (outs,))]
        return tuple(x0s) if uncond else x0s[0]
    return REFERENCES[family](denoise, x.double(), s, None if noise is None else noise.double())


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (3, 1.0), (7, 1.0), (12, 0.5)])
@pytest.mark.parametrize("sampler", ["ipndm", "ipndm_karras", "ipndm_simple", "ipndm_beta",
                                     "ipndm_v", "ipndm_v_karras", "gradient_estimation",
                                     "gradient_estimation_sgm_uniform", "comfy_deis",
                                     "comfy_deis_karras", "res_multistep", "res_multistep_karras",
                                     "res_multistep_a", "res_multistep_a_exponential", "ddpm",
                                     "ddpm_karras", "er_sde", "er_sde_karras", "er_sde_normal",
                                     "cfgpp_euler", "cfgpp_euler_a_karras", "cfgpp_dpmpp_2m",
                                     "cfgpp_dpmpp_2m_karras", "cfgpp_res_multistep_simple",
                                     "cfgpp_res_multistep_a", "cfgpp_gradient_estimation",
                                     "cfgpp_gradient_estimation_beta"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_matches_comfyuis_loops(sampler, steps, strength, config):
    if sampler.endswith("beta"):  # (its quantiles)
        pytest.importorskip("scipy")
    family = sampler_family(sampler)
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps, strength)
    noise = _latents(steps)
    x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(_latents(99), noise)
    draws = None
    if sched.noise_draws:
        g = torch.Generator().manual_seed(steps)
        draws = torch.randn((sched.noise_draws, *x.shape), generator=g)
    stand_in = GuidedModel if sampler.startswith("cfgpp_") else LinearModel
    theirs = _comfy_loop(family, stand_in(), x, sched, draws)
    model = stand_in()
    ours = torch.full_like(noise, math.nan)
    ours.copy_(sample(sampler, model, x, sched, noise=draws))
    assert len(model.calls) == len(sched.timesteps)
    scale = max(1.0, theirs.abs().max().item())
    err = (ours.double() - theirs).abs().max().item()
    assert err <= 1e-5 * scale, f"{sampler}, {steps} steps: max abs diff {err:.3g}"


@pytest.mark.parametrize("sampler", ["res_multistep_a", "ddpm", "er_sde", "cfgpp_euler_a",
                                     "cfgpp_res_multistep_a"])
def test_stochastic_ones_draw_noise_from_the_generator(sampler):
    # Two generators seeded alike give one picture, another seed another: the noise is drawn
    # (and each step's weighs in).
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    sched = make_schedule(cfg, sampler, 6)
    x = sched.noise_latents(_latents(1))
    model = GuidedModel()
    a, b, c = (sample(sampler, model, x, sched, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ipndm_v_is_adams_bashforth_on_even_steps_up_to_order_3():
    # On evenly spaced levels ipndm_v's weights of orders 1-3 are ipndm's (Adams-Bashforth);
    # its order-4 ones are ComfyUI's own.
    from sdrt.engine.comfy_samplers import ipndm, ipndm_v
    sigmas = torch.linspace(10.0, 1.0, 10, dtype=torch.float64)
    (even, orders), (ab, _) = ipndm_v(sigmas, 0), ipndm(sigmas, 0)
    assert orders == (1, 2, 3) + (4,) * 6
    np.testing.assert_allclose(even[:3], ab[:3], rtol=1e-12)
    assert np.abs(even[3:] - ab[3:]).max() > 1e-3
