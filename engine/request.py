"""A generation request and the limits it is checked against, before any model is involved.

``GenerationRequest.check`` makes every check that needs no model: types (``True`` is not an
integer, ``"7"`` is not a number), finiteness, ranges, prompts that are text Python can encode,
a known sampler. The pipeline then checks what depends on the model (sizes against the VAE's
scale factor, ``clip_skip`` against the text encoder's depth, the request's memory against the
device) in one place. The CLI, the Python API and a server share this object.

This module imports neither torch nor numpy, so the CLI can refuse a bad argument in well
under a second, before it imports them.

Every message has the form ``"<name> must be <what is allowed>, got <value>"``, where ``name``
is the API argument's name or the caller's own (the CLI passes ``{"guidance_scale":
"--guidance", ...}``).
"""
import importlib.util
import math
import numbers
import os
import random
from dataclasses import dataclass, fields, replace

from .errors import SdrtError

# The samplers sdrt implements (``schedules.SAMPLERS`` is the same tuple), here so that a
# sampler name can be checked without importing torch.
SAMPLER_NAMES = ("ddim", "pndm", "euler", "euler_karras", "euler_a", "euler_a_karras", "heun",
                 "heun_karras", "dpm2", "dpm2_karras", "dpm2_a", "dpm2_a_karras", "dpmpp_2s_a",
                 "dpmpp_2s_a_karras", "dpmpp_sde",
                 "dpmpp_sde_karras", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde",
                 "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_2m_sde_heun",
                 "dpmpp_2m_sde_heun_karras", "dpmpp_2m_sde_heun_exponential", "dpmpp_3m_sde",
                 "dpmpp_3m_sde_karras", "dpmpp_3m_sde_exponential", "lms", "lms_karras", "unipc",
                 "unipc_karras", "deis", "deis_karras", "lcm", "restart", "restart_karras",
                 "uni_pc", "uni_pc_karras", "uni_pc_bh2", "uni_pc_bh2_karras", "ipndm",
                 "ipndm_karras", "ipndm_v", "ipndm_v_karras", "gradient_estimation",
                 "gradient_estimation_karras", "comfy_deis", "comfy_deis_karras",
                 "res_multistep", "res_multistep_karras", "res_multistep_a",
                 "res_multistep_a_karras", "ddpm", "ddpm_karras", "er_sde", "er_sde_karras",
                 "cfgpp_euler", "cfgpp_euler_karras", "cfgpp_euler_a", "cfgpp_euler_a_karras",
                 "cfgpp_dpmpp_2m", "cfgpp_dpmpp_2m_karras", "cfgpp_res_multistep",
                 "cfgpp_res_multistep_karras", "cfgpp_res_multistep_a",
                 "cfgpp_res_multistep_a_karras", "cfgpp_gradient_estimation",
                 "cfgpp_gradient_estimation_karras", "dpm_fast", "dpm_fast_karras",
                 "dpm_fast_a", "dpm_fast_a_karras", "heunpp2", "heunpp2_karras",
                 "cfgpp_dpmpp_2s_a", "cfgpp_dpmpp_2s_a_karras", "cfgpp_ddim", "seeds_2",
                 "seeds_2_karras", "seeds_3", "seeds_3_karras", "sa_solver", "sa_solver_karras",
                 "sa_solver_pece", "sa_solver_pece_karras")
# Sigma schedules beyond each sampler's own (its diffusers scheduler's spacing, or the Karras
# and exponential variants above), built by ``sigma_schedules``: A1111's schedule types and
# ComfyUI's schedulers, by ComfyUI's names (where the two differ, ComfyUI's is "comfy_X").
# Sampler "X_S" is sampler X on schedule S; X is one of SIGMA_SAMPLERS.
SIGMA_SCHEDULES = ("exponential", "sgm_uniform", "normal", "simple", "ddim_uniform", "beta",
                   "kl_optimal", "align_your_steps", "comfy_beta", "comfy_kl_optimal",
                   "linear_quadratic", "comfy_ays_sd1", "comfy_ays_sdxl")
# The beta schedules' Beta(alpha, beta) (Lee et al. 2024, "Beta Sampling is All You Need"):
# A1111's default setting and ComfyUI's fixed values.
BETA_SHAPE = (0.6, 0.6)
# The samplers that step along any table of noise levels (DDIM, PNDM and LCM step along
# their alpha-bar grids).
SIGMA_SAMPLERS = ("euler", "euler_a", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde",
                  "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lms", "unipc",
                  "deis", "restart", "uni_pc", "uni_pc_bh2", "ipndm", "ipndm_v",
                  "gradient_estimation", "comfy_deis", "res_multistep", "res_multistep_a", "ddpm",
                  "er_sde", "cfgpp_euler", "cfgpp_euler_a", "cfgpp_dpmpp_2m", "cfgpp_res_multistep",
                  "cfgpp_res_multistep_a", "cfgpp_gradient_estimation", "dpm_fast",
                  "dpm_fast_a", "heunpp2", "cfgpp_dpmpp_2s_a", "seeds_2", "seeds_3",
                  "sa_solver", "sa_solver_pece")
# The CFG++ samplers (Chung et al. 2024, ComfyUI's *_cfg_pp, A1111's "DDIM CFG++"): each step
# also reads the unconditional prediction, so they run the unconditional pass whatever the
# guidance scale (ComfyUI's cfg 1 too), the scale as given (below 1 too).
CFG_PP_PREFIX = "cfgpp_"
# A1111's DDIM CFG++ guides with its CFG scale divided by this (scales 0 to 12.5 map to
# CFG++'s lambda in [0, 1]); ComfyUI's CFG++ samplers take the scale as their lambda.
A1111_CFG_PP_DIVISOR = 12.5
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# How a prompt string is read: A1111's syntax (weights, BREAK, 75-token chunks past 77 tokens;
# prompt_syntax.py), as plain text (cut at 77 tokens, as diffusers does), or as ComfyUI reads it
# (its weights and chunks: comfy_prompt.py).
PROMPT_SYNTAXES = ("a1111", "plain", "comfy")
# The micro-conditioning arguments (SDXL), each a (height, width) or (top, left) pair, or a score.
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size",
                      "negative_original_size", "negative_crops_coords_top_left",
                      "negative_target_size", "aesthetic_score", "negative_aesthetic_score")
MAX_MICRO_SIZE = 2 ** 16  # pixels: far past any training image
MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed takes any 64-bit value
MAX_PAG_SCALE = 100.0  # ComfyUI's PerturbedAttentionGuidance's slider's end
MAX_NOISE_MULTIPLIER = 10.0  # A1111's slider ends at 1.5; past 10 the noise swamps any image
MAX_FREEU_FACTOR = 10.0  # ComfyUI's FreeU sliders' end
MAX_NESTING = 100  # a prompt's ( and [ nested deeper than any real prompt nests them
MAX_LORA_SCALE = 100.0  # ComfyUI's LoraLoader strengths' end; past it a merge overflows fp16
# guidance_rescale's: the stds of the UNet's outputs (diffusers' pipelines) or of the
# velocities they predict (ComfyUI's RescaleCFG)
RESCALE_STYLES = ("diffusers", "comfy")
# A zero-terminal-SNR schedule's scheduler config fields (Lin et al. 2023): the betas
# rescaled so that the last training level is pure noise, and trailing timesteps so that the
# first step starts there (diffusers' recipe; ComfyUI's zsnr, A1111's "Zero Terminal SNR").
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
RANDOM_SEED = -1        # seed=-1: draw one, as A1111 users expect
# A ControlNet's largest conditioning scale: A1111's weight slider ends at 2; past 10 the
# residuals swamp the UNet's own features.
MAX_CONTROL_SCALE = 10.0
# A1111's ControlNet extension's control modes, by sdrt's name: the extension's label and
# number. "prompt" softens the residuals towards the first skips; "controlnet" does too, and
# keeps them from the unconditional half of the CFG batch, so CFG pushes towards the
# ControlNet (``controlnet.residual_scales``).
CONTROL_MODES = {"balanced": ("Balanced", 0), "prompt": ("My prompt is more important", 1),
                 "controlnet": ("ControlNet is more important", 2)}


@dataclass(frozen=True)
class Limits:
    """What one call (or one model) may ask for. Each field can be raised with an environment
    variable read by ``Limits.from_env()`` (``SDRT_`` + the field's name in capitals, e.g.
    ``SDRT_MAX_IMAGES=128``), or by passing ``Limits(...)`` to the pipeline (``pipe.limits``).
    """
    max_side: int = 4096           # height and width, in pixels
    max_images: int = 64           # images per call: prompts × num_images_per_prompt
    max_steps: int = 1000          # num_inference_steps (no SD schedule has more timesteps)
    max_guidance: float = 100.0    # guidance_scale; past ~30 images saturate, past 1e4 overflow
    max_prompt_chars: int = 20000  # characters per prompt; CLIP reads 77 tokens of it
    max_parameters: int = 20_000_000_000  # text encoder + UNet + VAE, counted from the configs
    # The memory a request (or a model's weights) may plan to use: this fraction of what the
    # device has available at the time (CPU: available RAM; CUDA: free device memory) ...
    memory_fraction: float = 0.9
    # ... or, when set, this many bytes whatever the device reports.
    memory_bytes: int = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "memory_bytes" and value is None:
                continue
            if not _is_real(value) or not 0 < value < math.inf:
                raise SdrtError(f"Limits.{f.name} must be a positive number, got {value!r}")
        if self.memory_fraction > 1:
            raise SdrtError(f"Limits.memory_fraction must be at most 1, got "
                            f"{self.memory_fraction!r} (set memory_bytes to plan past the "
                            f"device's available memory)")

    @classmethod
    def from_env(cls, environ=None):
        """The defaults, overridden by ``SDRT_MAX_SIDE``, ``SDRT_MAX_IMAGES``,
        ``SDRT_MAX_STEPS``, ``SDRT_MAX_GUIDANCE``, ``SDRT_MAX_PROMPT_CHARS``,
        ``SDRT_MAX_PARAMETERS``, ``SDRT_MEMORY_FRACTION`` and ``SDRT_MEMORY_BYTES`` where set."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            var = "SDRT_" + f.name.upper()
            text = environ.get(var, "").strip()
            if not text:
                continue
            try:
                number = float(text)
            except ValueError:
                raise SdrtError(f"{var} must be a number, got {text!r}") from None
            if f.name != "memory_fraction" and f.name != "max_guidance":
                if not number.is_integer():
                    raise SdrtError(f"{var} must be a whole number, got {text!r}")
                number = int(number)
            values[f.name] = number
        try:
            return cls(**values)
        except SdrtError as e:
            raise SdrtError(f"{e} (from the SDRT_* environment variables)") from None


def _is_int(value):
    # numbers.Integral covers numpy's integers; bool is an int subclass but not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def short_repr(value, width=80):
    """``repr(value)`` on one line, cut to ``width`` characters (a 10 MB prompt is not
    echoed, an array's rows not printed one under another)."""
    text = " ".join(repr(value).splitlines())
    return text if len(text) <= width else text[:width - 5] + "…" + text[-4:]


def split_sampler(name):
    """A sampler id → (the sampler that steps, the ``SIGMA_SCHEDULES`` entry it steps along,
    None for its own); None for a name that is not a sampler id."""
    if name in SAMPLER_NAMES:
        return name, None
    if not isinstance(name, str):
        return None
    for schedule in SIGMA_SCHEDULES:
        base = name.removesuffix("_" + schedule)
        if base != name and base in SIGMA_SAMPLERS:
            return base, schedule
    return None


def sampler_family(name):
    """The sampling loop a sampler id runs: the stepping sampler without its ``_karras``
    levels or sigma schedule (``euler_a_karras`` and ``euler_a_beta`` → ``euler_a``); None for
    a name that is not a sampler id."""
    split = split_sampler(name)
    return None if split is None else split[0].removesuffix("_karras")


def sampler_choices():
    """The sampler ids, said in one line for an error or a help text."""
    return (f"one of {', '.join(SAMPLER_NAMES)}, or X_S for X one of "
            f"{', '.join(SIGMA_SAMPLERS)} and S one of {', '.join(SIGMA_SCHEDULES)}")


def sampler_missing(sampler):
    """What ``sampler`` needs beyond torch that is not installed, as "what: the pip command"
    (torchsde for dpmpp_sde*'s Brownian-tree noise, scipy for the beta schedules' quantiles;
    looked up, not imported); None when nothing is missing."""
    base, schedule = split_sampler(sampler) or (sampler, None)
    needs = []
    if base.startswith("dpmpp_sde"):
        needs.append(("torchsde", "sde", "draws its Brownian-tree noise with torchsde"))
    if schedule in ("beta", "comfy_beta"):
        needs.append(("scipy", "schedules", "takes the beta distribution's quantiles from scipy"))
    for module, extra, why in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module set to None in sys.modules: not importable
            found = False
        if not found:
            return f"{sampler} {why}: pip install 'sdrt[{extra}]'"
    return None


def check_text(text, name):
    """Refuse a string Python cannot encode as UTF-8: a lone surrogate, which is what invalid
    UTF-8 from the command line becomes (``'\\udcff'``), named with its position; and
    brackets nested past ``MAX_NESTING`` (the prompt parsers recurse per level)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # only a surrogate cannot be encoded
        raise SdrtError(f"{name} must be valid Unicode text, got {text[e.start]!r} at position "
                        f"{e.start} (a lone surrogate, e.g. a byte that is not UTF-8)") from None
    depth = deepest = 0
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]" and depth:
            depth -= 1
    if deepest > MAX_NESTING:
        raise SdrtError(f"{name} must nest brackets at most {MAX_NESTING} deep, got {deepest}")


@dataclass(frozen=True)
class GenerationRequest:
    """The arguments of one call, as given; ``check`` refuses what no model could run."""
    prompt: object
    negative_prompt: object = None
    height: object = None
    width: object = None
    num_inference_steps: object = 50
    guidance_scale: object = 7.5
    sampler: object = None
    seed: object = None
    strength: object = 0.8
    num_images_per_prompt: object = 1
    clip_skip: object = 0
    output_type: object = "pil"
    has_image: bool = False
    prompt_syntax: object = "a1111"
    # Two text encoders (SDXL): the second one's prompts, by default the first's.
    prompt_2: object = None
    negative_prompt_2: object = None
    # SDXL's micro-conditioning, named as diffusers' arguments: (height, width) pairs, the
    # crop's (top, left), the refiner's aesthetic scores. None: the family's default.
    original_size: object = None
    crops_coords_top_left: object = None
    target_size: object = None
    negative_original_size: object = None
    negative_crops_coords_top_left: object = None
    negative_target_size: object = None
    aesthetic_score: object = None
    negative_aesthetic_score: object = None
    # Where in the noise schedule the run starts and ends, as fractions in (0, 1): the SDXL
    # base stops at denoising_end and the refiner takes over at denoising_start.
    denoising_start: object = None
    denoising_end: object = None
    # A1111's variation seed: the initial noise of image i slerped towards the noise of
    # subseed + i (or of the list's i-th) by subseed_strength in [0, 1] (0: off; -1 or None
    # with a strength: a random subseed)
    subseed: object = None
    subseed_strength: object = 0.0
    # A1111's "Resize seed from": (height, width) of the picture whose noise is centred in this
    # one's (the noise the seed draws at that size, cut or framed by what it draws at this
    # one); None: off
    seed_resize_from: object = None
    # A1111's "Noise multiplier for img2img": image to image's initial noise times this
    initial_noise_multiplier: object = 1.0
    # perturbed-attention guidance's scale (diffusers' pag_scale; 0: off)
    pag_scale: object = 0.0
    # the rescale of classifier-free guidance (diffusers' guidance_rescale; 0: off), and
    # whose: RESCALE_STYLES
    guidance_rescale: object = 0.0
    guidance_rescale_style: object = "diffusers"
    # the negative half's text conditioning (states, pooled) zeros, whatever its text
    # (ComfyUI's ConditioningZeroOut on the negative)
    zero_out_negative: object = False

    def check(self, names=None, limits=None):
        """Every model-free check; returns the request with its numbers as plain ``int`` and
        ``float`` and its prompts as lists. ``names`` maps a field to the name messages use
        (default: the field's own); ``limits`` defaults to ``Limits.from_env()``."""
        limits = Limits.from_env() if limits is None else limits
        names = names or {}
        name = lambda field: names.get(field, field)

        def fail(field, allowed, value, described=None):
            got = described or short_repr(value)
            raise SdrtError(f"{name(field)} must be {allowed}, got {got}")

        def integer(field, lo, hi, allowed=None):
            value = getattr(self, field)
            if not _is_int(value) or not lo <= value <= hi:
                fail(field, allowed or f"an integer from {lo} to {hi}", value)
            return int(value)

        def number(field, ok, allowed):
            value = getattr(self, field)
            if not _is_real(value) or not math.isfinite(value) or not ok(value):
                fail(field, allowed, value)
            return float(value)

        prompts = self._texts("prompt", self.prompt, name, limits)
        if len(prompts) > limits.max_images:
            fail("prompt", f"at most {limits.max_images} prompts (SDRT_MAX_IMAGES)", None,
                 f"a list of {len(prompts)}")
        negatives = None
        if self.negative_prompt is not None:
            negatives = self._texts("negative_prompt", self.negative_prompt, name, limits)
            if len(negatives) not in (1, len(prompts)):
                fail("negative_prompt", f"one string or a list of {len(prompts)} (one per "
                     f"prompt)", None, f"a list of {len(negatives)}")
        per_prompt_max = max(limits.max_images // len(prompts), 1)
        per_prompt = integer("num_images_per_prompt", 1, per_prompt_max,
                             f"an integer from 1 to {per_prompt_max} ({limits.max_images} "
                             f"images per call, SDRT_MAX_IMAGES, for {len(prompts)} "
                             f"prompt{'s' if len(prompts) > 1 else ''})")
        sizes = {f: None if getattr(self, f) is None else integer(f, 1, limits.max_side)
                 for f in ("height", "width")}
        steps = integer("num_inference_steps", 1, limits.max_steps)
        guidance = self._guidance(fail, len(prompts), limits)
        strength = number("strength", lambda v: 0 < v <= 1, "a number in (0, 1]")
        clip_skip = integer("clip_skip", 0, 10 ** 6, "an integer of 0 or more")
        if self.sampler is not None and split_sampler(self.sampler) is None:
            fail("sampler", sampler_choices(), self.sampler)
        missing = None if self.sampler is None else sampler_missing(self.sampler)
        if missing:
            fail("sampler", f"a sampler whose package is installed ({missing})", self.sampler)
        if self.output_type not in OUTPUT_TYPES:
            fail("output_type", f"one of {', '.join(OUTPUT_TYPES)}", self.output_type)
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            fail("prompt_syntax", f"one of {', '.join(PROMPT_SYNTAXES)}", self.prompt_syntax)
        seed = self.seed
        if seed is not None and not (_is_int(seed) and seed == RANDOM_SEED):
            seed = integer("seed", 0, MAX_SEED, "-1 (random) or an integer from 0 to 2**64 - 1")
        if not isinstance(self.has_image, bool):
            fail("has_image", "True or False", self.has_image)
        texts_2 = {}
        for field, like in (("prompt_2", prompts), ("negative_prompt_2", negatives or [""])):
            value = getattr(self, field)
            if value is not None:
                texts_2[field] = self._texts(field, value, name, limits)
                if len(texts_2[field]) not in (1, len(like)):
                    fail(field, f"one string or a list of {len(like)} (one per prompt)", None,
                         f"a list of {len(texts_2[field])}")
        extra = {}
        for field in MICRO_CONDITIONING:
            value = getattr(self, field)
            if value is None:
                continue
            if field.endswith("aesthetic_score"):
                extra[field] = number(field, lambda v: abs(v) <= 1000,
                                      "a finite number from -1000 to 1000")
                continue
            lo = 0 if "crops" in field else 1
            if not isinstance(value, (list, tuple)) or len(value) != 2 or \
                    not all(_is_int(v) and lo <= v <= MAX_MICRO_SIZE for v in value):
                what = "(top, left)" if "crops" in field else "(height, width)"
                fail(field, f"a pair {what} of integers from {lo} to {MAX_MICRO_SIZE}", value)
            extra[field] = (int(value[0]), int(value[1]))
        for field in ("denoising_start", "denoising_end"):
            if getattr(self, field) is not None:
                extra[field] = number(field, lambda v: 0 < v < 1, "a number in (0, 1)")
        extra["subseed_strength"] = number("subseed_strength", lambda v: 0 <= v <= 1,
                                           "a number from 0 to 1")
        extra["initial_noise_multiplier"] = number(
            "initial_noise_multiplier", lambda v: 0 <= v <= MAX_NOISE_MULTIPLIER,
            f"a number from 0 to {MAX_NOISE_MULTIPLIER:g}")
        if extra["initial_noise_multiplier"] != 1 and not self.has_image:
            fail("initial_noise_multiplier", "1 without an image (it scales image to image's "
                 "initial noise)", self.initial_noise_multiplier)
        extra["pag_scale"] = number("pag_scale", lambda v: 0 <= v <= MAX_PAG_SCALE,
                                    f"a number from 0 to {MAX_PAG_SCALE:g}")
        extra["guidance_rescale"] = number("guidance_rescale", lambda v: 0 <= v <= 1,
                                           "a number from 0 to 1")
        if self.guidance_rescale_style not in RESCALE_STYLES:
            fail("guidance_rescale_style", f"one of {', '.join(RESCALE_STYLES)}",
                 self.guidance_rescale_style)
        if not isinstance(self.zero_out_negative, bool):
            fail("zero_out_negative", "True or False", self.zero_out_negative)
        subseeds = self.subseed
        if subseeds is not None and not (_is_int(subseeds) and subseeds == RANDOM_SEED):
            subseeds = subseeds if isinstance(subseeds, (list, tuple)) else [subseeds]
            if not subseeds or not all(_is_int(v) and 0 <= v <= MAX_SEED for v in subseeds):
                fail("subseed", "-1 (random), an integer from 0 to 2**64 - 1 or a list of them "
                     "(one per image)", self.subseed)
            extra["subseed"] = (int(subseeds[0]) if not isinstance(self.subseed, (list, tuple))
                                else [int(v) for v in subseeds])
        if self.seed_resize_from is not None:
            value = self.seed_resize_from
            if not isinstance(value, (list, tuple)) or len(value) != 2 or \
                    not all(_is_int(v) and 1 <= v <= limits.max_side for v in value):
                fail("seed_resize_from", f"None or a pair (height, width) of integers from 1 "
                     f"to {limits.max_side}", value)
            extra["seed_resize_from"] = (int(value[0]), int(value[1]))
        if self.denoising_start is not None and not self.has_image:
            fail("denoising_start", "None without an image (it continues denoising an image's "
                 "latents, as the SDXL refiner after the base's denoising_end)",
                 self.denoising_start)
        if extra.get("denoising_start", 0) >= extra.get("denoising_end", 1):
            fail("denoising_end", f"above denoising_start ({extra['denoising_start']})",
                 extra["denoising_end"])
        return replace(self, prompt=prompts, negative_prompt=negatives, **texts_2, **extra,
                       num_images_per_prompt=per_prompt, num_inference_steps=steps,
                       guidance_scale=guidance, strength=strength,
                       clip_skip=clip_skip, seed=None if seed is None else int(seed), **sizes)

    def _guidance(self, fail, n_prompts, limits):
        """One scale for every prompt (a float), or one per prompt (a tuple of floats)."""
        allowed = f"a finite number from 0 to {limits.max_guidance:g}"
        ok = lambda v: _is_real(v) and math.isfinite(v) and 0 <= v <= limits.max_guidance
        value = self.guidance_scale
        if not isinstance(value, (list, tuple)):
            if not ok(value):
                fail("guidance_scale", allowed, value)
            return float(value)
        if len(value) != n_prompts:
            fail("guidance_scale", f"a number or a list of {n_prompts} (one per prompt)", None,
                 f"a list of {len(value)}")
        for i, v in enumerate(value):
            if not ok(v):
                fail("guidance_scale", f"a list of {allowed.replace('a finite number', 'numbers')}",
                     None, f"{short_repr(v)} at index {i}")
        return tuple(float(v) for v in value)

    @staticmethod
    def _texts(field, value, name, limits):
        """A string or a non-empty list of strings → a list, each encodable and not too long."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or not texts or \
                not all(isinstance(t, str) for t in texts):
            raise SdrtError(f"{name(field)} must be a string or a non-empty list of strings, "
                            f"got {short_repr(value)}")
        for i, text in enumerate(texts):
            where = name(field) if isinstance(value, str) else f"{name(field)}[{i}]"
            if len(text) > limits.max_prompt_chars:
                raise SdrtError(f"{where} must be at most {limits.max_prompt_chars} characters "
                                f"(SDRT_MAX_PROMPT_CHARS), got {len(text)}")
            check_text(text, where)
        return list(texts)

    # -- what a checked request implies ---------------------------------------------------------

    @property
    def guidance(self):
        """Whether the request batches an unconditional pass (classifier-free guidance): when
        any of its scales is above 1, or its sampler is a CFG++ one."""
        return max(self.scales()) > 1.0 or self.cfg_pp

    @property
    def cfg_pp(self):
        """Whether the request's sampler is a CFG++ one (``CFG_PP_PREFIX``)."""
        return isinstance(self.sampler, str) and self.sampler.startswith(CFG_PP_PREFIX)

    def scales(self):
        """The guidance scale of each prompt (of a checked request)."""
        g = self.guidance_scale
        return list(g) if isinstance(g, tuple) else [g] * len(self.prompt)

    def row_scales(self):
        """The guidance scale of each image, prompt-major like the batch; a scale of 1 or less
        in a guided batch counts as 1 (the conditional prediction alone), which is what that
        prompt gets in a call of its own (but with a CFG++ sampler, as ComfyUI's)."""
        return [max(g, 1.0) if self.guidance and not self.cfg_pp else g
                for g in self.scales() for _ in range(self.num_images_per_prompt)]

    @property
    def batch_size(self):
        """Images the call makes: prompts × images per prompt (of a checked request)."""
        return len(self.prompt) * self.num_images_per_prompt

    def texts(self):
        """The text encoder's input, ``[negative..., positive...]`` in diffusers' order; the
        negatives only with guidance."""
        if not self.guidance:
            return list(self.prompt)
        negatives = self.negative_prompt or [""]
        if len(negatives) == 1:
            negatives = negatives * len(self.prompt)
        return negatives + list(self.prompt)

    def texts_2(self):
        """The second text encoder's input, as ``texts()``: ``prompt_2`` (default: the prompts)
        and ``negative_prompt_2`` (default: the negative prompts), each one string for all
        prompts or one per prompt."""
        def each(texts, default):
            texts = texts or default
            return texts * len(self.prompt) if len(texts) == 1 else list(texts)
        positives = each(self.prompt_2, self.prompt)
        if not self.guidance:
            return positives
        return each(self.negative_prompt_2, self.negative_prompt or [""]) + positives

    def draw_seed(self):
        """The seed to use: the request's, or a random one for None and -1."""
        return _drawn(self.seed)

    def draw_subseed(self):
        """The variation seed to use (an int, or a list of one per image): the request's, or a
        random one for None and -1."""
        return _drawn(self.subseed)


def _drawn(seed):
    """``seed``, or a random one for None and ``RANDOM_SEED``."""
    if seed is None or (not isinstance(seed, list) and seed == RANDOM_SEED):
        return random.randrange(MAX_SEED + 1)
    return seed
