"""AUTOMATIC1111's ``parameters`` text: the generation settings a PNG carries, as A1111 writes them.

Image tools (A1111's "PNG Info" tab, ``sd-parsers``, ``sd-prompt-reader``, Civitai) read the
settings of a picture from a PNG text chunk named ``parameters``, in the layout of A1111's
``create_infotext`` (modules/processing.py)::

    a red fox, snow
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

The prompt comes first (it may span lines), then ``Negative prompt: ...`` when there is one,
then one line of ``Key: value`` pairs. A value holding ``,``, ``:`` or a newline is written as a
JSON string (A1111's ``quote``: ``json.dumps(text, ensure_ascii=False)``), which A1111's reader
unquotes. The ``Seed`` is the image's own seed. ``Clip skip`` counts as A1111 counts: 1 is the
last layer, so sdrt's ``clip_skip=N`` (skip N layers) is written as ``N + 1``, and left out for 0.

The sampler labels are A1111's, shared with the A1111-compatible HTTP API (``sdrt.serve``).
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass

from .request import BETA_SHAPE, CONTROL_MODES, SAMPLER_NAMES, SIGMA_SCHEDULES, split_sampler

BUILT_IN = "sdrt-demo"  # the built-in (demo) model's name in PNG info and the APIs

# sdrt sampler id -> A1111's label. A1111 names PNDM "PLMS"; it is accepted as an alias.
SAMPLER_LABELS = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "euler_karras": "Euler Karras",
    "euler_a_karras": "Euler a Karras",
    "heun": "Heun",
    "heun_karras": "Heun Karras",
    "dpm2": "DPM2",
    "dpm2_karras": "DPM2 Karras",
    "dpm2_a": "DPM2 a",
    "dpm2_a_karras": "DPM2 a Karras",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "ddim": "DDIM",
    "pndm": "PNDM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_2m_sde_exponential": "DPM++ 2M SDE Exponential",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_2m_sde_heun_karras": "DPM++ 2M SDE Heun Karras",
    "dpmpp_2m_sde_heun_exponential": "DPM++ 2M SDE Heun Exponential",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras",
    "dpmpp_3m_sde_exponential": "DPM++ 3M SDE Exponential",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "unipc": "UniPC",
    "unipc_karras": "UniPC Karras",
    "deis": "DEIS",
    "deis_karras": "DEIS Karras",
    "lcm": "LCM",
    "restart": "Restart",
    "restart_karras": "Restart Karras",
    # ComfyUI's UniPC: no A1111 label; sdrt's, read back by --from-png
    "uni_pc": "UniPC ComfyUI",
    "uni_pc_karras": "UniPC ComfyUI Karras",
    "uni_pc_bh2": "UniPC bh2 ComfyUI",
    "uni_pc_bh2_karras": "UniPC bh2 ComfyUI Karras",
    "ipndm": "iPNDM",
    "ipndm_karras": "iPNDM Karras",
    "ipndm_v": "iPNDM_v",
    "ipndm_v_karras": "iPNDM_v Karras",
    "gradient_estimation": "Gradient Estimation",
    "gradient_estimation_karras": "Gradient Estimation Karras",
    "comfy_deis": "DEIS ComfyUI",
    "comfy_deis_karras": "DEIS ComfyUI Karras",
    "res_multistep": "Res Multistep",
    "res_multistep_karras": "Res Multistep Karras",
    "res_multistep_a": "Res Multistep Ancestral",
    "res_multistep_a_karras": "Res Multistep Ancestral Karras",
    "ddpm": "DDPM",
    "ddpm_karras": "DDPM Karras",
    "er_sde": "ER SDE",
    "er_sde_karras": "ER SDE Karras",
    "cfgpp_euler": "Euler CFG++",
    "cfgpp_euler_karras": "Euler CFG++ Karras",
    "cfgpp_euler_a": "Euler a CFG++",
    "cfgpp_euler_a_karras": "Euler a CFG++ Karras",
    "cfgpp_dpmpp_2m": "DPM++ 2M CFG++",
    "cfgpp_dpmpp_2m_karras": "DPM++ 2M CFG++ Karras",
    "cfgpp_res_multistep": "Res Multistep CFG++",
    "cfgpp_res_multistep_karras": "Res Multistep CFG++ Karras",
    "cfgpp_res_multistep_a": "Res Multistep Ancestral CFG++",
    "cfgpp_res_multistep_a_karras": "Res Multistep Ancestral CFG++ Karras",
    "cfgpp_gradient_estimation": "Gradient Estimation CFG++",
    "cfgpp_gradient_estimation_karras": "Gradient Estimation CFG++ Karras",
    # A1111's "DPM fast" runs at its eta for ancestral samplers, 1 by default; ComfyUI's
    # dpm_fast at 0
    "dpm_fast_a": "DPM fast",
    "dpm_fast_a_karras": "DPM fast Karras",
    "dpm_fast": "DPM fast ComfyUI",
    "dpm_fast_karras": "DPM fast ComfyUI Karras",
    "heunpp2": "HeunPP2",
    "heunpp2_karras": "HeunPP2 Karras",
    "cfgpp_dpmpp_2s_a": "DPM++ 2S a CFG++",
    "cfgpp_dpmpp_2s_a_karras": "DPM++ 2S a CFG++ Karras",
    "cfgpp_ddim": "DDIM CFG++",
    "seeds_2": "SEEDS-2",
    "seeds_2_karras": "SEEDS-2 Karras",
    "seeds_3": "SEEDS-3",
    "seeds_3_karras": "SEEDS-3 Karras",
    "sa_solver": "SA-Solver",
    "sa_solver_karras": "SA-Solver Karras",
    "sa_solver_pece": "SA-Solver PECE",
    "sa_solver_pece_karras": "SA-Solver PECE Karras",
}
assert set(SAMPLER_LABELS) == set(SAMPLER_NAMES)
# Other names A1111 (and its API clients) use for the same samplers: its k-diffusion aliases.
SAMPLER_ALIASES = {
    "euler_a": ("k_euler_a", "k_euler_ancestral"),
    "euler": ("k_euler",),
    "euler_karras": (),
    "euler_a_karras": (),
    "heun": ("k_heun",),
    "heun_karras": (),
    "dpm2": ("k_dpm_2",),
    "dpm2_karras": ("k_dpm_2_ka",),
    "dpm2_a": ("k_dpm_2_a",),
    "dpm2_a_karras": ("k_dpm_2_a_ka",),
    "dpmpp_2s_a": ("k_dpmpp_2s_a",),
    "dpmpp_2s_a_karras": ("k_dpmpp_2s_a_ka",),
    "dpmpp_sde": ("k_dpmpp_sde",),
    "dpmpp_sde_karras": ("k_dpmpp_sde_ka",),
    "ddim": (),
    "pndm": ("PLMS", "k_plms"),
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_karras": ("k_dpmpp_2m_ka",),
    "dpmpp_2m_sde": ("k_dpmpp_2m_sde",),
    "dpmpp_2m_sde_karras": ("k_dpmpp_2m_sde_ka",),
    "dpmpp_2m_sde_exponential": ("k_dpmpp_2m_sde_exp",),
    "dpmpp_2m_sde_heun": ("k_dpmpp_2m_sde_heun",),
    "dpmpp_2m_sde_heun_karras": ("k_dpmpp_2m_sde_heun_ka",),
    "dpmpp_2m_sde_heun_exponential": ("k_dpmpp_2m_sde_heun_exp",),
    "dpmpp_3m_sde": ("k_dpmpp_3m_sde",),
    "dpmpp_3m_sde_karras": ("k_dpmpp_3m_sde_ka",),
    "dpmpp_3m_sde_exponential": ("k_dpmpp_3m_sde_exp",),
    "lms": ("k_lms",),
    "lms_karras": ("k_lms_ka",),
    "unipc": (),
    "unipc_karras": (),
    "deis": (),
    "deis_karras": (),
    "lcm": (),
    "restart": (),
    "restart_karras": (),
    "uni_pc": (),
    "uni_pc_karras": (),
    "uni_pc_bh2": (),
    "uni_pc_bh2_karras": (),
    **{name: () for base in ("ipndm", "ipndm_v", "gradient_estimation", "comfy_deis",
                             "res_multistep", "res_multistep_a", "ddpm", "er_sde",
                             "cfgpp_euler", "cfgpp_euler_a", "cfgpp_dpmpp_2m",
                             "cfgpp_res_multistep", "cfgpp_res_multistep_a",
                             "cfgpp_gradient_estimation", "dpm_fast", "heunpp2",
                             "cfgpp_dpmpp_2s_a", "seeds_2", "seeds_3", "sa_solver",
                             "sa_solver_pece")
       for name in (base, f"{base}_karras")},
    "dpm_fast_a": ("k_dpm_fast",),
    "dpm_fast_a_karras": (),
    "cfgpp_ddim": ("ddim_cfgpp",),
}
assert set(SAMPLER_ALIASES) == set(SAMPLER_NAMES)
_BY_NAME = {name.lower(): sid for sid in SAMPLER_NAMES
            for name in (SAMPLER_LABELS[sid], sid, *SAMPLER_ALIASES[sid])}
_LABELS = set(SAMPLER_LABELS.values())
# A1111's "Schedule type" (from 1.9 on a setting of its own, ``scheduler`` in its API): label
# -> sdrt's kind. "Automatic" is the sampler's own default, "Uniform" its spacing of the
# training timesteps, "Karras" Karras et al.'s sigmas (a sampler's "X Karras"); the others
# are sigma schedules (``request.SIGMA_SCHEDULES``: sampler "X_S"). Polyexponential at its
# default rho of 1 is Exponential.
SCHEDULE_LABELS = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras",
                   "Exponential": "exponential", "Polyexponential": "exponential",
                   "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
                   "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal",
                   "DDIM": "ddim_uniform", "Beta": "beta"}
SCHEDULE_TYPES = tuple(SCHEDULE_LABELS)
# A1111's schedulers' names (its API takes a name or a label), its alias, and sdrt's kinds.
_KINDS = {**{k.lower(): v for k, v in SCHEDULE_LABELS.items()},
          **{v: v for v in SCHEDULE_LABELS.values()}, **{s: s for s in SIGMA_SCHEDULES},
          "polyexponential": "exponential", "ddim": "ddim_uniform", "sgmuniform": "sgm_uniform"}
# The label sdrt writes for a kind: A1111's, or for ComfyUI's own variants sdrt's name.
_WRITTEN = {**{s: s for s in SIGMA_SCHEDULES},
            **{v: k for k, v in reversed(SCHEDULE_LABELS.items())}}
# A1111's samplers whose "Automatic" schedule is not Uniform (1.9 on): a request or a PNG that
# names one of these labels without a schedule type gets it, as A1111 gives it.
AUTOMATIC_SCHEDULES = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM2": "karras",
                       "DPM2 a": "karras", "DPM++ 2S a": "karras", "Restart": "karras",
                       "DPM++ 2M SDE": "exponential",
                       "DPM++ 2M SDE Heun": "exponential", "DPM++ 3M SDE": "exponential"}
_AUTOMATIC = {label.lower(): kind for label, kind in AUTOMATIC_SCHEDULES.items()}


# A1111's settings of a sampler beyond its name, where A1111's sampler reads them, and the
# value sdrt runs: the eta of its k-diffusion samplers with noise ("Eta for ancestral
# samplers", 1) and of DDIM CFG++ (0; plain DDIM takes any eta: ``schedules.with_eta``), and
# the churn and noise multiplier of Euler,
# Heun and DPM2 (A1111's extra parameters of those: 0 and 1; DPM2 a, DPM++ 2S a, the SDE ones
# and DPM fast take the noise multiplier too). Elsewhere A1111 ignores them, and so does sdrt.
A1111_ETA = {**dict.fromkeys(("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde",
                              "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast_a"), 1.0),
             "cfgpp_ddim": 0.0}
A1111_CHURN = ("euler", "heun", "dpm2")
A1111_S_NOISE = ("euler", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde",
                 "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast_a")


def sampler_setting_problem(sid, eta=None, s_churn=None, s_noise=None):
    """(field, what sdrt runs) for the first of A1111's ``eta``, ``s_churn`` and ``s_noise``
    (None: A1111's default) that sampler ``sid`` would read with another value than sdrt runs
    it at; None when there is none."""
    base = split_sampler(sid)[0] if split_sampler(sid) else sid
    for suffix in ("_karras", "_exponential"):
        base = base.removesuffix(suffix)
    wanted = {"eta": A1111_ETA.get(base),
              "s_churn": 0.0 if base in A1111_CHURN else None,
              "s_noise": 1.0 if base in A1111_S_NOISE else None}
    for field, value in (("eta", eta), ("s_churn", s_churn), ("s_noise", s_noise)):
        if value is not None and wanted[field] is not None and value != wanted[field]:
            return field, wanted[field]
    return None


def schedule_kind(schedule_type):
    """A1111's schedule type (a label, its API's name, any case) or an sdrt sigma schedule ->
    "automatic" (also for none given), "uniform", "karras" or a ``SIGMA_SCHEDULES`` name; None
    for one sdrt does not have."""
    if schedule_type in (None, ""):
        return "automatic"
    return _KINDS.get(schedule_type.lower()) if isinstance(schedule_type, str) else None


def _own_schedule(sid):
    """An sdrt sampler id -> (the sampler on its own spacing, the schedule kind it names or
    None)."""
    base, schedule = split_sampler(sid)
    for kind in ("karras", "exponential"):
        if schedule is None and base.endswith("_" + kind):
            return base.removesuffix("_" + kind), kind
    return base, schedule


def sampler_id(label, schedule_type=None):
    """An A1111 sampler label or alias (case-insensitive), or an sdrt id -> the sdrt id; None
    for a name that is neither. With A1111's ``schedule_type``: "Automatic" (or none) gives
    an A1111 label A1111's default schedule for it (``AUTOMATIC_SCHEDULES``: "DPM++ 2M" is
    Karras, as in A1111 1.9 on) and anything else (an sdrt id too) as it is; "Uniform" the
    sampler on its own spacing; any other the sampler on that schedule ("X Karras" and
    "X_S" name theirs already: another is None). None where sdrt has no such pair."""
    if not isinstance(label, str):
        return None
    sid = _BY_NAME.get(label.lower()) or (label if split_sampler(label) else None)
    kind = schedule_kind(schedule_type)
    if sid is None and kind == "automatic":
        # A1111 also reads a schedule type's label at the end of the sampler's ("DPM++ 2M
        # SGM Uniform"), as it reads the old "DPM++ 2M Karras".
        for name in _KINDS:
            if label.lower().endswith(" " + name) and label[:-len(name) - 1] in _LABELS:
                return sampler_id(label[:-len(name) - 1], name)
    if sid is None or kind is None:
        return None
    base, own = _own_schedule(sid)
    if kind == "automatic":
        # (an sdrt id, "dpm2" say, is the sampler itself, not A1111's label "DPM2")
        kind = None if label in SAMPLER_NAMES else _AUTOMATIC.get(label.lower())
        if kind is None:
            return sid
    if kind == "uniform":
        return base
    if own not in (None, kind):
        return None  # "X Karras" with schedule type Exponential
    variant = f"{base}_{kind}"
    return variant if split_sampler(variant) else None


def sampler_label(sid):
    """The A1111 sampler label of sdrt sampler ``sid`` (an X_S sampler's is X's); anything
    else as it is."""
    split = split_sampler(sid)
    return sid if split is None else SAMPLER_LABELS[sid if split[1] is None else split[0]]


def beta_shape(sid):
    """The Beta distribution's parameters A1111 writes beside its Beta schedule type:
    {"Beta schedule alpha": "0.6", "Beta schedule beta": "0.6"} for an X_beta sampler, else
    {}."""
    if (split_sampler(sid) or (None, None))[1] != "beta":
        return {}
    return {f"Beta schedule {k}": number(v) for k, v in zip(("alpha", "beta"), BETA_SHAPE)}


def written_schedule(sid):
    """The "Schedule type" to write beside sampler ``sid``'s label: an X_S sampler's schedule,
    "Uniform" where A1111 would otherwise read the label with another default schedule; None
    elsewhere."""
    split = split_sampler(sid)
    if split is None:
        return None
    if split[1] is not None:
        return _WRITTEN[split[1]]
    return "Uniform" if SAMPLER_LABELS[sid].lower() in _AUTOMATIC else None


def quote(value):
    """A1111's ``quote``: a value with ``,``, ``:`` or a newline as a JSON string, else as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def number(value):
    """A number as A1111's UI writes a slider value: ``7`` for 7.0, ``7.5`` for 7.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# A1111's ControlNet extension's resize modes, by the name sdrt's --resize-mode gives them.
CONTROL_RESIZE_LABELS = {"resize": "Just Resize", "crop": "Crop and Resize",
                         "fill": "Resize and Fill"}


def controlnet_unit(model, weight, resize_mode, start, end, guess_mode=False, processor=None,
                    mode="balanced"):
    """One ControlNet unit as A1111's extension writes it in a PNG's ``ControlNet N`` value;
    ``model`` "NAME [HASH]" or "NAME", ``resize_mode`` a ``CONTROL_RESIZE_LABELS`` key,
    ``processor`` the (module, resolution, threshold A, threshold B, pixel perfect) of a
    preprocessor that ran (a setting it lacks None, written -1 as the extension reads it),
    ``mode`` a ``controlnet.CONTROL_MODES`` name. diffusers' guess mode is none of the
    extension's control modes: it is named as itself."""
    module, settings = "none", ()
    if processor is not None:
        module, res, a, b, perfect = processor
        settings = tuple(f"{k}: {number(-1 if v is None else v)}" for k, v in (
            ("Processor Res", res), ("Threshold A", a), ("Threshold B", b)))
    return ", ".join((f"Module: {module}", f"Model: {model}", f"Weight: {number(weight)}",
                      f"Resize Mode: {CONTROL_RESIZE_LABELS[resize_mode]}", *settings,
                      f"Guidance Start: {number(start)}", f"Guidance End: {number(end)}",
                      *((f"Pixel Perfect: {bool(perfect)}",) if processor else ()),
                      "Guess Mode: True" if guess_mode else
                      f"Control Mode: {CONTROL_MODES[mode][0]}"))


@dataclass(frozen=True)
class Infotext:
    """The settings of one image; ``str(info)`` is its ``parameters`` text."""
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str               # sdrt's id, written with A1111's label
    cfg_scale: float
    seed: int                  # this image's seed
    width: int
    height: int
    model_name: str = None
    model_hash: str = None     # A1111's short hash: the first 10 hex digits of the sha256
    denoising_strength: float = None  # image-to-image only
    clip_skip: int = 0         # sdrt's count of skipped layers
    mask_blur: int = None      # inpainting only: the mask's blur, in pixels
    masked_padding: int = None  # inpainting only the masked area: its padding, in pixels
    masked_content: str = None  # inpainting: "fill" where the masked part was filled first
    noise_multiplier: float = None  # image to image: A1111's noise multiplier, where not 1
    hires: tuple = ()          # ((key, value), ...): a hires fix's pairs (hires.Hires.params)
    script: tuple = ()         # ((key, value), ...): a script's (SD upscale: sd_upscale.params)
    version: str = None
    lora_hashes: tuple = ()    # ((name, A1111 short hash), ...) of the LoRAs applied
    ti_hashes: tuple = ()      # ((token, A1111 short hash), ...) of the embeddings loaded
    refiner: str = None        # "NAME [short hash]" of an SDXL refiner that finished the image
    refiner_switch_at: float = None  # where in the schedule the refiner took over
    controlnets: tuple = ()    # (("ControlNet 0", "Module: none, Model: ..."), ...) per unit
    vae_name: str = None       # a VAE of its own (A1111's SD VAE): its file's name
    vae_hash: str = None       # and A1111's short hash of it
    subseed: int = None        # this image's variation seed, where subseed_strength is > 0
    subseed_strength: float = None
    seed_resize_from: tuple = None  # (height, width) of A1111's "Resize seed from", or None
    eta_ddim: float = None     # A1111's eta of a DDIM run, where it is not A1111's default 0
    tiling: bool = False       # A1111's Tiling (seamless: the convolutions wrap around)

    def params(self):
        """The ``Key: value`` pairs in A1111's order, without the ones that are not set."""
        pairs = {
            "Steps": self.steps,
            "Sampler": sampler_label(self.sampler),
            "Schedule type": written_schedule(self.sampler),
            **beta_shape(self.sampler),
            "CFG scale": number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            "VAE hash": self.vae_hash,
            "VAE": self.vae_name,
            "Variation seed": self.subseed if self.subseed_strength else None,
            "Variation seed strength": (number(self.subseed_strength) if self.subseed_strength
                                        else None),
            "Seed resize from": ("{1}x{0}".format(*self.seed_resize_from)
                                 if self.seed_resize_from else None),
            "Denoising strength": (None if self.denoising_strength is None
                                   else number(self.denoising_strength)),
            "Clip skip": self.clip_skip + 1 if self.clip_skip else None,
            "Tiling": "True" if self.tiling else None,
            "Mask blur": self.mask_blur,
            "Masked content": self.masked_content,
            "Inpaint area": None if self.masked_padding is None else "Only masked",
            "Masked area padding": self.masked_padding,
            "Noise multiplier": (None if self.noise_multiplier in (None, 1)
                                 else number(self.noise_multiplier)),
            **{k: (number(v) if isinstance(v, float) else
                   sampler_label(v) if k == "Hires sampler" else v)
               for k, v in self.hires},
            "Hires schedule type": written_schedule(dict(self.hires).get("Hires sampler")),
            **dict(self.script),
            "Eta DDIM": None if self.eta_ddim is None else number(self.eta_ddim),
            "Refiner": self.refiner,
            "Refiner switch at": (None if self.refiner_switch_at is None
                                  else number(self.refiner_switch_at)),
            **dict(self.controlnets),
            "Lora hashes": ", ".join(f"{n}: {h}" for n, h in self.lora_hashes) or None,
            "TI hashes": ", ".join(f"{n}: {h}" for n, h in self.ti_hashes) or None,
            "Version": self.version,
        }
        return {k: v for k, v in pairs.items() if v is not None}

    def __str__(self):
        settings = ", ".join(f"{k}: {quote(v)}" for k, v in self.params().items())
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{settings}".strip()


# One ``Key: value`` pair of the settings line, as A1111's reader matches it: a quoted value is
# a JSON string (it may hold commas), any other runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse(text):
    """A ``parameters`` text → (prompt, negative prompt, {key: value}), read as A1111's
    ``parse_generation_parameters`` reads it: the last line holds the settings when at least
    three pairs are found there (otherwise it belongs to the prompt), quoted values are
    unquoted, and ``Negative prompt:`` starts the negative prompt, which runs to the settings."""
    lines = text.strip().split("\n")
    pairs = {}
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        for key, value in _PAIR.findall(lines.pop()):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            pairs[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), pairs


def png_bytes(image, parameters, chunks=None):
    """A PIL image as PNG bytes with ``parameters`` in a text chunk of that name, and each
    of ``chunks`` ({name: text}, such as ComfyUI's "prompt") in its own."""
    import io

    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    for name, text in (chunks or {}).items():
        info.add_text(name, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def model_identity(path, pipe):
    """(name, A1111 short hash, full sha256) of the model. A single file is hashed as A1111
    hashes it (sha256 of the file; the short hash is its first 10 hex digits). A folder is
    identified by its safetensors headers (names, shapes, dtypes) and sizes, which is cheap
    for a multi-GB model; the built-in model by its weights."""
    h = hashlib.sha256()
    if path is None:
        for module in (pipe.text_encoder, pipe.unet, pipe.vae):
            for name, tensor in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        name = BUILT_IN
    elif os.path.isfile(path):
        h = _file_sha256(path)
        name = os.path.splitext(os.path.basename(path))[0]
    else:
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".safetensors"):
                    p = os.path.join(root, f)
                    with open(p, "rb") as fh:
                        header = int.from_bytes(fh.read(8), "little")
                        h.update(os.path.relpath(p, path).encode())
                        h.update(fh.read(min(header, 100 * 2 ** 20)))
                    h.update(str(os.path.getsize(p)).encode())
        name = os.path.basename(os.path.normpath(path))
    full = h.hexdigest()
    return name, full[:10], full


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def file_stem(path):
    """The name a model file or folder goes by (a ControlNet's, as A1111 lists it): the
    file's name without its extension, or the folder's name."""
    return os.path.splitext(os.path.basename(os.path.normpath(os.fspath(path))))[0]


def numbered_stems(paths):
    """The name each file or folder of ``paths`` is loaded under: its ``file_stem``,
    numbered where two are the same."""
    stems = [file_stem(p) for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def short_hash(path):
    """A1111's short hash of a LoRA or embedding file (its ``Lora hashes`` / ``TI hashes``):
    the first 12 hex digits of the file's sha256."""
    return _file_sha256(path).hexdigest()[:12]


# A1111's LoRA tag in a prompt: <lora:NAME>, <lora:NAME:SCALE>, <lora:NAME:TE:UNET>, fields
# also named (te=, unet=).
_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


def lora_tags(prompt):
    """A prompt → (the prompt without its ``<lora:...>`` tags, [(name, scale), ...]), as A1111
    reads them: the first number is the text encoders' multiplier (default 1), the second the
    UNet's (default the first's), or named ``te=`` / ``unet=``; the scale one number where they
    agree, else the pair (UNet's, text encoders') sdrt's LoRAs take. Raises ``ValueError``
    saying why for a multiplier that is not a number, or A1111's dynamic rank (``dyn``, a
    third number), which sdrt does not have."""
    tags = []
    for m in _LORA_TAG.finditer(prompt):
        fields = m.group(2).split(":")[1:]
        positional = [f.strip() for f in fields if "=" not in f]
        named = dict((k.strip(), v.strip()) for k, _, v in
                     (f.partition("=") for f in fields if "=" in f))
        name = m.group(1).strip()
        if len(positional) > 2 or "dyn" in named or set(named) - {"te", "unet", "dyn"}:
            raise ValueError(f"<lora:{name}:...> has fields sdrt does not take (A1111's te, "
                             f"unet; not its dynamic rank dyn)")
        try:
            te = float(positional[0]) if positional and positional[0] else 1.0
            te = float(named.get("te", te))
            unet = float(positional[1]) if len(positional) > 1 and positional[1] else te
            unet = float(named.get("unet", unet))
        except ValueError:
            raise ValueError(f"<lora:{name}:...> has a multiplier that is not a "
                             f"number") from None
        tags.append((name, te if te == unet else (unet, te)))
    return _LORA_TAG.sub("", prompt).strip(), tags


def lora_tag(name, scale):
    """The A1111 tag of LoRA ``name`` at ``scale`` (one number, or (UNet's, text
    encoders')): ``<lora:name:s>`` or ``<lora:name:te:unet>``."""
    if isinstance(scale, tuple):
        return f"<lora:{name}:{number(scale[1])}:{number(scale[0])}>"
    return f"<lora:{name}:{number(scale)}>"
