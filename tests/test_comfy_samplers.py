"""ComfyUI's samplers that sdrt runs under their own names against its sampling loops written
out here.

uni_pc and uni_pc_bh2: UniPC (Zhao et al. 2023) predicting x0, of order min(3, steps - 1), each
update corrected with the model's output at the point it predicted (but the last), the
orders winding down at the end, along the scheduler's sigmas with the last level, 0, replaced
by 0.001 and the result divided by that level's alpha. ipndm: Adams-Bashforth of order
min(step + 1, 4) on the slope (x - x0) / sigma along the sigmas, the step to 0 landing on x0.
Both sides run the same stand-in model from the same latents; the references in float64."""
import math

import pytest
import torch

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


def test_differs_from_diffusers_unipc():
    # Order 3 and the last level: not diffusers' UniPC on the same sigmas.
    cfg = SchedulerConfig.from_dict(CONFIGS["sd15"])
    noise = _latents(1)
    out = {}
    for name in ("uni_pc_bh2_karras", "unipc_karras"):
        sched = make_schedule(cfg, name, 10)
        out[name] = sample(name, LinearModel(), sched.noise_latents(noise), sched)
    assert (out["uni_pc_bh2_karras"] - out["unipc_karras"]).abs().max() > 1e-3


def _ipndm_reference(model, x, sched):
    """ComfyUI's sample_ipndm over the schedule's calls, in float64 (VE latents)."""
    s = sched.sigmas.double()
    kind = sched.config.prediction_type
    weights = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
               4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    history = []  # slopes, newest last
    x = x.double()
    for i in range(len(s) - 1):
        c_in = 1 / (s[i] ** 2 + 1) ** 0.5
        out = model((x * c_in).float(), sched.timesteps[i]).double()
        x0 = (x - s[i] * out if kind == "epsilon" else
              out * (-s[i] * c_in) + x * c_in ** 2)  # v_prediction
        d = (x - x0) / s[i]
        order = min(4, i + 1)
        if s[i + 1] == 0:
            x = x0
        else:
            slopes = [d] + history[::-1]
            x = x + (s[i + 1] - s[i]) * sum(w * g for w, g in zip(weights[order], slopes))
        history = (history + [d])[-3:]
    return x


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (3, 1.0), (7, 1.0), (12, 0.5)])
@pytest.mark.parametrize("sampler", ["ipndm", "ipndm_karras", "ipndm_simple", "ipndm_beta"])
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_ipndm_matches_comfyuis_loop(sampler, steps, strength, config):
    if sampler.endswith("beta"):  # (its quantiles)
        pytest.importorskip("scipy")
    cfg = SchedulerConfig.from_dict(CONFIGS[config])
    sched = make_schedule(cfg, sampler, steps, strength)
    noise = _latents(steps)
    x = sched.noise_latents(noise) if strength == 1 else sched.noise_image(_latents(99), noise)
    theirs = _ipndm_reference(LinearModel(), x, sched)
    model = LinearModel()
    ours = torch.full_like(noise, math.nan)
    ours.copy_(sample(sampler, model, x, sched))
    assert len(model.calls) == len(sched.timesteps)
    scale = max(1.0, theirs.abs().max().item())
    err = (ours.double() - theirs).abs().max().item()
    assert err <= 1e-5 * scale, f"{sampler}, {steps} steps: max abs diff {err:.3g}"
