"""Tables of noise levels by name: the schedules A1111 and ComfyUI offer beyond a sampler's own.

A sampler that steps along noise levels (``request.SIGMA_SAMPLERS``) runs on any table:
sampler "X_S" is X on schedule S (``request.SIGMA_SCHEDULES``). Each function here gives the
levels a run of ``steps`` steps visits, descending, and where its last step lands (0, or for
A1111's KL Optimal the smallest training level). The model's levels are its training sigmas,
sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), ascending in t; between two timesteps a
level is interpolated in log sigma and the UNet sees the fractional timestep, as k-diffusion's
discrete-time wrapper (A1111's) does; ComfyUI feeds the nearest whole one.

Most tables have ``steps`` levels; ``ddim_uniform`` and ``comfy_beta`` may have more or
fewer (as in ComfyUI), and a run takes as many steps as its table has.
"""
import math

import numpy as np

from .errors import SdrtError
from .request import BETA_SHAPE


def log_interp(t, train):
    """The noise level at fractional timesteps ``t``: linear in log sigma between the two
    training levels around each."""
    log_train = np.log(train.astype(np.float64))
    low = np.floor(t).astype(np.int64)
    high = np.minimum(low + 1, len(train) - 1)
    w = t - low
    return np.exp((1 - w) * log_train[low] + w * log_train[high])


def _beta_ppf(q):
    try:
        from scipy import stats
    except ImportError:
        raise SdrtError("the beta schedules take the beta distribution's quantiles from scipy, "
                        "which is not installed: pip install 'sdrt[schedules]'") from None
    return stats.beta.ppf(q, *BETA_SHAPE)


def exponential(steps, lo, hi):
    """Evenly spaced in log sigma (k-diffusion's get_sigmas_exponential; A1111's Polyexponential
    at its default rho of 1 is the same)."""
    return np.exp(np.linspace(math.log(hi), math.log(lo), steps))


def normal(steps, train):
    """Timesteps evenly spaced from the last to the first, both included (ComfyUI's and A1111's
    "normal")."""
    return log_interp(np.linspace(len(train) - 1, 0, steps), train)


def sgm_uniform(steps, train):
    """``steps`` of ``steps + 1`` evenly spaced timesteps from the last to the first, the first
    left out (SGM's uniform discretisation, ComfyUI's and A1111's "sgm_uniform")."""
    return log_interp(np.linspace(len(train) - 1, 0, steps + 1)[:-1], train)


def simple(steps, train):
    """Training levels ``len(train) / steps`` apart from the top, each index truncated."""
    stride = len(train) / steps
    return np.array([train[-(1 + int(i * stride))] for i in range(steps)], dtype=np.float64)


def ddim_uniform(steps, train):
    """Every ``len(train) // steps``-th training level from timestep 1 up, descending (ComfyUI's
    "ddim_uniform", A1111's "DDIM"): ceil((T - 1) / stride) levels, not always ``steps``."""
    stride = max(len(train) // steps, 1)
    return train[1::stride][::-1].astype(np.float64)


def beta(steps, lo, hi):
    """Levels from sigma_max to sigma_min at the beta distribution's quantiles of evenly spaced
    probabilities, linear in sigma (A1111's "Beta", diffusers' use_beta_sigmas)."""
    return lo + _beta_ppf(1 - np.linspace(0, 1, steps)) * (hi - lo)


def comfy_beta(steps, train):
    """ComfyUI's "beta": the training levels at the quantiles' timesteps (rounded to the nearest,
    ``steps`` probabilities from 1 down, 0 left out), a timestep repeated next to itself once."""
    ts = np.rint(_beta_ppf(1 - np.linspace(0, 1, steps, endpoint=False)) * (len(train) - 1))
    keep = np.concatenate([[True], ts[1:] != ts[:-1]])
    return train[ts[keep].astype(np.int64)].astype(np.float64)


def _kl_optimal(fractions, lo, hi):
    """The KL-optimal schedule (Sabour et al. 2024, "Align Your Steps"): evenly spaced in
    arctan(sigma)."""
    return np.tan(fractions * math.atan(lo) + (1 - fractions) * math.atan(hi))


def kl_optimal(steps, lo, hi):
    """A1111's "KL Optimal": ``steps + 1`` levels from sigma_max to sigma_min, the last step
    landing on sigma_min."""
    return _kl_optimal(np.arange(steps + 1) / steps, lo, hi)


def comfy_kl_optimal(steps, lo, hi):
    """ComfyUI's "kl_optimal": ``steps`` levels from sigma_max to sigma_min, then a step to 0
    (one step: sigma_max, where ComfyUI divides by zero)."""
    return _kl_optimal(np.arange(steps) / max(steps - 1, 1), lo, hi)


# ComfyUI's linear_quadratic (from Genmo's Mochi): the first half of the steps falls
# linearly by this fraction of sigma_max, the rest quadratically to 0.
LINEAR_QUADRATIC_THRESHOLD = 0.025


def linear_quadratic(steps, hi):
    """ComfyUI's "linear_quadratic": ``steps`` levels, sigma_max times one minus a fraction
    that climbs linearly to ``LINEAR_QUADRATIC_THRESHOLD`` over the first ``steps // 2`` steps,
    then on the quadratic that reaches 1 (sigma 0) where the last step lands, continuing the
    line at the join; linear in sigma, not in the model's timesteps."""
    if steps == 1:
        return np.array([hi])
    lin, threshold = steps // 2, LINEAR_QUADRATIC_THRESHOLD
    quad = steps - lin
    gap = lin - threshold * steps
    a = gap / (lin * quad ** 2)
    b = threshold / lin - 2 * gap / quad ** 2
    i = np.arange(steps, dtype=np.float64)
    fraction = np.where(i < lin, i * threshold / lin, a * i * i + b * i + a * lin ** 2)
    return (1 - fraction) * hi


# ComfyUI's AlignYourStepsScheduler's levels (its NOISE_LEVELS, more digits than A1111's),
# by sdrt's schedule name
COMFY_AYS = {
    "comfy_ays_sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
                      1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662,
                      0.0291671582),
    "comfy_ays_sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
                       0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
                       0.0291671582)}


def comfy_align_your_steps(steps, table):
    """ComfyUI's AlignYourStepsScheduler: the table's levels interpolated in log sigma onto
    ``steps`` + 1 evenly spaced positions (the table itself for as many), the last dropped for
    the step to 0."""
    table = np.asarray(table, dtype=np.float64)
    if steps + 1 != len(table):
        table = _log_interp(table, steps + 1)
    return table[:-1].copy()


def align_your_steps(steps, table):
    """NVIDIA's Align Your Steps levels for the model's family (``families.Family``), A1111's
    way: as published for as many steps as the table has, else interpolated in log sigma at
    evenly spaced positions; one step starts from the top level (where A1111's interpolation
    gives the bottom one, a step from almost clean latents)."""
    table = np.asarray(table, dtype=np.float64)
    if steps == len(table):
        return table
    if steps == 1:
        return table[:1]
    return _log_interp(table, steps)


def _log_interp(table, n):
    """The descending levels ``table`` interpolated in log sigma onto ``n`` evenly spaced
    positions (both ends kept)."""
    grid = np.linspace(0, 1, len(table))
    return np.exp(np.interp(np.linspace(0, 1, n), grid, np.log(table[::-1])))[::-1].copy()


def levels(schedule, steps, train, align_your_steps_table=()):
    """Schedule ``schedule``'s noise levels for ``steps`` steps, then where the last step lands
    (float64, descending). ``train``: the model's training sigmas (float32, ascending);
    ``align_your_steps_table``: the family's published levels."""
    lo, hi = float(train[0]), float(train[-1])
    if schedule == "exponential":
        out = exponential(steps, lo, hi)
    elif schedule in ("normal", "sgm_uniform", "simple", "ddim_uniform", "comfy_beta"):
        out = globals()[schedule](steps, train)
    elif schedule in ("beta", "comfy_kl_optimal"):
        out = globals()[schedule](steps, lo, hi)
    elif schedule == "linear_quadratic":
        out = linear_quadratic(steps, hi)
    elif schedule in COMFY_AYS:
        out = comfy_align_your_steps(steps, COMFY_AYS[schedule])
    elif schedule == "kl_optimal":
        return kl_optimal(steps, lo, hi)  # its last step lands on sigma_min
    elif schedule == "align_your_steps":
        if not align_your_steps_table:
            raise SdrtError("align_your_steps needs the model family's published levels")
        out = align_your_steps(steps, align_your_steps_table)
    else:
        raise SdrtError(f"unknown sigma schedule {schedule!r}")
    return np.append(out, 0.0)
