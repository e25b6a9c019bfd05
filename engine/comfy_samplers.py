"""The per-step weights of ComfyUI's samplers that sdrt runs with its own loops.

Each of these samplers steps along a table of noise levels (``sigmas``, variance-exploding
latents x = x0 + sigma eps, as k-diffusion's), and each of its steps is linear in what the
loop holds. So the schedule carries one row of weights per step, solved here on the host in
float64, and a captured CUDA graph replays the steps without a host decision:

- on the slope d = (x - x0) / sigma (``samplers.sample_lms``: x + sum_k w_k d_k, newest
  first; rows of 4, with how many are used): ``ipndm``, ``ipndm_v``, ``gradient_estimation``
  and
  ``comfy_deis`` (ComfyUI's ``deis``, which is not diffusers' DEIS that sdrt's ``deis`` runs);
- on the clean latents (``samplers.sample_x0_multistep``: a x + b x0 + u x0u + b1 h' + b2 h''
  + c z, where x0u is the unconditional half's clean latents, h' and h'' the two steps
  before's x0 (x0u for the CFG++ ones), z fresh unit noise; rows of 6): ``res_multistep``,
  ``res_multistep_a`` (ComfyUI's ``res_multistep_ancestral``), ``ddpm``, ``er_sde``, and
  the CFG++ samplers (Chung et al. 2024, as ComfyUI's ``*_cfg_pp``: the step renoises along
  the unconditional prediction) ``cfgpp_euler``, ``cfgpp_euler_a``, ``cfgpp_dpmpp_2m``,
  ``cfgpp_res_multistep``, ``cfgpp_res_multistep_a`` and ``cfgpp_gradient_estimation``
  (whose history is of the unconditional slope (x - x0u) / sigma instead).

- over several calls a step (``samplers.sample_stages``: each point a weighed sum of the
  step's start, its calls' x0s and the noise drawn after them; ``STAGES``): ``dpm_fast``
  (k-diffusion's DPM-Solver-Fast, which ComfyUI runs at eta 0), ``dpm_fast_a`` (the same at
  eta 1, A1111's "DPM fast"), ``heunpp2``, ``seeds_2`` and ``seeds_3``;
- SA-Solver's predictor and corrector (``samplers.sample_sa_solver``: ``sa_solver``, rows of
  13): ``sa_solver`` and ``sa_solver_pece``.

Steps count from the run's first (an image-to-image run starts part way down the levels), as
ComfyUI counts the sigmas it is handed; a step to sigma 0 lands on the clean latents.
"""
import math

import numpy as np

from .errors import SdrtError


def _slopes_table(sigmas, start, weights):
    """Rows of ``weights(s, g, j)`` (the slope weights of step j, at level g of ``s``), times
    the step's length in sigma, for ``sample_lms``; a step to 0 is x0 (weight 1 on d, times
    -sigma)."""
    s = sigmas.double().numpy()
    n = len(s) - 1
    table, orders = np.zeros((n - start, 4)), []
    for j in range(n - start):
        g = start + j
        w = [1.0] if s[g + 1] == 0 else weights(s, g, j)
        table[j, :len(w)] = np.asarray(w) * (s[g + 1] - s[g])
        orders.append(len(w))
    return table, tuple(orders)


# Adams-Bashforth's weights of the newest slope and the older ones, by order
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(sigmas, start):
    """ComfyUI's ipndm (Zhang & Chen 2023's improved PNDM, its ``sample_ipndm``):
    Adams-Bashforth of order min(step + 1, 4) on the slopes."""
    return _slopes_table(sigmas, start, lambda s, g, j: ADAMS_BASHFORTH[min(j + 1, 4)])


def ipndm_v(sigmas, start):
    """ComfyUI's ipndm_v (Zhang & Chen's iPNDM for uneven steps): Adams-Bashforth-like weights
    of up to four slopes from the lengths of the step (h) and of the three before it (h1, h2,
    h3); at even steps orders 1 to 3 are Adams-Bashforth's. Its order-4 weights are ComfyUI's
    as they are (they are not Adams-Bashforth's at even steps): this reproduces its
    pictures."""
    def weights(s, g, j):
        order = min(j + 1, 4)
        if order == 1:
            return [1.0]
        h, h1 = s[g + 1] - s[g], s[g] - s[g - 1]
        r = h / h1
        if order == 2:
            return [1 + r / 2, -r / 2]
        h2 = s[g - 1] - s[g - 2]
        t1 = (1 - h * h / (3 * h1 * (h1 + h2))) / 2
        if order == 3:
            return [1 + r / 2 + t1, -r / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
        h3 = s[g - 2] - s[g - 3]
        t2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
              * h * (h + h1) * (h + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        return [1 + r / 2 + t1 + t2,
                -r / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
                t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
                -t2 * q * h1 / h2]
    return _slopes_table(sigmas, start, weights)


# ComfyUI's sample_gradient_estimation's default gamma (Permenter & Yuan 2024)
GRADIENT_ESTIMATION_GAMMA = 2.0


def gradient_estimation(sigmas, start, gamma=GRADIENT_ESTIMATION_GAMMA):
    """ComfyUI's gradient_estimation: Euler's step with the slope extrapolated by gamma - 1
    times its change since the step before (from the run's second step)."""
    return _slopes_table(sigmas, start,
                         lambda s, g, j: [1.0] if j == 0 else [gamma, 1 - gamma])


# ComfyUI's deis (the "tAB" DEIS of Zhang & Chen 2023, as zju-pi's diff-sampler computes it):
# the sigmas go to the time of a VP SDE fitted to EDM's default range, the weights are the
# integrals of the Lagrange polynomials through the last steps' times against the SDE's
# integrand, summed at this many points, up to this order.
DEIS_SIGMA_RANGE = (0.002, 80.0)
DEIS_EPS_S = 1e-3
DEIS_POINTS = 10000
DEIS_ORDER = 3


def _deis_vp():
    """(beta_0, beta_1) of the VP SDE whose sigma runs over ``DEIS_SIGMA_RANGE`` on
    [DEIS_EPS_S, 1]."""
    lo, hi = (np.log(s * s + 1) for s in DEIS_SIGMA_RANGE)
    beta_d = 2 * (lo / DEIS_EPS_S - hi) / (DEIS_EPS_S - 1)
    beta_min = hi - 0.5 * beta_d
    return beta_min, beta_min + beta_d


def comfy_deis(sigmas, start):
    """ComfyUI's deis: slope weights of order min(step + 1, 3), each the sum over
    ``DEIS_POINTS`` even points of the step in VP time of the SDE's integrand times a Lagrange
    basis polynomial, times the point spacing (ComfyUI's quadrature)."""
    b0, b1 = _deis_vp()
    s = sigmas.double().numpy()
    # sigma -> VP time: the root of sigma^2 + 1 = exp(b0 t + (b1 - b0) t^2 / 2)
    times = (np.sqrt(b0 * b0 + 2 * (b1 - b0) * np.log(s * s + 1)) - b0) / (b1 - b0)

    def weights(_, g, j):
        order = min(j + 1, DEIS_ORDER)
        if order == 1:
            return [1.0]
        taus = np.linspace(times[g], times[g + 1], DEIS_POINTS)
        alpha = np.exp(-0.5 * taus * taus * (b1 - b0) - taus * b0)
        integrand = 0.5 * (taus * (b1 - b0) + b0) / np.sqrt(alpha * (1 - alpha))
        nodes = times[[g - k for k in range(order)]]
        dtau = (times[g + 1] - times[g]) / DEIS_POINTS
        out = []
        for k in range(order):
            basis = np.ones_like(taus)
            for m in range(order):
                if m != k:
                    basis *= (taus - nodes[m]) / (nodes[k] - nodes[m])
            out.append(np.sum(integrand * basis) * dtau)
        # (_slopes_table multiplies by the step in sigma: these weights are absolute)
        return np.asarray(out) / (s[g + 1] - s[g])
    return _slopes_table(sigmas, start, weights)


def _x0_table(sigmas, start, row):
    """Rows (a, b, u, b1, b2, c) of ``row(s, g, j)`` for ``sample_x0_multistep``; a step to 0
    is x0."""
    s = sigmas.double().numpy()
    n = len(s) - 1
    table = np.zeros((n - start, 6))
    for j in range(n - start):
        g = start + j
        table[j] = (0, 1, 0, 0, 0, 0) if s[g + 1] == 0 else row(s, g, j)
    return table


def _ancestral(sigma, sigma_next, eta):
    """k-diffusion's ancestral split of a step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next,
             eta * np.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return np.sqrt(sigma_next ** 2 - up ** 2), up


def res_multistep(sigmas, start, eta=0.0, cfg_pp=False):
    """ComfyUI's res_multistep (eta 0) and res_multistep_ancestral (eta 1): the second-order
    exponential multistep of Zhang et al. 2023 ("RES") in log sigma, the clean latents of this
    step and the one before weighed by phi functions of the step; the first step Euler's. The
    ancestral one steps to sigma_down and adds noise of std sigma_up. ``cfg_pp`` (their
    ``_cfg_pp`` forms): the guidance's difference x0 - x0u is added to the latents, and the
    step runs on the unconditional x0u (its history too)."""
    def row(s, g, j):
        down, up = _ancestral(s[g], s[g + 1], eta)
        r = down / s[g]
        if down == 0 or j == 0:
            return (r, 1, -r, 0, 0, up) if cfg_pp else (r, 1 - r, 0, 0, 0, up)
        down_before, _ = _ancestral(s[g - 1], s[g], eta)
        h = np.log(s[g]) - np.log(down)
        c2 = (np.log(down_before) - np.log(s[g - 1])) / h
        phi1 = np.expm1(-h) / -h
        phi2 = (phi1 - 1) / -h
        with np.errstate(divide="ignore", invalid="ignore"):
            b1, b2 = np.nan_to_num(phi1 - phi2 / c2, nan=0.0), np.nan_to_num(phi2 / c2, nan=0.0)
        if cfg_pp:  # e^-h (x + x0 - x0u) + h (b1 x0u + b2 x0u')
            return (np.exp(-h), np.exp(-h), h * b1 - np.exp(-h), h * b2, 0, up)
        return (np.exp(-h), h * b1, 0, h * b2, 0, up)
    return _x0_table(sigmas, start, row)


def cfgpp_euler(sigmas, start, eta=0.0):
    """ComfyUI's euler_cfg_pp (eta 0) and euler_ancestral_cfg_pp (eta 1): from the guided x0,
    renoised to sigma_down along the unconditional prediction's noise (x - x0u) / sigma, then
    noise of std sigma_up."""
    def row(s, g, _):
        down, up = _ancestral(s[g], s[g + 1], eta)
        return (down / s[g], 1, -down / s[g], 0, 0, up)
    return _x0_table(sigmas, start, row)


def cfgpp_gradient_estimation(sigmas, start, gamma=GRADIENT_ESTIMATION_GAMMA):
    """ComfyUI's gradient_estimation_cfg_pp: from the guided x0 along the unconditional
    slope d = (x - x0u) / sigma, plus gamma - 1 times its change since the step before, times
    the step (its history holds that slope: ``SLOPE_HISTORY``)."""
    def row(s, g, j):
        r, extra = s[g + 1] / s[g], 0 if j == 0 else (gamma - 1) * (s[g + 1] - s[g])
        return (r + extra / s[g], 1, -r - extra / s[g], -extra, 0, 0)
    return _x0_table(sigmas, start, row)


def cfgpp_dpmpp_2m(sigmas, start):
    """ComfyUI's dpmpp_2m_cfg_pp: DPM-Solver++(2M) with the guided x0 as the step's target
    and the unconditional x0u where the latents' own noise is taken out, the second-order
    term the difference from the last step's x0u."""
    def row(s, g, j):
        e = s[g + 1] / s[g]  # e^-h
        if j == 0:
            return (e, 1, -e, 0, 0, 0)
        r = (np.log(s[g - 1]) - np.log(s[g])) / (np.log(s[g]) - np.log(s[g + 1]))
        k = np.expm1(np.log(e)) / (2 * r)
        return (e, 1 - k, -e, k, 0, 0)
    return _x0_table(sigmas, start, row)


def ddpm(sigmas, start):
    """ComfyUI's ddpm: DDPM's ancestral step (Ho et al. 2020, eq. 11 with sigma_t^2 = beta
    tilde) between the alpha-bars of the two levels, on the variance-preserving latents."""
    def row(s, g, _):
        abar, abar_next = 1 / (s[g] ** 2 + 1), 1 / (s[g + 1] ** 2 + 1)
        alpha = abar / abar_next
        # eps = (x - x0) / sigma; mean = (x_vp - (1 - alpha) eps / sqrt(1 - abar)) / sqrt(alpha)
        k = (1 - alpha) / (np.sqrt(alpha) * np.sqrt(1 - abar) * s[g])
        back = np.sqrt(1 + s[g + 1] ** 2)  # to the next level's variance-exploding latents
        std = np.sqrt((1 - alpha) * (1 - abar_next) / (1 - abar))
        return ((np.sqrt(abar / alpha) - k) * back, k * back, 0, 0, 0, std * back)
    return _x0_table(sigmas, start, row)


# ER-SDE-Solver-3 (Cui et al. 2023) as ComfyUI's sample_er_sde runs it: its default noise
# scaler and the points of its integrals over a step.
ER_SDE_POINTS = 200


def _er_sde_scaler(x):
    return x * (np.exp(x ** 0.3) + 10.0)


def er_sde(sigmas, start):
    """ComfyUI's er_sde (VP ER-SDE-Solver-3, sigma its lambda): the first-order update scaled
    by the noise scaler's ratio r, then the first and second divided differences of the clean
    latents over sigma, weighed by integrals of the scaler summed at ``ER_SDE_POINTS``
    points (from the third step: stage 3); fresh noise of std sqrt(sigma'^2 - sigma^2 r^2)."""
    def row(s, g, j):
        sig, nxt = s[g], s[g + 1]
        r = _er_sde_scaler(nxt) / _er_sde_scaler(sig)
        b = [1 - r, 0.0, 0.0]
        stage = min(3, j + 1)
        if stage >= 2:
            dt = nxt - sig
            step = -dt / ER_SDE_POINTS
            pos = nxt + np.arange(ER_SDE_POINTS) * step
            scaled = _er_sde_scaler(pos)
            w = (dt + np.sum(1 / scaled) * step * _er_sde_scaler(nxt)) / (sig - s[g - 1])
            b[0] += w
            b[1] -= w  # (x0 - x0') / (sigma - sigma')
            if stage == 3:
                w3 = ((dt * dt / 2 + np.sum((pos - sig) / scaled) * step * _er_sde_scaler(nxt))
                      * 2 / (sig - s[g - 2]))
                # ((x0 - x0') / (sigma - sigma') - (x0' - x0'') / (sigma' - sigma'')) * w3
                d0, d1 = 1 / (sig - s[g - 1]), 1 / (s[g - 1] - s[g - 2])
                b[0] += w3 * d0
                b[1] -= w3 * (d0 + d1)
                b[2] += w3 * d1
        std = np.sqrt(max(nxt * nxt - sig * sig * r * r, 0.0))
        return (r, b[0], 0, b[1], b[2], std)
    return _x0_table(sigmas, start, row)


# --- samplers of several calls a step (``samplers.sample_stages``) ---------------------------
#
# A step starts from latents x and makes up to three calls, call k at latents u_k (u_0 = x)
# and level sigma_k predicting x0_k; the point after call k (the next call's latents, or the
# step's end) is a x + b_0 x0_0 + ... + b_k x0_k + c_0 z_0 + ... + c_k z_k, z_j the unit
# noise drawn after call j (for the calls that draw). A layout is the calls' levels, a row
# (a, b_0, b_1, b_2, c_0, c_1, c_2) per call, which calls end a step and which draw noise,
# and where the last step lands. Samplers written on the slopes d_k = (u_k - x0_k) / sigma_k
# give rows on x and the slopes (``_from_slopes`` rewrites them).
STAGE_WIDTH = 7


def _from_slopes(inputs, rows, ends, noise=None):
    """Rows (a, w_0, w_1, w_2) of points a x + w_0 d_0 + ... on the step's slopes, and fresh
    noise of std ``noise[i]`` after the calls i it names, as rows on x, the x0s and the noises
    (see above); returns (rows, which calls draw)."""
    noise = noise or {}
    basis = np.eye(STAGE_WIDTH)
    out, draws = [], []
    for i, row in enumerate(rows):
        if i == 0 or ends[i - 1]:
            start, points = i, [basis[0]]  # points[j]: the latents of the step's call j
        k = i - start
        point = row[0] * basis[0]
        for j in range(k + 1):
            point = point + row[1 + j] * (points[j] - basis[1 + j]) / inputs[start + j]
        if i in noise:
            point = point + noise[i] * basis[4 + k]
        draws.append(i in noise)
        points.append(point)
        out.append(point)
    return np.array(out), tuple(draws)


def dpm_fast(sigmas, eta=0.0):
    """k-diffusion's DPM-Solver-Fast (Lu et al. 2022, "DPM-Solver", sec. 3.4; its
    ``sample_dpm_fast``, A1111's "DPM fast" and ComfyUI's dpm_fast): from the run's first
    level to its last above 0, in as many calls as the run has steps, on floor(n / 3) + 1
    steps evenly spaced in t = -log sigma: third-order steps (r1 = 1/3, r2 = 2/3), the last
    one or two of lower order to spend exactly n calls. It ends on the last level above 0, not
    on 0, as k-diffusion's does. With ``eta`` (A1111 runs it at its "Eta for ancestral
    samplers", 1 by default), each step lands on sigma_down (not below the last level) and
    fresh noise brings it up to the step's level."""
    s = np.asarray(sigmas, dtype=np.float64)
    nfe = len(s) - 1
    positive = s[s > 0]
    t_start, t_end = -np.log(s[0]), -np.log(positive[-1])
    m = nfe // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    inputs, rows, ends, noise = [], [], [], {}
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            down, _ = _ancestral(np.exp(-t), np.exp(-t_next), eta)
            t_land = min(t_end, -np.log(down)) if down > 0 else t_end
            up = np.sqrt(max(np.exp(-2 * t_next) - np.exp(-2 * t_land), 0.0))
        else:
            t_land, up = t_next, 0.0
        h, sn = t_land - t, np.exp(-t_land)
        em = np.expm1(h)
        if order == 1:
            inputs += [np.exp(-t)]
            rows += [(1, -sn * em, 0, 0)]
        elif order == 2:
            r1 = 0.5
            s1 = t + r1 * h
            inputs += [np.exp(-t), np.exp(-s1)]
            rows += [(1, -np.exp(-s1) * np.expm1(r1 * h), 0, 0),
                     (1, -sn * em + sn / (2 * r1) * em, -sn / (2 * r1) * em, 0)]
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            # (a run whose first and last levels are one: h = 0, and so are these)
            k2 = np.exp(-s2) * (r2 / r1) * (np.expm1(r2 * h) / (r2 * h) - 1) if h else 0.0
            k3 = sn / r2 * (em / h - 1) if h else 0.0
            inputs += [np.exp(-t), np.exp(-s1), np.exp(-s2)]
            rows += [(1, -np.exp(-s1) * np.expm1(r1 * h), 0, 0),
                     (1, -np.exp(-s2) * np.expm1(r2 * h) + k2, -k2, 0),
                     (1, -sn * em + k3, 0, -k3)]
        ends += [False] * (order - 1) + [True]
        if eta:  # (drawn every step, as k-diffusion draws it; 0 wide on the last)
            noise[len(rows) - 1] = up
    rows, draws = _from_slopes(inputs, rows, ends, noise)
    return np.array(inputs), rows, tuple(ends), draws, np.exp(-t_end)


def heunpp2(sigmas):
    """ComfyUI's heunpp2 (from Carzit's sd-webui-samplers-scheduler): Heun's trial Euler step
    to the next level and a call there, then a second Euler step from there to the level after
    and a call there; the step is taken with the three slopes weighed 1 - w2 - w3, w2 =
    sigma' / (3 sigma_0), w3 = sigma'' / (3 sigma_0), sigma_0 the run's first level. The step
    before the last is Heun's with weights 1 - w2, w2 = sigma' / (2 sigma_0); the last, Euler's."""
    s = np.asarray(sigmas, dtype=np.float64)
    end = s[-1]
    inputs, rows, ends = [], [], []
    for i in range(len(s) - 1):
        dt = s[i + 1] - s[i]
        if s[i + 1] == end:
            inputs += [s[i]]
            rows += [(1, dt, 0, 0)]
            ends += [True]
        elif s[i + 2] == end:
            w2 = s[i + 1] / (2 * s[0])
            inputs += [s[i], s[i + 1]]
            rows += [(1, dt, 0, 0), (1, (1 - w2) * dt, w2 * dt, 0)]
            ends += [False, True]
        else:
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            inputs += [s[i], s[i + 1], s[i + 2]]
            rows += [(1, dt, 0, 0), (1, dt, s[i + 2] - s[i + 1], 0),
                     (1, (1 - w2 - w3) * dt, w2 * dt, w3 * dt)]
            ends += [False, False, True]
    rows, draws = _from_slopes(inputs, rows, ends)
    return np.array(inputs), rows, tuple(ends), draws, end


def _phi1(z):
    """z phi_1(z) = e^z - 1 (ComfyUI's ei_h_phi_1)."""
    return np.expm1(z)


def _phi2(z):
    """z phi_2(z) = (e^z - 1 - z) / z (ComfyUI's ei_h_phi_2)."""
    return (np.expm1(z) - z) / z


def seeds(sigmas, stages, eta=1.0):
    """ComfyUI's seeds_2 (``stages`` 2: r = 1/2, its phi_1 solver) and seeds_3 (3: r1 = 1/3,
    r2 = 2/3): SEEDS (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast
    High-Quality Sampling from Diffusion Models"), stochastic exponential Runge-Kutta steps in
    data prediction over lambda = -log sigma, at eta 1: each stage's point keeps e^-(r h eta)
    of x, takes the phi-weighted x0s, and carries the step's Brownian noise, which each stage
    extends by a fresh draw; a step to 0 lands on x0."""
    s = np.asarray(sigmas, dtype=np.float64)
    inputs, rows, ends, draws = [], [], [], []
    basis = np.eye(STAGE_WIDTH)
    for i in range(len(s) - 1):
        if s[i + 1] == 0:
            inputs.append(s[i])
            rows.append(basis[1])
            ends.append(True)
            draws.append(False)
            continue
        h = np.log(s[i]) - np.log(s[i + 1])
        h_eta = h * (eta + 1)
        r = (0.5,) if stages == 2 else (1 / 3, 2 / 3)
        levels = [s[i]] + [s[i] * np.exp(-rk * h) for rk in r] + [s[i + 1]]
        fractions = (0.0, *r, 1.0)
        noise = np.zeros(3)  # the step's noise so far, over z_0, z_1, z_2 (in units of sigma)
        for k in range(stages):
            rk, level = fractions[k + 1], levels[k + 1]
            row = np.zeros(STAGE_WIDTH)
            row[0] = level / s[i] * np.exp(-rk * h * eta)
            if k + 1 == stages:  # the step's end
                if stages == 2:  # phi_1 on the midpoint's x0 (fac = 1 / (2 r) = 1)
                    fac = 1 / (2 * r[0])
                    row[1:3] = -_phi1(-h_eta) * (1 - fac), -_phi1(-h_eta) * fac
                else:
                    b3 = _phi2(-h_eta) / r[1]
                    row[1], row[3] = -(_phi1(-h_eta) - b3), -b3
            elif k == 0:
                row[1] = -_phi1(-rk * h_eta)
            else:  # seeds_3's second stage
                a32 = r[1] / r[0] * _phi2(-r[1] * h_eta)
                row[1], row[2] = -(_phi1(-r[1] * h_eta) - a32), -a32
            # the Brownian noise: the last stage's, decayed over this stretch, plus fresh
            segment = (fractions[k] - rk) * h * eta
            noise *= np.exp(segment)
            noise[k] = np.sqrt(-np.expm1(2 * segment))
            row[4:] = level * noise
            inputs.append(levels[k])
            rows.append(row)
            ends.append(k + 1 == stages)
            draws.append(True)
    return np.array(inputs), np.array(rows), tuple(ends), tuple(draws), s[-1]


# --- SA-Solver (``samplers.sample_sa_solver``) ------------------------------------------------
#
# ComfyUI's sa_solver: the stochastic Adams predictor of order 3 and corrector of order 4 (Xue
# et al. 2023), in data prediction over lambda = -log sigma, stochastic (tau 1) where sigma
# lies between the model's levels at 20% and 80% of its timesteps (as ComfyUI's default
# tau_func reads them), an ODE elsewhere.
SA_SOLVER_ORDERS = (3, 4)  # predictor's, corrector's
SA_SOLVER_TAU_SPAN = (0.2, 0.8)  # ComfyUI's percent_to_sigma of the stochastic span's ends


def _sa_exponential(s, t, order, tau):
    """(1 + tau^2) times the integrals of exp((1 + tau^2) x) x^p over [s, t], p < ``order``,
    exp((1 + tau^2) t) factored out (by parts, as ComfyUI's compute_exponential_coeffs)."""
    mul = 1 + tau * tau
    p = np.arange(order)
    terms = t ** p - s ** p * np.exp(-mul * (t - s))
    depth = p[:, None] - p[None, :]
    log_fact = np.array([math.lgamma(k + 1) for k in p])
    coeff = log_fact[:, None] - log_fact[None, :] - (depth * math.log(mul) if tau > 0 else 0)
    signs = np.where(depth % 2 == 0, 1.0, -1.0)
    return np.tril(np.exp(coeff) * signs) @ terms


def _sa_b(lambdas, s, t, tau):
    """The stochastic Adams weights of the x0s at ``lambdas`` (oldest first) for a step from
    lambda ``s`` to ``t``: the Lagrange basis through them integrated against the step's
    exponential (alpha_t = 1 for these latents)."""
    n = len(lambdas)
    vander = np.vander(np.asarray(lambdas, dtype=np.float64), n, increasing=True).T
    try:
        return np.linalg.solve(vander, _sa_exponential(s, t, n, tau))
    except np.linalg.LinAlgError:
        raise SdrtError("sa_solver: the last noise levels lie too close together in log sigma "
                        "for its Adams weights (a singular system): pick fewer steps or another "
                        "schedule") from None


def sa_solver(sigmas, start, span, pece=False):
    """Rows (c_xc, c_xp, c0, c1, c2, c3, c_zprev, p_xc, p0, p1, p2, p3, p_z) of ComfyUI's
    sa_solver over the levels ``sigmas`` from ``start`` (its run), one per model call: the
    corrected latents x_c' = c_xc x_c + c_xp x_pred + sum c_k x0_k + c_zprev z_prev (the x0s
    newest first, x_pred where the model was called, z_prev the predictor noise it carries),
    then the next call's latents x_pred' = p_xc x_c' + sum p_k x0_k + p_z z (z fresh unit
    noise). ``span``: the (high, low) sigmas between which it is stochastic. ``pece``
    (sa_solver_pece): a step that corrects calls the model again at the corrected latents, its
    x0 taking the newest's place, before the predictor (the last step, to 0, corrects too).
    Returns (rows, flags, the level of each call): flags 1 where the call draws noise, 2 where
    a PECE call follows it (its row the corrector's), 4 for that PECE call (its row the
    predictor's)."""
    s = sigmas.double().numpy()[start:]
    n = len(s) - 1
    lam = -np.log(np.where(s > 0, s, 1.0))
    to_end = s[-1] == 0
    rows, flags, levels = [], [], []
    tau, h, kept, noise = 0.0, 0.0, 0, 0.0
    for i in range(n):
        kept = min(kept + 1, max(SA_SOLVER_ORDERS))
        p_order = min(SA_SOLVER_ORDERS[0], kept)
        c_order = (0 if i == 0 or (s[i + 1] == 0 and not pece)
                   else min(SA_SOLVER_ORDERS[1], kept))
        if to_end:
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)
        row, flag = np.zeros(13), 0
        if c_order == 0:
            row[1] = 1.0
        else:
            b = _sa_b(lam[i - c_order + 1:i + 1], lam[i - 1], lam[i], tau)
            row[0] = s[i] / s[i - 1] * np.exp(-tau * tau * h)
            row[2:2 + c_order] = b[::-1]
            row[6] = noise  # the noise the predictor added, again (0 if none)
            if pece:  # the corrected latents are the next call's; the predictor's row its
                rows.append(row)
                flags.append(2)
                levels.append(i)
                row, flag = np.zeros(13), 4
        noise = 0.0
        if s[i + 1] == 0:
            row[8] = 1.0  # the clean latents
        else:
            tau = 1.0 if span[0] >= s[i + 1] >= span[1] else 0.0
            b = _sa_b(lam[i - p_order + 1:i + 1], lam[i], lam[i + 1], tau) if p_order else []
            h = lam[i + 1] - lam[i]
            row[7] = s[i + 1] / s[i] * np.exp(-tau * tau * h)
            row[8:8 + p_order] = b[::-1]
            if tau > 0:
                row[12] = noise = s[i + 1] * np.sqrt(-np.expm1(-2 * tau * tau * h))
                flag |= 1
        rows.append(row)
        flags.append(flag)
        levels.append(i)
    return np.array(rows), tuple(flags), levels


# sdrt's sampler → its weights; which loop runs them is which table it is in.
SLOPE_WEIGHTS = {"ipndm": ipndm, "ipndm_v": ipndm_v, "gradient_estimation": gradient_estimation,
                 "comfy_deis": comfy_deis}
X0_WEIGHTS = {"res_multistep": res_multistep,
              "res_multistep_a": lambda sigmas, start: res_multistep(sigmas, start, eta=1.0),
              "ddpm": ddpm, "er_sde": er_sde,
              "cfgpp_euler": cfgpp_euler,
              "cfgpp_euler_a": lambda sigmas, start: cfgpp_euler(sigmas, start, eta=1.0),
              "cfgpp_dpmpp_2m": cfgpp_dpmpp_2m,
              "cfgpp_gradient_estimation": cfgpp_gradient_estimation,
              "cfgpp_res_multistep": lambda sigmas, start: res_multistep(sigmas, start,
                                                                         cfg_pp=True),
              "cfgpp_res_multistep_a": lambda sigmas, start: res_multistep(sigmas, start, 1.0,
                                                                           cfg_pp=True)}
# The CFG++ one whose history is of the unconditional slope rather than x0u
SLOPE_HISTORY = ("cfgpp_gradient_estimation",)
# Several calls a step: the layout of a run over the levels it visits (from the first of the
# run), see ``dpm_fast``
STAGES = {"dpm_fast": dpm_fast, "dpm_fast_a": lambda sigmas: dpm_fast(sigmas, eta=1.0),
          "heunpp2": heunpp2, "seeds_2": lambda sigmas: seeds(sigmas, 2),
          "seeds_3": lambda sigmas: seeds(sigmas, 3)}
# The ones that draw fresh noise each step
NOISY = ("res_multistep_a", "ddpm", "er_sde", "cfgpp_euler_a", "cfgpp_res_multistep_a",
         "dpm_fast_a", "seeds_2", "seeds_3")
