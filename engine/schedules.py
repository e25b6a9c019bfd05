"""Noise schedules: from a diffusers ``scheduler_config.json`` to the per-step tensors a sampler reads.

Each sampler reproduces one diffusers scheduler class, and picking sampler X for a model means
``XScheduler.from_config(the model's scheduler_config.json)``. So a field absent from the file takes
the default of X's class, not of the class the file names: SD 1.5 ships a PNDM config without
``timestep_spacing``, which DDIM and PNDM read as "leading" but Euler and DPM-Solver as "linspace".

The timestep grids and sigma tables are built with numpy in float64, rounded and cast where diffusers
does, because a timestep that differs by one (a round-half case, a float32 cast in another place)
changes which alpha-bar the UNet is conditioned on.
"""
import json
import math
import typing
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from . import comfy_samplers
from .errors import SdrtError
from .request import SAMPLER_NAMES as SAMPLERS  # the one list, importable without torch
from .request import sampler_choices, sampler_family, sampler_missing, split_sampler
from .sigma_schedules import levels, log_interp

# ComfyUI's samplers on Euler's levels, each run by sdrt's linear multistep loop on the slope
# or on the clean latents with its own weights, or (sa_solver*) by SA-Solver's loop
# (``comfy_samplers``)
COMFY_EULER = (*comfy_samplers.SLOPE_WEIGHTS, *comfy_samplers.X0_WEIGHTS, "sa_solver",
               "sa_solver_pece")
# The samplers that step along EulerDiscreteScheduler's levels (by prefix)
EULER_LEVELS = ("euler", "lms", *COMFY_EULER)
# The diffusers class each sampler reproduces step by step.
SAMPLER_CLASSES = {
    "ddim": "DDIMScheduler",
    # A1111's "DDIM CFG++": DDIM's steps renoised along the unconditional noise
    "cfgpp_ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_karras": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler_a_karras": "EulerAncestralDiscreteScheduler",  # on EulerDiscreteScheduler's Karras
    "heun": "HeunDiscreteScheduler",
    "heun_karras": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_karras": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpm2_a_karras": "KDPM2AncestralDiscreteScheduler",
    # DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S
    # a"): no diffusers class has it; it runs on DPM2 a's layout of the Euler class's sigmas.
    "dpmpp_2s_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_2s_a_karras": "KDPM2AncestralDiscreteScheduler",
    # ComfyUI's dpmpp_2s_ancestral_cfg_pp: the same calls, CFG++'s step (``sample_two_call``)
    "cfgpp_dpmpp_2s_a": "KDPM2AncestralDiscreteScheduler",
    "cfgpp_dpmpp_2s_a_karras": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "dpmpp_sde_karras": "DPMSolverSDEScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",  # algorithm_type="sde-dpmsolver++"
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_heun": "DPMSolverMultistepScheduler",  # and solver_type="heun"
    "dpmpp_2m_sde_heun_karras": "DPMSolverMultistepScheduler",
    # X_exponential: on exponentially spaced sigmas (use_exponential_sigmas=True, A1111's
    # schedule type Exponential, its default for these)
    "dpmpp_2m_sde_exponential": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_heun_exponential": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde_exponential": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde": "DPMSolverMultistepScheduler",  # and solver_order=3
    "dpmpp_3m_sde_karras": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "unipc_karras": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "deis_karras": "DEISMultistepScheduler",
    # ComfyUI's uni_pc (B(h) = h) and uni_pc_bh2: UniPC of order 3 along ComfyUI's sigmas,
    # winding down at the end, its last step to sigma 0.001 (``comfy_unipc``).
    "uni_pc": "UniPCMultistepScheduler",
    "uni_pc_karras": "UniPCMultistepScheduler",
    "uni_pc_bh2": "UniPCMultistepScheduler",
    "uni_pc_bh2_karras": "UniPCMultistepScheduler",
    # ComfyUI's samplers that no diffusers class has, on Euler's levels: ipndm (Zhang &
    # Chen's improved PNDM: Adams-Bashforth), ipndm_v (for uneven steps), gradient_estimation,
    # comfy_deis (ComfyUI's deis), res_multistep, res_multistep_a (its ancestral form), ddpm,
    # er_sde, and the CFG++ ones, cfgpp_* (``comfy_samplers``).
    **{name: "EulerDiscreteScheduler" for base in COMFY_EULER
       for name in (base, f"{base}_karras")},
    # Samplers of several calls a step that no diffusers class has (``comfy_samplers.STAGES``):
    # DPM-Solver-Fast (k-diffusion's; dpm_fast_a with A1111's eta of 1: its "DPM fast"),
    # ComfyUI's heunpp2, seeds_2 and seeds_3.
    **{name: "EulerDiscreteScheduler" for base in comfy_samplers.STAGES
       for name in (base, f"{base}_karras")},
    "lcm": "LCMScheduler",
    # Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative
    # Processes"; A1111's "Restart"): Heun's steps, so Heun's class defaults; no diffusers
    # class has it.
    "restart": "HeunDiscreteScheduler",
    "restart_karras": "HeunDiscreteScheduler",
}
# The samplers that take two model calls per step (diffusers' ``order = 2``: Heun's method and
# DPM-Solver-2, k-diffusion's sample_heun and sample_dpm_2): a step's first call is an Euler
# step to a trial point, its second corrects it; the last step, to sigma = 0, is the first
# call alone. Their schedules count calls (2 * steps - 1). DPM++ SDE (DPM-Solver++(2S) with
# Brownian-tree noise, k-diffusion's sample_dpmpp_sde) is laid out the same way.
TWO_CALL_SAMPLERS = ("heun", "heun_karras", "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras",
                     "dpmpp_2s_a", "dpmpp_2s_a_karras", "cfgpp_dpmpp_2s_a",
                     "cfgpp_dpmpp_2s_a_karras",
                     "dpmpp_sde", "dpmpp_sde_karras", "restart", "restart_karras")
# The two-call samplers that split each step's landing level into sigma_down and fresh noise
_ANCESTRAL_TWO_CALL = ("dpm2_a", "dpmpp_2s_a", "cfgpp_dpmpp_2s_a")
# ``X_karras`` is sampler X on Karras et al.'s sigmas (use_karras_sigmas=True, as A1111's "X
# Karras"); plain X takes the config's use_karras_sigmas, except these, where it is off.
KARRAS_OFF = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "deis", "uni_pc")
# The UniPC samplers (diffusers' and ComfyUI's), which share its coefficient solver.
UNIPC = ("unipc", "uni_pc")
# The classes that lack the fields Euler's has beyond the betas, spacing and Karras switch.
_K_CLASS = TWO_CALL_SAMPLERS + ("lms", "lms_karras")
KARRAS_SAMPLERS = {name[:-len("_karras")]: name for name in SAMPLER_CLASSES
                   if name.endswith("_karras")}
EXPONENTIAL = tuple(name for name in SAMPLER_CLASSES if name.endswith("_exponential"))
# A model trained with EDM's preconditioning (Karras et al. 2022) ships one of these: its
# sigmas, the UNet's input scale, timestep and output all follow EDM. euler and dpmpp_2m
# reproduce them; euler_a runs k-diffusion's ancestral step over the same denoiser.
EDM_CLASSES = {"euler": "EDMEulerScheduler", "dpmpp_2m": "EDMDPMSolverMultistepScheduler",
               "dpmpp_2m_karras": "EDMDPMSolverMultistepScheduler"}
EDM_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")

# Defaults that differ between those classes (every other field has one default shared by all of
# them: the dataclass default). The DPM-Solver++ and "_karras" samplers fix use_karras_sigmas
# themselves.
_BETAS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
_K_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"}  # Heun, KDPM2
_CLASS_DEFAULTS = {
    "ddim": {**_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": True,
             "clip_sample": True},
    # (A1111's DDIM CFG++ clips no x0: the class's default clip_sample is diffusers')
    "cfgpp_ddim": {**_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": True,
                   "clip_sample": False},
    "pndm": {**_BETAS, "timestep_spacing": "leading", "set_alpha_to_one": False,
             "clip_sample": False},
    **{name: {**_BETAS, "timestep_spacing": "linspace"}
       for name in ("euler", "euler_karras", "euler_a", "euler_a_karras", "dpmpp_2m",
                    "dpmpp_2m_karras",
                    "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_heun",
                    "dpmpp_2m_sde_heun_karras", "dpmpp_2m_sde_exponential",
                    "dpmpp_2m_sde_heun_exponential", "dpmpp_3m_sde_exponential", "dpmpp_3m_sde",
                    "dpmpp_3m_sde_karras", "unipc", "unipc_karras", "lms",
                    "lms_karras", "deis", "deis_karras", "uni_pc", "uni_pc_karras",
                    "uni_pc_bh2", "uni_pc_bh2_karras",
                    *(name for base in (*COMFY_EULER, *comfy_samplers.STAGES)
                      for name in (base, f"{base}_karras")))},
    **{name: {**_K_BETAS, "timestep_spacing": "linspace", "clip_sample": False}
       for name in TWO_CALL_SAMPLERS},  # (KDPM2 has no clip_sample: for_sampler drops it)
    "lcm": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": False,
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
}
assert set(_CLASS_DEFAULTS) == set(SAMPLERS)

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear", "log_linear"),
    "timestep_type": ("discrete", "continuous"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "sigma_schedule": ("karras", "exponential"),
}

# Options of the diffusers classes that no sampler here implements, with their neutral value: a
# file that turns one on is refused rather than silently sampled differently.
_UNSUPPORTED = {
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "variance_type": None,
}


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               tuple: "a list of numbers"}


def _is_a(value, kind) -> bool:
    """Whether a JSON value fits a field annotated ``kind``: an int is a float, but true/false
    is neither an int nor a float, and "false" is not a bool (it would be truthy)."""
    if kind is tuple:
        return isinstance(value, (list, tuple)) and all(_is_a(b, float) for b in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers ``scheduler_config.json`` that the samplers read.

    ``None`` marks a field whose default depends on the scheduler class (see ``_CLASS_DEFAULTS``);
    ``for_sampler`` fills it in.
    """

    class_name: str | None = None
    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # DDIM and PNDM
    set_alpha_to_one: bool | None = None
    # DDIM
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    # PNDM: False runs the Runge-Kutta warm-up (12 model calls) before the linear multistep
    skip_prk_steps: bool = False
    # Euler
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    # Euler and DPM-Solver++
    use_karras_sigmas: bool = False
    # DPM-Solver++: set by the *_exponential samplers only (a config file setting it is refused)
    use_exponential_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    # DPM-Solver++
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    # DPM-Solver: the variant asked for. dpmsolver++ order 2 (dpmpp_2m) and sde-dpmsolver++
    # order 2 or 3 (dpmpp_2m_sde, dpmpp_3m_sde), midpoint, are implemented; default_sampler
    # warns about others.
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2  # DPM-Solver's and UniPC's
    solver_type: str = "midpoint"  # UniPC: "bh1" or "bh2" (DPM-Solver's names read as bh2)
    # UniPC: whether it extrapolates x0 (else the noise), and the steps it does not correct
    predict_x0: bool = True
    disable_corrector: tuple = ()
    # LCM: the distillation's timestep grid (num_train_timesteps // original_inference_steps
    # apart) that the inference steps are picked from, and the boundary-condition time scale.
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # EDM (EDM_CLASSES): sigma_min/sigma_max above (default 0.002 and 80), the data's std the
    # preconditioning assumes, and the sigma spacing.
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    rho: float = 7.0

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Parse a ``scheduler_config.json`` dict; unknown keys are ignored, null means absent."""
        if not isinstance(d, dict):
            raise SdrtError(f"scheduler config must be a JSON object, got {type(d).__name__}")
        for key, neutral in _UNSUPPORTED.items():
            if d.get(key, neutral) not in (neutral, None):
                raise SdrtError(f"scheduler config sets {key}={d[key]!r}, which sdrt does not implement")
        types = {f.name: f.type for f in fields(cls)} | {"_class_name": str}
        kwargs = {k: v for k, v in d.items() if k in types and k != "class_name" and v is not None}
        for key, value in kwargs.items():
            kind = next(t for t in typing.get_args(types[key]) or (types[key],) if t is not type(None))
            if not _is_a(value, kind):
                shown = f"a {type(value).__name__}" if kind is tuple else repr(value)
                raise SdrtError(f"scheduler config: {key} must be {_KIND_NAMES[kind]}, got {shown}")
        class_name = kwargs.pop("_class_name", None)
        cfg = cls(class_name=class_name, **kwargs)
        if cfg.num_train_timesteps < 2:
            raise SdrtError(f"scheduler config: num_train_timesteps={cfg.num_train_timesteps!r} "
                            f"is not an integer >= 2")
        if cfg.trained_betas is not None:
            if len(cfg.trained_betas) != cfg.num_train_timesteps:
                raise SdrtError(f"scheduler config: trained_betas has {len(cfg.trained_betas)} "
                                f"values, num_train_timesteps is {cfg.num_train_timesteps}")
            cfg = replace(cfg, trained_betas=tuple(float(b) for b in cfg.trained_betas))
        cfg = replace(cfg, disable_corrector=tuple(int(i) for i in cfg.disable_corrector))
        if cfg.solver_order < 1:
            raise SdrtError(f"scheduler config: solver_order must be at least 1, got "
                            f"{cfg.solver_order}")
        for key, allowed in _CHOICES.items():
            value = getattr(cfg, key)
            if value is not None and value not in allowed:
                raise SdrtError(f"scheduler config: {key}={value!r} is not one of {', '.join(allowed)}")
        return cfg

    @classmethod
    def from_file(cls, path) -> "SchedulerConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SdrtError(f"cannot read scheduler config {path}: {e}") from None
        return cls.from_dict(d)

    @property
    def edm(self) -> bool:
        """Whether the model was trained with EDM's preconditioning (its config's class)."""
        return self.class_name in EDM_CLASSES.values()

    def for_sampler(self, sampler: str) -> "SchedulerConfig":
        """This config as ``XScheduler.from_config`` sees it, X being the sampler's class."""
        resolved = {k: v for k, v in _CLASS_DEFAULTS[sampler].items() if getattr(self, k) is None}
        if sampler == "pndm":
            # PNDMScheduler has no such option: the field is dropped by from_config.
            resolved["rescale_betas_zero_snr"] = False
        if sampler in _K_CLASS:
            # Fields HeunDiscreteScheduler, the KDPM2 classes and LMSDiscreteScheduler do not
            # have: from_config drops them, and those classes act as their neutral values.
            resolved.update(rescale_betas_zero_snr=False, interpolation_type="linear",
                            timestep_type="discrete", sigma_min=None, sigma_max=None,
                            final_sigmas_type="zero")
            if not sampler.startswith(("heun", "restart")):
                resolved["clip_sample"] = False
        if sampler.startswith(UNIPC):
            # UniPCMultistepScheduler has no lambda clip, and reads DPM-Solver's solver types
            # as bh2.
            resolved["lambda_min_clipped"] = -math.inf
            if self.solver_type not in ("bh1", "bh2"):
                resolved["solver_type"] = "bh2"
        if sampler.startswith("uni_pc"):  # ComfyUI's, whatever the model's config says
            resolved.update(solver_order=3, predict_x0=True, lower_order_final=True,
                            disable_corrector=(),
                            solver_type="bh2" if sampler.startswith("uni_pc_bh2") else "bh1")
        if sampler.startswith("deis"):
            # DEISMultistepScheduler has no zero-SNR rescale, lambda clip or final sigma type.
            resolved.update(rescale_betas_zero_snr=False, lambda_min_clipped=-math.inf,
                            final_sigmas_type="sigma_min")
        if sampler.startswith("dpmpp_"):
            resolved["solver_order"] = 3 if sampler.startswith("dpmpp_3m") else 2
        if sampler.startswith("dpmpp_"):
            resolved["use_exponential_sigmas"] = sampler.endswith("_exponential")
        if sampler.startswith(KARRAS_OFF):
            resolved["use_karras_sigmas"] = sampler.endswith("_karras")
        elif sampler.endswith("_karras"):
            resolved["use_karras_sigmas"] = True
        return replace(self, **resolved)


# --- training noise levels -------------------------------------------------------------------

def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine alpha-bar (Nichol & Dhariwal 2021), capped at ``max_beta``."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so the last timestep is pure noise (Lin et al. 2023, alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def train_alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha-bar_t for t = 0 .. num_train_timesteps - 1, float32 as diffusers holds it."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _finite_snr(cfg: SchedulerConfig, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha-bar as the sigma-based schedulers (Euler, DPM-Solver) use it: zero terminal SNR makes
    the last alpha-bar exactly 0, an infinite sigma, which diffusers replaces with 2^-24."""
    if not cfg.rescale_betas_zero_snr:
        return alphas_cumprod
    alphas_cumprod = alphas_cumprod.clone()
    alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def _train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Variance-exploding noise levels sigma_t = sqrt((1 - alpha-bar) / alpha-bar), float32."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


# --- timestep grids --------------------------------------------------------------------------

def spaced_timesteps(spacing: str, num_train_timesteps: int, steps: int, steps_offset: int) -> np.ndarray:
    """The inference timesteps, descending, float64 and not yet rounded where "linspace" gives
    fractions (Euler keeps them, DDIM and PNDM round them); Table 2 of Lin et al. 2023."""
    n_train = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n_train // steps))[::-1].astype(np.float64) + steps_offset
    return np.round(np.arange(n_train, 0, -n_train / steps)) - 1


def _dpm_timesteps(cfg: SchedulerConfig, alphas_cumprod: torch.Tensor, steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's grid: steps + 1 points with the final t = 0 dropped, and an
    upper end lowered below lambda_min_clipped where that is set."""
    log_snr = torch.log(alphas_cumprod.sqrt()) - torch.log((1 - alphas_cumprod).sqrt())
    clipped = int(torch.searchsorted(torch.flip(log_snr, [0]), cfg.lambda_min_clipped))
    last = cfg.num_train_timesteps - clipped
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(steps + 1) * ratio)[::-1][:-1].astype(np.int64) + cfg.steps_offset
    return np.arange(last, 0, -cfg.num_train_timesteps / steps).round().astype(np.int64) - 1


# --- sigma schedules -------------------------------------------------------------------------

def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), descending."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_train = np.log(train_sigmas)
    log_s = np.log(np.maximum(sigmas, 1e-10))
    # train_sigmas ascend with t: `low` is the last level at or below each sigma.
    low = np.clip(np.searchsorted(log_train, log_s, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_s) / (log_train[low] - log_train[low + 1]), 0, 1)
    low = low.astype(w.dtype)  # float32 sigmas interpolate in float32, as diffusers does
    return (1 - w) * low + w * (low + 1)


def _final_sigma(cfg: SchedulerConfig, alphas_cumprod: torch.Tensor) -> float:
    """Where the last step lands: clean (0) or the smallest training noise level."""
    if cfg.final_sigmas_type == "zero":
        return 0.0
    return float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)


# --- the schedule ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """One run's per-step data, on the device the sampler runs on.

    N = len(timesteps) is the number of UNet calls. The fields a sampler does not use are None.
    """

    sampler: str
    config: SchedulerConfig  # resolved for this sampler (class defaults filled in)
    timesteps: torch.Tensor  # (N,) the UNet's timestep argument, in call order
    init_noise_sigma: float
    alphas_cumprod: torch.Tensor | None = None  # (num_train_timesteps,) ddim, pndm, lcm
    alphas: torch.Tensor | None = None  # (N,) ddim, pndm, lcm: alpha-bar a step starts from
    alphas_prev: torch.Tensor | None = None  # (N,) ddim, pndm, lcm: alpha-bar it lands on
    # (N + 1,) euler*, euler_a, dpmpp_2m*: the sigma before each call, then where the last
    # lands; heun*, dpm2*: diffusers' per-call sigmas (``add_noise``'s)
    sigmas: torch.Tensor | None = None
    # (N,) heun*, dpm2* (TWO_CALL_SAMPLERS): the sigma of each call's input, where its update
    # lands (a step's trial point, or its end), and dpm2_a's fresh noise's std there;
    # dpm_fast*, heunpp2*, seeds_*: the sigma of each call's input
    sigmas_in: torch.Tensor | None = None
    sigmas_to: torch.Tensor | None = None
    sigmas_up: torch.Tensor | None = None
    prk_calls: int = 0  # pndm: how many leading calls are Runge-Kutta warm-up
    final_step_first_order: bool = False  # dpmpp_*: whether the last step drops to first order
    second_last_lower: bool = False  # dpmpp_3m_sde*: whether the step before drops to second
    # (N,) lcm: the consistency model's boundary-condition weights of x and of the x0 prediction
    c_skip: torch.Tensor | None = None
    c_out: torch.Tensor | None = None
    # euler_a, dpm2_a*, dpmpp_2m_sde*, lcm: how many unit-noise tensors the sampler draws,
    # so the static runtime can draw them beforehand; dpmpp_sde*: how many Brownian
    # increments it takes, over the sigma pairs ``noise_points`` (draws, 2) of a Brownian
    # tree spanning ``noise_range`` (sigma_min, sigma_max), both on the host (float32)
    noise_draws: int = 0
    noise_points: torch.Tensor | None = None
    noise_range: tuple = ()
    # ddim: diffusers' eta, the share of fresh noise each step adds (0: deterministic; above,
    # one unit-noise draw a call, ``with_eta``)
    eta: float = 0.0
    # Multistep samplers' per-step linear combinations, solved on the host. unipc*: the
    # corrector's (row 0: of the previous step's latents, then of the model outputs newest
    # first) and the predictor's (row 1: of the latents, then of the outputs), (N, 2,
    # solver_order + 2), and ``orders`` (corrector's, 0 for none; predictor's). lms*: the
    # weights of the slopes newest first, (N, 4), and ``orders`` how many are known (ipndm*,
    # ipndm_v*, gradient_estimation*, comfy_deis* too); res_multistep*, res_multistep_a*, ddpm*,
    # er_sde*, cfgpp_*: (N, 6), the weights of the latents, this step's clean latents (guided,
    # unconditional), two earlier steps' and fresh noise (``comfy_samplers``). deis*:
    # (N, 5), see ``_deis_coefficients``, and ``orders`` each step's. dpmpp_sde*: (N, 3), see
    # ``_dpmpp_sde_schedule``. dpm_fast*, dpm_fast_a*, heunpp2*, seeds_2*, seeds_3*: (N, 7), per
    # call, the weights of the step's start, of its calls' x0s so far and of the noise drawn
    # after them, and ``orders`` bit 1 where the call ends its step, bit 2 where it draws
    # (``_stages_schedule``). sa_solver*: (N, 13) per call, see ``comfy_samplers.sa_solver``,
    # and ``orders`` its flags (1: draws noise; 2: a PECE call follows; 4: the PECE call).
    coefficients: torch.Tensor | None = None
    orders: tuple = ()
    # EDM: the preconditioning's sigma_data (the sigmas are then EDM's, the latents
    # variance-exploding for every sampler); None for the models trained on alpha-bars
    sigma_data: float | None = None

    def noise_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The text-to-image starting latents for unit-variance ``noise``."""
        return noise * self.init_noise_sigma

    def noise_image(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Image-to-image start: clean latents ``x0`` noised to the level of the first call."""
        return self.noise_to(x0, noise, 0)

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents ``x0`` noised along ``noise`` to the level call ``i`` starts from (the
        scheduler's ``add_noise`` at ``timesteps[i]``); past the last call, ``x0`` itself."""
        if i >= len(self.timesteps):
            return x0
        if self.sigmas is None:
            a = self.alphas_cumprod[self.timesteps[i:i + 1]]  # (1,): a tensor index, no sync
            x = a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()
        elif (self.sampler.startswith(("dpmpp_2m", "dpmpp_3m", *UNIPC, "deis"))
              and self.sigma_data is None):
            alpha, sigma = vp_alpha_sigma(self.sigmas[i])
            x = alpha * x0.float() + sigma * noise.float()
        else:
            x = x0.float() + self.sigmas[i] * noise.float()
        return x.to(x0.dtype)

    def window(self, start: int, stop: int) -> "Schedule":
        """Calls ``start`` to ``stop`` (exclusive) of this schedule: the part of the run the
        SDXL base (``denoising_end``) or refiner (``denoising_start``) takes, as diffusers cuts
        its timesteps, the sampler state starting afresh. A run that stops early never takes
        the schedule's last step, so no step of it drops to first order for being last."""
        n = len(self.timesteps)
        if not 0 <= start < stop <= n:
            raise SdrtError(f"a schedule window must lie within the {n} steps, got "
                            f"{start} to {stop}")
        base = split_sampler(self.sampler)[0]
        if (self.prk_calls or base == "lcm" or base in TWO_CALL_SAMPLERS
                or self.coefficients is not None):
            raise SdrtError(f"{self.sampler} cannot run part of its schedule "
                            f"(denoising_start/denoising_end); pick ddim, euler, euler_a or "
                            f"dpmpp_2m")
        per_call = {name: getattr(self, name)[start:stop]
                    for name in ("timesteps", "alphas", "alphas_prev", "c_skip", "c_out")
                    if getattr(self, name) is not None}
        sigmas = None if self.sigmas is None else self.sigmas[start:stop + 1]
        return replace(self, **per_call, sigmas=sigmas,
                       final_step_first_order=self.final_step_first_order and stop == n,
                       second_last_lower=self.second_last_lower and stop == n,
                       noise_draws=stop - start if self.noise_draws else 0)


def cutoff_timestep(fraction: float, num_train_timesteps: int) -> int:
    """The timestep at which a run split at ``fraction`` of the noise schedule changes hands:
    diffusers' ``discrete_timestep_cutoff``. The base (``denoising_end``) runs the timesteps
    at or above it, the refiner (``denoising_start``) those below."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving (alpha_t, sigma_t) for a variance-exploding sigma: x_vp = alpha_t x_ve."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _ddim_tables(cfg, alphas_cumprod, calls, steps):
    """alpha-bar at each call's timestep and at the timestep it steps to (t - T // steps for every
    spacing, which is what DDIMScheduler does even when the grid is not evenly spaced)."""
    final = 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod[0])
    ratio = cfg.num_train_timesteps // steps
    alphas = [float(alphas_cumprod[t]) for t in calls]
    prev = [float(alphas_cumprod[t - ratio]) if t - ratio >= 0 else final for t in calls]
    return alphas, prev


def _pndm_calls(cfg, steps):
    """PNDMScheduler's call list and its Runge-Kutta part: (calls, prk_timesteps)."""
    grid = np.round(spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps,
                                     cfg.steps_offset)).astype(np.int64)
    if cfg.skip_prk_steps:
        # PLMS alone: the second timestep is called twice, the first step being redone as a
        # second-order (Heun-like) step once the second noise prediction is known.
        return np.concatenate([grid[:1], grid[1:2], grid[1:]]), np.zeros(0, np.int64)
    # PRK: one classic RK4 step (4 calls: start, midpoint twice, end) per gap between the
    # 4 largest timesteps, then PLMS from the 4th largest down.
    half = cfg.num_train_timesteps // steps // 2
    top = grid[:4][::-1]  # ascending
    points = np.stack([top, top + half], axis=1).ravel()[:-1]
    prk = np.repeat(points, 2)[1:-1][::-1].copy()
    return np.concatenate([prk, grid[3:]]), prk


def _pndm_tables(cfg, alphas_cumprod, calls, prk, steps):
    """alpha-bar each call steps from and to, following PNDMScheduler's call counter (which
    restarts at 0 when img2img drops leading calls, while its PRK timestep table does not)."""
    final = 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod[0])
    ratio = cfg.num_train_timesteps // steps
    half = ratio // 2
    alphas, prev = [], []
    for i, t in enumerate(calls.tolist()):
        if i < len(prk):
            src, dst = int(prk[i // 4 * 4]), t - (0 if i % 2 else half)
        elif i == 1:
            src, dst = t + ratio, t  # the redone first step, see _pndm_calls
        else:
            src, dst = t, t - ratio
        alphas.append(float(alphas_cumprod[src]))
        prev.append(float(alphas_cumprod[dst]) if dst >= 0 else final)
    return alphas, prev


def _euler_tables(cfg, alphas_cumprod, steps, round_karras=False):
    """EulerDiscreteScheduler's (timesteps, sigmas); EulerAncestral's is the plain case of it,
    and Heun's and KDPM2's steps are its (``round_karras``: KDPM2 rounds Karras timesteps)."""
    train = _train_sigmas(_finite_snr(cfg, alphas_cumprod))
    t = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
    if cfg.timestep_spacing != "linspace":
        t = np.round(t)
    t = t.astype(np.float32)
    if cfg.interpolation_type == "linear":
        sigmas = np.interp(t, np.arange(len(train)), train)
    else:
        # log_linear yields steps + 1 sigmas for steps calls: the last call lands on the smallest
        # training sigma, and the appended final sigma is never reached (as in diffusers).
        sigmas = torch.linspace(float(np.log(train[-1])), float(np.log(train[0])), steps + 1).exp().numpy()
    if cfg.use_karras_sigmas:
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(lo, hi, steps)
        t = sigma_to_timestep(sigmas, train)
        t = (np.round(t) if round_karras else t).astype(np.float32)
    sigmas = torch.from_numpy(np.append(sigmas, _final_sigma(cfg, alphas_cumprod)).astype(np.float32))
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        timesteps = 0.25 * sigmas[:-1].log()
    else:
        timesteps = torch.from_numpy(t)
    return timesteps, sigmas


def _euler_a_tables(cfg, alphas_cumprod, steps, karras=False):
    """EulerAncestralDiscreteScheduler's; with ``karras``, EulerDiscreteScheduler's Karras
    sigmas over the schedule's own range (the ancestral class has no Karras switch: A1111's
    and ComfyUI's Euler a on Karras sigmas)."""
    plain = replace(cfg, interpolation_type="linear", use_karras_sigmas=karras,
                    timestep_type="discrete", final_sigmas_type="zero", sigma_min=None,
                    sigma_max=None)
    return _euler_tables(plain, alphas_cumprod, steps)


def _init_noise_sigma(cfg, sigmas) -> float:
    """diffusers' init_noise_sigma of the sigma-based schedulers: sigma_max, except on
    "leading" grids where it is sqrt(sigma_max^2 + 1), the std of x0 + sigma_max * eps for
    unit-variance x0."""
    top = sigmas.max()
    return float(top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)


def _per_call(steps_table):
    """diffusers' layout of a two-call sampler's per-step table: the first entry, then each
    later one twice (the second call of a step and the first of the next)."""
    return torch.cat([steps_table[:1], steps_table[1:].repeat_interleave(2), steps_table[-1:]])


def _two_call_schedule(cfg, sampler, alphas_cumprod, steps, start, device,
                       tables=None) -> Schedule:
    """HeunDiscreteScheduler's (heun*), KDPM2DiscreteScheduler's (dpm2*) or
    KDPM2AncestralDiscreteScheduler's (dpm2_a*, and dpmpp_2s_a*) schedule, laid out per
    model call.

    Each step from sigma s to the next s' takes two calls, the last step (to 0) one. Heun:
    an Euler step to s' and a call there, the step redone with the mean of both slopes.
    DPM2: an Euler step to the geometric mean of s and s', and the step taken with the slope
    there. DPM2 a: the same towards sigma_down, then fresh noise of std sigma_up (euler_a's
    split of s'); DPM++ 2S a makes the same calls (``sample_two_call`` takes its step).
    ``start``: image to image's skipped steps, two calls each. ``tables``: the
    (timesteps, sigmas) of a sigma schedule (``_schedule_tables``) instead of diffusers'."""
    t, sigmas = tables or _euler_tables(cfg, alphas_cumprod, steps,
                                        round_karras=sampler.startswith("dpm2"))
    up = torch.zeros_like(sigmas)
    if sampler.startswith("heun"):
        calls = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        n = len(calls)
        per_call = _per_call(sigmas)[:n + 1]  # a second call lands where the next first starts
        sigmas_in, sigmas_to = per_call[:n], per_call[1:]
    else:
        if sampler.startswith(_ANCESTRAL_TWO_CALL):
            following = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
            up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
            # At most the next sigma, as k-diffusion's get_ancestral_step: where rounding puts
            # it above (huge sigmas, squared-cosine betas), diffusers' sigma_down is NaN.
            up = torch.minimum(up, following)
            down = (following**2 - up**2) ** 0.5
            down[-1] = 0.0
            mid = sigmas.log().lerp(down.log(), 0.5).exp()
            # A step all noise (sigma_down 0, k-diffusion's Euler case): NaN in diffusers; a
            # call at sigma 0 here, whose slope the sampler does not use.
            mid = torch.where(down > 0, mid, 0.0)
            mid[-2:] = 0.0
            t_mid, shift = mid[:-2], 1  # a step's second call is at its own midpoint
        else:
            down = sigmas  # the step lands where the next begins
            mid = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()  # mid[i]: s[i - 1] to s[i]
            t_mid, shift = mid[1:-1], 0
        train = _train_sigmas(alphas_cumprod)
        t_mid = torch.from_numpy(sigma_to_timestep(t_mid.numpy(), train).astype(np.float32))
        calls = torch.cat([t[:1], torch.stack([t_mid, t[1:]], dim=1).flatten()])
        s_call, mid_call = _per_call(sigmas), _per_call(mid)
        down_call, up_call = _per_call(down), _per_call(up)
        n = len(calls)
        first = torch.arange(n) % 2 == 0
        # First calls (c even) start at s[c] and step to the midpoint; second calls are at the
        # midpoint, and their step, from the first call's sigma, lands on s' (or sigma_down).
        sigmas_in = torch.where(first, s_call[:n], mid_call[torch.arange(n) - shift])
        sigmas_to = torch.where(first, mid_call[torch.arange(n) + 1 - shift],
                                (down_call if shift else s_call)[torch.arange(n) - shift])
        up = torch.where(first, 0.0, up_call[torch.arange(n) - 1])
        per_call = s_call[:n + 1]
    f32 = {"dtype": torch.float32, "device": device}
    first_call = 2 * start
    ancestral = sampler.startswith(_ANCESTRAL_TWO_CALL)
    return Schedule(sampler, cfg, calls[first_call:].to(device),
                    float(sigmas[0]) if tables else _init_noise_sigma(cfg, sigmas),
                    sigmas=per_call[first_call:].to(**f32),
                    sigmas_in=sigmas_in[first_call:].to(**f32),
                    sigmas_to=sigmas_to[first_call:].to(**f32),
                    sigmas_up=up[first_call:].to(**f32) if ancestral else None,
                    noise_draws=(len(calls) - first_call) // 2 if ancestral else 0)


def restart_steps(levels):
    """Restart sampling's (from, to) Heun steps over a table of ``levels`` (descending, then
    where the last step lands), as A1111's Restart lays them out: under 20 steps the table's
    own; from 20, the steps not spent restarting on Karras levels between the table's first
    and its last above 0 (rho 7), and where they pass sigma 0.1, ``times`` restarts (1; 2 from
    36 steps) of ``k`` steps (9; steps // 4 from 36) from sigma 2 down to there again, each
    started by noise that brings the latents back up to sigma 2."""
    levels = np.asarray(levels, dtype=np.float64)
    n = len(levels) - 1
    if n < 20:
        return list(zip(levels[:-1], levels[1:]))
    k, times = (n // 4, 2) if n >= 36 else (9, 1)
    levels = np.append(karras_sigmas(levels[-2], levels[0], n - k * times), 0.0)
    steps = list(zip(levels[:-1], levels[1:]))
    low, high = (int(np.argmin(np.abs(levels - s))) for s in (0.1, 2.0))
    if high < low:
        again = karras_sigmas(levels[low], levels[high], k + 1)
        steps[low:low] = list(zip(again[:-1], again[1:])) * times
    return steps


def _restart_schedule(cfg, sampler, alphas_cumprod, steps, start, device,
                      tables=None) -> Schedule:
    """Restart's schedule (``restart_steps``) laid out per model call as Heun's: a step's first
    call at its start, its second at its end (none for the last step, to 0; a call at 0 whose
    slope is not used for a step to 0 that a restart follows, where the table's lowest level
    is nearer 0 than 0.1), that second call's ``sigmas_up`` the noise that raises the latents
    to where the next step starts (0 but before a restart). Its levels: Euler's (plain or
    Karras), or a sigma schedule's ``tables``; image to image drops the leading ``start``
    levels first, as A1111 hands Restart the rest of its table."""
    if tables is not None:
        levels = tables[1]
    else:
        levels = _euler_tables(cfg, alphas_cumprod, steps)[1].double().numpy()
    levels = levels[start:]
    train = _train_sigmas(_finite_snr(cfg, alphas_cumprod))
    inputs, to, up = [], [], []
    pairs = restart_steps(levels)
    for k, (old, new) in enumerate(pairs):
        following = pairs[k + 1][0] if k + 1 < len(pairs) else 0.0
        inputs.append(old), to.append(new), up.append(0.0)
        if new > 0 or k + 1 < len(pairs):
            inputs.append(new), to.append(new)
            up.append((following**2 - new**2) ** 0.5 if following > new else 0.0)
    # (Heun's class has discrete timesteps only: for_sampler sets them)
    calls = sigma_to_timestep(np.asarray(inputs), train).astype(np.float32)
    f32 = {"dtype": torch.float32, "device": device}
    as_tensor = lambda values: torch.tensor(values, **f32)  # noqa: E731
    return Schedule(sampler, cfg, torch.from_numpy(calls).to(device), float(inputs[0]),
                    sigmas=as_tensor(inputs + [to[-1]]), sigmas_in=as_tensor(inputs),
                    sigmas_to=as_tensor(to), sigmas_up=as_tensor(up),
                    noise_draws=len(inputs) // 2)  # one per second call


def _dpmpp_sde_schedule(cfg, sampler, alphas_cumprod, steps, start, device,
                        tables=None) -> Schedule:
    """DPMSolverSDEScheduler's (dpmpp_sde*) schedule, laid out per model call as diffusers
    does: each step from sigma s to s' takes a call at s, an ancestral step to the midpoint
    m = sqrt(s s') (halfway in log sigma) and a call there, then the ancestral step from s to
    s' with the midpoint's x0; the last step, to 0, is one call and an Euler step.

    An ancestral step from s towards sigma_to with x0 lands on a·x - c·x0 + sigma_up·z: with
    sigma_up = min(sigma_to, sigma_to·sqrt(s² - sigma_to²)/s) and sigma_down =
    sqrt(sigma_to² - sigma_up²), a = sigma_down/s and c = expm1(log(sigma_down/s)); x is the
    step's start (its first call's latents) and z the Brownian tree's increment over [s,
    sigma_to], scaled to unit variance. ``coefficients`` holds (a, c, sigma_up) per call (the
    last call's Euler step to 0 reads none), each computed from float32 sigmas in diffusers'
    order of operations; ``noise_points`` the (s, sigma_to) of each increment. ``tables``: a
    sigma schedule's float64 (timesteps, sigmas) instead of diffusers'."""
    train = _train_sigmas(alphas_cumprod)
    t = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
    sigmas = np.interp(t, np.arange(len(train)), train)  # float64, at float64 timesteps
    if tables:
        t, sigmas = tables[0], tables[1][:-1]  # (its last step lands on 0)
    elif cfg.use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        t = sigma_to_timestep(sigmas, train)
    # The midpoints' timesteps, from float64 sigmas as diffusers takes them (DPM-Solver's
    # time is -log sigma).
    neg_log = -np.log(sigmas)
    t_mid = sigma_to_timestep(np.exp(-(neg_log[:-1] + np.diff(neg_log) * 0.5)), train)
    calls = np.empty(2 * steps - 1)
    calls[0::2], calls[1::2] = t, t_mid
    s32 = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    coefficients, points, inputs = [], [], []
    for c in range(len(calls)):
        k = c // 2
        s, s_next = s32[k], s32[k + 1]
        if s_next == 0:  # the last call
            inputs.append(s)
            coefficients.append(torch.zeros(3))
            continue
        t_s, t_next = s.log().neg(), s_next.log().neg()
        t_proposed = t_s + (t_next - t_s) * 0.5
        inputs.append(s if c % 2 == 0 else t_proposed.neg().exp())
        sigma_from = t_s.neg().exp()
        sigma_to = (t_proposed if c % 2 == 0 else t_next).neg().exp()
        up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        down_t = ((sigma_to**2 - up**2) ** 0.5).log().neg()
        coefficients.append(torch.stack([down_t.neg().exp() / sigma_from,
                                         (t_s - down_t).expm1(), up]))
        points.append(torch.stack([sigma_from, sigma_to]))
    per_call = _per_call(s32)[:len(calls) + 1]
    f32 = {"dtype": torch.float32, "device": device}
    first = 2 * start
    return Schedule(sampler, cfg, torch.from_numpy(calls[first:].astype(np.float32)).to(device),
                    float(s32[0]) if tables else _init_noise_sigma(cfg, s32),
                    sigmas=per_call[first:].to(**f32),
                    sigmas_in=torch.stack(inputs)[first:].to(**f32),
                    coefficients=torch.stack(coefficients)[first:].to(**f32),
                    noise_draws=len(points) - first,
                    noise_points=(torch.stack(points) if points else torch.zeros(0, 2))[first:],
                    noise_range=(per_call[per_call > 0].min(), per_call.max()))


def _lms_coefficients(sigmas, start):
    """LMSDiscreteScheduler's linear multistep weights at each step of a run starting at step
    ``start``: slope k back (k < order, the order min(step + 1, 4) counted from the schedule's
    start, as diffusers does even for image to image) weighs the integral over the step of
    its Lagrange basis polynomial in sigma, exact here (diffusers integrates with quad)."""
    s = sigmas.double().numpy()
    n = len(s) - 1
    table, known = np.zeros((n - start, 4)), []
    for j in range(n - start):
        g = start + j
        order = min(g + 1, 4)
        for k in range(order):
            basis = np.polynomial.Polynomial([1.0])
            for m in range(order):
                if m != k:
                    factor = np.polynomial.Polynomial([-s[g - m], 1.0]) / (s[g - k] - s[g - m])
                    basis = basis * factor
            integral = basis.integ()
            table[j, k] = integral(s[g + 1]) - integral(s[g])
        known.append(min(j + 1, order))  # the slopes of steps run before this one, and its own
    return torch.from_numpy(table).float(), tuple(known)


def _deis_coefficients(cfg, sigmas, start):
    """DEIS's (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator"; diffusers' DEISMultistepScheduler, log-rho) step at each step of a run
    starting at ``start``, over the last (up to three) noise predictions e0, e1, e2, newest
    first: ``w[1] x + w[2] e0`` at order 1, else ``w[0] (x / w[1] + w[2] e0 + w[3] e1 (+
    w[4] e2))``, each weight of a higher order the exact integral over the step of its
    Lagrange polynomial in log rho (rho = sigma / alpha); in float32 and grouped as diffusers
    computes them (the first steps of a huge sigma multiply rounding by thousands). Orders
    warm up from 1 and, under 15 steps, wind down at the end; a step to sigma 0 (a sigma
    schedule's last) is first order, its weight of e0 the limit -alpha' sigma / alpha."""
    s = sigmas.float()
    alpha = 1 / (s**2 + 1) ** 0.5
    sig, n = s * alpha, len(s) - 1
    lam = alpha.log() - sig.log()
    rho = sig / alpha
    low = cfg.lower_order_final and n < 15

    def log(v):  # numpy's float32 logarithm, which diffusers' np.log on a tensor takes
        return torch.from_numpy(np.asarray(np.log(v.numpy())))

    def ind2(t, b, c):  # the integral of (log t - log c) / (log b - log c)
        return t * (-log(c) + log(t) - 1) / (log(b) - log(c))

    def ind3(t, b, c, d):  # of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d))
        lt, lc, ld = log(t), log(c), log(d)
        return (t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
                / ((log(b) - lc) * (log(b) - ld)))

    table, orders = torch.zeros(n - start, 5), []
    for j in range(n - start):
        g = start + j
        if s[g + 1] == 0:
            order = 1
            table[j, :3] = torch.stack([torch.ones(()), alpha[g + 1] / alpha[g],
                                        -(alpha[g + 1] * sig[g] / alpha[g])])
        elif cfg.solver_order == 1 or j < 1 or (low and g == n - 1):
            order = 1
            h = lam[g + 1] - lam[g]
            table[j, :3] = torch.stack([torch.ones(()), alpha[g + 1] / alpha[g],
                                        -(sig[g + 1] * (torch.exp(h) - 1.0))])
        else:
            order = 2 if cfg.solver_order == 2 or j < 2 or (low and g == n - 2) else 3
            t, r = rho[g + 1], [rho[g - k] for k in range(order)]
            if order == 2:
                weights = [ind2(t, r[0], r[1]) - ind2(r[0], r[0], r[1]),
                           ind2(t, r[1], r[0]) - ind2(r[0], r[1], r[0])]
            else:
                weights = [ind3(t, r[0], r[1], r[2]) - ind3(r[0], r[0], r[1], r[2]),
                           ind3(t, r[1], r[2], r[0]) - ind3(r[0], r[1], r[2], r[0]),
                           ind3(t, r[2], r[0], r[1]) - ind3(r[0], r[2], r[0], r[1])]
            table[j, :2 + order] = torch.stack([alpha[g + 1], alpha[g], *weights])
        orders.append(order)
    return table, tuple(orders)


def _unipc_coefficients(cfg, sigmas, start):
    """UniPC's (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models") predictor and corrector at each step of a run starting at
    step ``start``, as linear combinations of the latents and the model outputs: the
    B(h) (bh1: h, bh2: e^h - 1) coefficient systems of UniPCMultistepScheduler solved on the
    host, in float64. Orders warm up from 1 and, with lower_order_final, wind down at the
    end; a step in disable_corrector is not corrected at the next."""
    n = len(sigmas) - 1
    s = sigmas.double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1 / np.sqrt(s**2 + 1)
        sig = s * alpha
        lam = np.log(alpha) - np.log(sig)
    k_max = cfg.solver_order
    table = np.zeros((n - start, 2, k_max + 2))
    orders = []

    def update(g_from, g_to):
        """A B(h) step from step g_from to g_to: h, the exponent, B(h), and the weights of
        the latents, of the newest output and of the extrapolated differences."""
        h = lam[g_to] - lam[g_from]
        hh = -h if cfg.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        b_h = hh if cfg.solver_type == "bh1" else np.expm1(hh)
        if cfg.predict_x0:
            a, c0, scale = sig[g_to] / sig[g_from], -alpha[g_to] * h_phi_1, -alpha[g_to] * b_h
        elif sig[g_to] > 0:
            a, c0, scale = alpha[g_to] / alpha[g_from], -sig[g_to] * h_phi_1, -sig[g_to] * b_h
        else:  # to sigma 0: sigma_t (e^h - 1) -> alpha_t sigma_s / alpha_s, sigma_t h -> 0
            a = alpha[g_to] / alpha[g_from]
            c0 = -alpha[g_to] * sig[g_from] / alpha[g_from]
            scale = c0 if cfg.solver_type == "bh2" else 0.0
        return h, hh, b_h, a, c0, scale

    def rhs(hh, b_h, order):
        b, h_phi_k, factorial = [], np.expm1(hh) / hh - 1, 1
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return np.array(b)

    predictor_order = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(n - start):
            g = start + j
            row = table[j]
            # The corrector: x_g from x_(g-1) with the outputs of g, g - 1, ..., at the order
            # the predictor that made x_g ran.
            corrector_order = (predictor_order if j > 0 and g - 1 not in cfg.disable_corrector
                               else 0)
            if corrector_order:
                p = corrector_order
                h, hh, b_h, a, c0, scale = update(g - 1, g)
                rks = np.array([(lam[g - 1 - k] - lam[g - 1]) / h for k in range(1, p)] + [1.0])
                rho = (np.array([0.5]) if p == 1 else
                       np.linalg.solve(np.stack([rks**i for i in range(p)]), rhs(hh, b_h, p)))
                row[0, 0] = a
                row[0, 1] = scale * rho[-1]  # the new output, m_g
                row[0, 2] = c0 - scale * rho[-1]  # m_(g-1)
                for k in range(1, p):
                    row[0, 2 + k] = scale * rho[k - 1] / rks[k - 1]
                    row[0, 2] -= scale * rho[k - 1] / rks[k - 1]
            # The predictor: x_(g+1) from the (corrected) x_g and the outputs of g, g - 1, ...
            p = cfg.solver_order
            if cfg.lower_order_final:
                p = min(p, n - g)
            p = predictor_order = min(p, j + 1)
            h, hh, b_h, a, c0, scale = update(g, g + 1)
            rks = np.array([(lam[g - k] - lam[g]) / h for k in range(1, p)] + [1.0])
            rho = (np.array([]) if p == 1 else np.array([0.5]) if p == 2 else
                   np.linalg.solve(np.stack([rks**i for i in range(p)])[:-1, :-1],
                                   rhs(hh, b_h, p)[:-1]))
            row[1, 0] = a
            row[1, 1] = c0
            for k in range(1, p):
                row[1, 1 + k] = scale * rho[k - 1] / rks[k - 1]
                row[1, 1] -= scale * rho[k - 1] / rks[k - 1]
            orders.append((corrector_order, p))
    return torch.from_numpy(table).float(), tuple(orders)


# ComfyUI's UniPC steps to this level instead of 0, and divides the result by its alpha.
COMFY_UNIPC_LAST_SIGMA = 0.001


def _comfy_unipc_coefficients(cfg, sigmas, start):
    """ComfyUI's uni_pc and uni_pc_bh2 (its ``sample_unipc``): ``_unipc_coefficients`` of
    order 3 along ``sigmas`` whose last level, 0, is 0.001 instead, the last step's result
    divided by that level's alpha (so the latents come back to sigma 0's scale)."""
    if float(sigmas[-1]) == 0:
        sigmas = sigmas.clone()
        sigmas[-1] = COMFY_UNIPC_LAST_SIGMA
    table, orders = _unipc_coefficients(cfg, sigmas, start)
    table[-1, 1] *= (1 + float(sigmas[-1]) ** 2) ** 0.5  # / alpha = sqrt(sigma^2 + 1)
    return table, orders


def _dpm_tables(cfg, alphas_cumprod, steps, unipc=False):
    """DPMSolverMultistepScheduler's (timesteps, sigmas); with ``unipc``,
    UniPCMultistepScheduler's and DEISMultistepScheduler's, which round Karras timesteps
    whatever the betas and end Karras sigmas at their own last for final_sigmas_type
    "sigma_min" (DEIS's only kind: a last step of no length)."""
    finite = _finite_snr(cfg, alphas_cumprod)
    train = _train_sigmas(finite)
    t = _dpm_timesteps(cfg, finite, steps)
    if cfg.use_karras_sigmas:
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(train[0])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(train[-1])
        sigmas = karras_sigmas(lo, hi, steps)
        t = sigma_to_timestep(sigmas, train)
        if cfg.beta_schedule != "squaredcos_cap_v2" or unipc:
            t = t.round()
        t = t.astype(np.int64)
    elif cfg.use_exponential_sigmas:  # evenly spaced in log sigma; timesteps truncated
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(train[0])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(train[-1])
        sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
        t = sigma_to_timestep(sigmas, train).astype(np.int64)
    else:
        sigmas = train[t]
    last = (sigmas[-1] if unipc and cfg.use_karras_sigmas and cfg.final_sigmas_type == "sigma_min"
            else _final_sigma(cfg, alphas_cumprod))
    sigmas = np.append(sigmas.astype(np.float64), last).astype(np.float32)
    return torch.from_numpy(t), torch.from_numpy(sigmas)


def _lcm_timesteps(cfg: SchedulerConfig, steps: int, strength: float) -> np.ndarray:
    """LCMScheduler's grid (Luo et al. 2023, "Latent Consistency Models"): the distillation's
    ``original_inference_steps`` timesteps k - 1, 2k - 1, ... (k = T // original steps), of
    which ``strength`` keeps the lower part (image-to-image), then ``steps`` of them at evenly
    spaced indices from the top, descending."""
    original = cfg.original_inference_steps
    if not 1 <= original <= cfg.num_train_timesteps:
        raise SdrtError(f"scheduler config: original_inference_steps must be from 1 to "
                        f"num_train_timesteps ({cfg.num_train_timesteps}), got {original}")
    if steps > original:
        raise SdrtError(f"lcm takes at most original_inference_steps ({original}) steps, got "
                        f"{steps}")
    k = cfg.num_train_timesteps // original
    origin = np.arange(1, int(original * strength) + 1) * k - 1
    if len(origin) < steps:
        raise SdrtError(f"lcm with strength {strength} keeps {len(origin)} of its "
                        f"{original} original timesteps, fewer than the {steps} steps asked "
                        f"for; lower steps or raise strength")
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][index].copy()


def _lcm_schedule(cfg, alphas_cumprod, steps, strength, device) -> Schedule:
    f32 = {"dtype": torch.float32, "device": device}
    calls = torch.from_numpy(_lcm_timesteps(cfg, steps, strength))
    # Every timestep is >= 0, so set_alpha_to_one's final alpha-bar is never read. The last
    # step "lands" on its own timestep (diffusers' prev_timestep) but returns the denoised
    # prediction itself, drawing no noise.
    prev = torch.cat([calls[1:], calls[-1:]])
    alphas, alphas_prev = alphas_cumprod[calls], alphas_cumprod[prev]
    # c_skip, c_out: float32 from the integer timestep, the way LCMScheduler computes them.
    scaled = calls * cfg.timestep_scaling
    sigma_data = 0.5
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return Schedule("lcm", cfg, calls.to(device), 1.0, alphas_cumprod=alphas_cumprod.to(device),
                    alphas=alphas.to(**f32), alphas_prev=alphas_prev.to(**f32),
                    c_skip=c_skip.to(**f32), c_out=c_out.to(**f32), noise_draws=len(calls) - 1)


def _edm_schedule(cfg, sampler, steps, start, device) -> Schedule:
    """EDMEulerScheduler's (euler, euler_a) or EDMDPMSolverMultistepScheduler's (dpmpp_2m*;
    dpmpp_2m_karras on Karras sigmas whatever the config says) schedule: ``steps`` sigmas
    from sigma_max down to sigma_min, Karras-spaced (``rho``) or log-spaced, then 0 or
    sigma_min; the UNet's timestep is 0.25 ln sigma. Euler spaces its ramp in float64, DPM in
    float32, as diffusers does."""
    lo = 0.002 if cfg.sigma_min is None else cfg.sigma_min
    hi = 80.0 if cfg.sigma_max is None else cfg.sigma_max
    for key, value in (("sigma_min", lo), ("sigma_max", hi), ("sigma_data", cfg.sigma_data),
                       ("rho", cfg.rho)):
        if not value > 0:
            raise SdrtError(f"scheduler config: {key} must be positive, got {value}")
    if lo >= hi:
        raise SdrtError(f"scheduler config: sigma_min ({lo}) must be below sigma_max ({hi})")
    dpm = sampler.startswith("dpmpp_2m")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float32 if dpm else torch.float64)
    if cfg.sigma_schedule == "karras" or sampler == "dpmpp_2m_karras":
        top, bottom = hi ** (1 / cfg.rho), lo ** (1 / cfg.rho)
        sigmas = (top + ramp * (bottom - top)) ** cfg.rho
    else:
        sigmas = torch.linspace(math.log(lo), math.log(hi), steps).exp().flip(0)
    sigmas = sigmas.to(torch.float32)
    timesteps = 0.25 * sigmas.log()
    last = 0.0 if cfg.final_sigmas_type == "zero" else (lo if dpm else float(sigmas[-1]))
    sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float32)])
    first_order_last = dpm and (cfg.euler_at_final or (cfg.lower_order_final and steps < 15)
                                or cfg.final_sigmas_type == "zero")
    calls = len(timesteps) - start
    return Schedule(sampler, cfg, timesteps[start:].to(device), (hi ** 2 + 1) ** 0.5,
                    sigmas=sigmas[start:].to(device), final_step_first_order=first_order_last,
                    noise_draws=calls if sampler == "euler_a" else 0,
                    sigma_data=float(cfg.sigma_data))


def _schedule_tables(cfg, alphas_cumprod, schedule, steps, align_your_steps):
    """Sampler X_S's float64 (timesteps, sigmas): sigma schedule S's levels and where its last
    step lands (``sigma_schedules.levels``), each level's fractional training timestep (0.25
    ln sigma for a model of continuous timesteps)."""
    train = _train_sigmas(_finite_snr(cfg, alphas_cumprod))
    sigmas = levels(schedule, steps, train, align_your_steps)
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        return 0.25 * np.log(sigmas[:-1]), sigmas
    return sigma_to_timestep(sigmas[:-1], train), sigmas


def _through_zero(tables, train):
    """Tables whose last step lands above 0, one step to 0 added: the two-call samplers lay a
    run out with its last step to 0 taking one call, which ``_cut_last_call`` then drops."""
    t, sigmas = tables
    return np.append(t, sigma_to_timestep(sigmas[-1:], train)), np.append(sigmas, 0.0)


def _cut_last_call(sched: Schedule) -> Schedule:
    """``sched`` without its last call (the step to 0 ``_through_zero`` added)."""
    cut = {name: getattr(sched, name)[:-1]
           for name in ("timesteps", "sigmas_in", "sigmas_to", "sigmas_up", "coefficients")
           if getattr(sched, name) is not None}
    return replace(sched, **cut, sigmas=sched.sigmas[:-1])


def _one_call_schedule(cfg, sampler, timesteps, sigmas, init_noise_sigma, start,
                       device) -> Schedule:
    """The schedule of a sampler that calls the model once a step, from its (timesteps, sigmas)
    tables; ``init_noise_sigma`` is Euler's and LMS's (the others step variance-preserving
    latents, whose pure noise has std 1)."""
    f32 = {"dtype": torch.float32, "device": device}
    if sampler_family(sampler) in ("sa_solver", "sa_solver_pece"):
        train = _train_sigmas(_finite_snr(cfg, train_alphas_cumprod(cfg)))
        # ComfyUI's percent_to_sigma: the level at fractional timestep (1 - percent) * (T - 1)
        span = tuple(float(log_interp(np.array([(1 - p) * (len(train) - 1)]), train)[0])
                     for p in comfy_samplers.SA_SOLVER_TAU_SPAN)
        rows, flags, levels = comfy_samplers.sa_solver(sigmas, start, span,
                                                       pece=sampler.startswith("sa_solver_pece"))
        calls = torch.tensor(levels, dtype=torch.long) + start
        return Schedule(sampler, cfg, timesteps[calls].to(device), init_noise_sigma,
                        sigmas=torch.cat([sigmas[calls], sigmas[-1:]]).to(**f32),
                        coefficients=torch.tensor(rows, **f32), orders=flags,
                        noise_draws=sum(f & 1 for f in flags))
    if sampler.startswith(EULER_LEVELS):
        family = sampler_family(sampler)
        noisy = family == "euler_a" or family in comfy_samplers.NOISY
        weights = (_lms_coefficients(sigmas, start) if family == "lms" else
                   comfy_samplers.SLOPE_WEIGHTS[family](sigmas, start)
                   if family in comfy_samplers.SLOPE_WEIGHTS else
                   (comfy_samplers.X0_WEIGHTS[family](sigmas, start), ())
                   if family in comfy_samplers.X0_WEIGHTS else (None, ()))
        return Schedule(sampler, cfg, timesteps[start:].to(device), init_noise_sigma,
                        sigmas=sigmas[start:].to(**f32),
                        noise_draws=len(timesteps[start:]) if noisy else 0,
                        coefficients=None if weights[0] is None else
                        torch.as_tensor(weights[0]).to(**f32),
                        orders=weights[1])
    if sampler.startswith((*UNIPC, "deis")):
        solve = (_comfy_unipc_coefficients if sampler.startswith("uni_pc") else
                 _unipc_coefficients if sampler.startswith("unipc") else _deis_coefficients)
        coefficients, orders = solve(cfg, sigmas, start)
        return Schedule(sampler, cfg, timesteps[start:].to(device), 1.0,
                        sigmas=sigmas[start:].to(**f32), coefficients=coefficients.to(**f32),
                        orders=orders)
    n = len(timesteps)
    # Going to sigma = 0 (or a short run) with a second-order step is unstable; diffusers
    # takes a first-order step last in those cases.
    last_first_order = (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                        or float(sigmas[-1]) == 0)
    sde = "_sde" in sampler  # one unit-noise draw per step
    return Schedule(sampler, cfg, timesteps[start:].to(device), 1.0,
                    sigmas=sigmas[start:].to(**f32), final_step_first_order=last_first_order,
                    second_last_lower=cfg.lower_order_final and n < 15,
                    noise_draws=len(timesteps[start:]) if sde else 0)


def _stages_schedule(cfg, sampler, alphas_cumprod, steps, start, device, tables=None):
    """The schedule of a sampler of several calls a step (``comfy_samplers.STAGES``), laid out
    per call over the levels of the run (the table's from ``start``): each call's level, its
    row of weights (``coefficients``), and whether it ends a step and draws noise (``orders``:
    bit 1 ends, bit 2 draws).
    Its levels: a sigma schedule's ``tables``; else Euler's, plain or Karras (heunpp2), and
    for DPM-Solver-Fast, which reads only the run's first and last levels above 0, the model's
    whole range (A1111 hands it the training sigmas' ends, whatever the config's spacing)."""
    family = sampler_family(sampler)
    train = _train_sigmas(_finite_snr(cfg, alphas_cumprod))
    if tables is not None:
        run = np.asarray(tables[1], dtype=np.float64)
    elif family.startswith("dpm_fast"):
        # k-diffusion's get_sigmas(steps) (A1111's Uniform) or Karras' over the model's
        # range; for one step the range itself, as A1111's text to image
        lo, hi = float(train[0]), float(train[-1])
        run = (np.array([hi, lo]) if steps == 1 else
               np.append(karras_sigmas(lo, hi, steps), 0.0) if sampler.endswith("_karras") else
               np.append(log_interp(np.linspace(len(train) - 1, 0, steps), train), 0.0))
    else:
        run = _euler_tables(cfg, alphas_cumprod, steps)[1].double().numpy()
    run = run[start:]
    if len(run) < 2:  # no step left (make_schedule says so)
        return Schedule(sampler, cfg, torch.zeros(0, device=device), 1.0)
    inputs, rows, ends, draws, last = comfy_samplers.STAGES[family](run)
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        calls = 0.25 * np.log(inputs)
    else:
        calls = sigma_to_timestep(inputs, train)
    f32 = {"dtype": torch.float32, "device": device}
    return Schedule(sampler, cfg, torch.from_numpy(calls.astype(np.float32)).to(device),
                    float(run[0]), sigmas=torch.tensor(np.append(inputs, last), **f32),
                    sigmas_in=torch.tensor(inputs, **f32),
                    coefficients=torch.tensor(rows, **f32),
                    orders=tuple(int(e) | 2 * int(d) for e, d in zip(ends, draws)),
                    noise_draws=sum(draws))


def _img2img_start(steps: int, strength: float) -> int:
    """How many leading steps image-to-image skips (diffusers' img2img ``get_timesteps``; a
    two-call sampler skips two calls a step, ``_two_call_schedule``)."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def with_eta(sched: Schedule, eta) -> Schedule:
    """``sched`` with diffusers' DDIM ``eta`` (a number from 0 to 1): above 0 each step adds
    that share of its variance as fresh noise, one unit-noise draw a call. Only ddim reads
    it; any other sampler is returned as it is, as diffusers' schedulers ignore it."""
    if not eta or sched.sampler != "ddim":
        return sched
    return replace(sched, eta=float(eta), noise_draws=len(sched.timesteps))


def make_schedule(cfg: SchedulerConfig, sampler: str, num_inference_steps: int, strength: float = 1.0,
                  device="cpu", denoising_start: float | None = None,
                  denoising_end: float | None = None, align_your_steps: tuple = ()) -> Schedule:
    """The schedule of ``sampler`` for ``num_inference_steps`` steps; ``strength`` < 1 keeps only
    the last steps, for image-to-image (lcm instead runs all its steps over the lower
    ``strength`` part of its timestep range, as LCMScheduler.set_timesteps(strength=) does).

    ``denoising_end`` / ``denoising_start`` (fractions of the noise schedule in (0, 1), SDXL's
    base/refiner split; ``denoising_start`` replaces ``strength``) keep the calls before or
    after the cutoff timestep, as diffusers' SDXL pipelines do.

    Sampler "X_S" (``request.split_sampler``) is sampler X along sigma schedule S
    (``sigma_schedules``) instead of its diffusers scheduler's levels: a run of as many steps
    as S's table has; ``align_your_steps`` is the model family's table for S =
    align_your_steps."""
    if denoising_start is not None or denoising_end is not None:
        if cfg.edm:
            raise SdrtError(f"an EDM model ({cfg.class_name}) cannot split its schedule "
                            f"(denoising_start/denoising_end count discrete timesteps)")
        full = make_schedule(cfg, sampler, num_inference_steps, device=device,
                             align_your_steps=align_your_steps)
        ts = full.timesteps.cpu()
        n = len(ts)
        # Timesteps fall: the calls at or above a cutoff come first.
        above = lambda fraction: int((ts >= cutoff_timestep(fraction, cfg.num_train_timesteps)).sum())
        start = 0 if denoising_start is None else above(denoising_start)
        stop = n if denoising_end is None else above(denoising_end)
        if start >= stop:
            raise SdrtError(f"{sampler} with {num_inference_steps} steps, denoising_start "
                            f"{denoising_start} and denoising_end {denoising_end} leaves no "
                            f"denoising step; raise steps or move the split")
        return full.window(start, stop)
    if split_sampler(sampler) is None:
        raise SdrtError(f"unknown sampler {sampler!r}; choose {sampler_choices()}")
    base, schedule = split_sampler(sampler)
    steps = num_inference_steps
    if not isinstance(steps, int) or not 1 <= steps <= cfg.num_train_timesteps:
        raise SdrtError(f"steps must be an integer in 1..{cfg.num_train_timesteps}, got {steps!r}")
    if not 0 < strength <= 1:
        raise SdrtError(f"strength must be in (0, 1], got {strength}")
    cfg = cfg.for_sampler(base)
    if cfg.edm:
        if sampler not in EDM_SAMPLERS:
            raise SdrtError(f"sampler {sampler} does not run an EDM model ({cfg.class_name}); "
                            f"pick {', '.join(EDM_SAMPLERS)}")
        if cfg.prediction_type == "sample":
            raise SdrtError(f"an EDM model ({cfg.class_name}) predicts epsilon or "
                            f"v_prediction, not 'sample' (as diffusers' EDM schedulers)")
    if cfg.prediction_type == "sample" and (sampler == "pndm" or sampler.startswith(
            ("euler_a", "dpm2", "dpmpp_sde"))):
        raise SdrtError(f"sampler {sampler} does not support prediction_type 'sample' (neither does "
                        f"diffusers' {SAMPLER_CLASSES[base]}); pick ddim, euler or dpmpp_2m")
    if sampler == "pndm" and not cfg.skip_prk_steps and steps < 4:
        # PRK spans the 4 largest timesteps; diffusers fails to build it for fewer.
        raise SdrtError(f"pndm with the Runge-Kutta warm-up (skip_prk_steps false or absent) needs "
                        f"at least 4 steps, got {steps}")
    missing = sampler_missing(sampler)
    if missing:
        raise SdrtError(f"sampler {missing}")
    alphas_cumprod = train_alphas_cumprod(cfg)
    f32 = {"dtype": torch.float32, "device": device}
    tables, through_zero = None, False
    if schedule is not None:
        tables = _schedule_tables(cfg, alphas_cumprod, schedule, steps, align_your_steps)
        steps = len(tables[0])  # ddim_uniform's and comfy_beta's may differ from the steps
        # (Restart lays out a last step above 0 itself)
        through_zero = tables[1][-1] > 0 and base in TWO_CALL_SAMPLERS and base != "restart"
        if through_zero:
            tables = _through_zero(tables, _train_sigmas(_finite_snr(cfg, alphas_cumprod)))
    start = _img2img_start(steps, strength)

    if sampler_family(base) in comfy_samplers.STAGES:
        sched = _stages_schedule(cfg, sampler, alphas_cumprod, steps, start, device, tables)
    elif base.startswith("restart"):
        sched = _restart_schedule(cfg, sampler, alphas_cumprod, steps, start, device, tables)
    elif tables is not None and base.startswith("dpmpp_sde"):
        sched = _dpmpp_sde_schedule(cfg, sampler, alphas_cumprod, len(tables[0]), start,
                                    device, tables)
    elif tables is not None and base in TWO_CALL_SAMPLERS:
        as_f32 = tuple(torch.from_numpy(a.astype(np.float32)) for a in tables)
        sched = _two_call_schedule(cfg, sampler, alphas_cumprod, len(tables[0]), start, device,
                                   as_f32)
    elif tables is not None:
        timesteps, sigmas = (torch.from_numpy(a.astype(np.float32)) for a in tables)
        sched = _one_call_schedule(cfg, sampler, timesteps, sigmas, float(sigmas[0]), start,
                                   device)
    elif cfg.edm:
        sched = _edm_schedule(cfg, sampler, steps, start, device)
    elif sampler == "lcm":
        sched = _lcm_schedule(cfg, alphas_cumprod, steps, strength, device)
    elif sampler in ("ddim", "pndm", "cfgpp_ddim"):
        if sampler != "pndm":
            grid = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
            calls = np.round(grid).astype(np.int64)[start:]
            alphas, prev = _ddim_tables(cfg, alphas_cumprod, calls.tolist(), steps)
            prk_calls = 0
        else:
            calls, prk = _pndm_calls(cfg, steps)
            calls = calls[start:]
            alphas, prev = _pndm_tables(cfg, alphas_cumprod, calls, prk, steps)
            prk_calls = len(prk)
        sched = Schedule(sampler, cfg, torch.from_numpy(calls).to(device), 1.0,
                         alphas_cumprod=alphas_cumprod.to(device), alphas=torch.tensor(alphas, **f32),
                         alphas_prev=torch.tensor(prev, **f32), prk_calls=prk_calls)
    elif sampler.startswith("dpmpp_sde"):
        sched = _dpmpp_sde_schedule(cfg, sampler, alphas_cumprod, steps, start, device)
    elif sampler in TWO_CALL_SAMPLERS:
        sched = _two_call_schedule(cfg, sampler, alphas_cumprod, steps, start, device)
    elif sampler.startswith(EULER_LEVELS):
        timesteps, sigmas = (
            _euler_a_tables(cfg, alphas_cumprod, steps, karras=sampler.endswith("_karras"))
            if sampler.startswith("euler_a") else _euler_tables(cfg, alphas_cumprod, steps))
        sched = _one_call_schedule(cfg, sampler, timesteps, sigmas,
                                   _init_noise_sigma(cfg, sigmas), start, device)
    else:
        timesteps, sigmas = _dpm_tables(cfg, alphas_cumprod, steps,
                                        unipc=sampler.startswith((*UNIPC, "deis")))
        sched = _one_call_schedule(cfg, sampler, timesteps, sigmas, 1.0, start, device)
    if through_zero:
        sched = _cut_last_call(sched)
    if len(sched.timesteps) == 0:
        raise SdrtError(f"{sampler} with {steps} steps and strength {strength} leaves no denoising "
                        f"step; raise steps or strength")
    return sched
