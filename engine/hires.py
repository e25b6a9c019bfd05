"""AUTOMATIC1111's "Hires. fix": text to image at a first size, upscaled, then redrawn at the
larger size by image-to-image. The CLI (``--hr-scale`` ...) and the A1111 API (``enable_hr``
...) use it; no torch at import, so a request is checked before torch loads.

The upscale is A1111's: a "Latent" upscaler resizes the first pass's latents (no VAE round
trip), an image upscaler ("Lanczos", "Nearest") resizes its decoded picture, which the second
pass encodes again, and a model upscaler (an ESRGAN file, ``engine/upscaler.py``) runs over
the decoded picture until it is large enough, then Lanczos to the exact size (or, from a
ComfyUI workflow, once and then ComfyUI's resize: ``Hires.comfy_upscale``). The second pass
runs ``steps`` UNet calls (default: the first pass's) at ``strength``, as A1111's does: its
schedule is ``ceil(steps / strength)`` steps long and it runs the last ``steps`` of them.
"""
import math
from dataclasses import dataclass

from .errors import SdrtError
from .request import sampler_choices, short_repr, split_sampler

# A1111's upscaler names: latent ones → (torch interpolate mode, antialias); image ones.
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False),
                    "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False),
                    "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = ("Lanczos", "Nearest")
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
MAX_SCALE = 8.0


@dataclass(frozen=True)
class Hires:
    """A second pass's settings, with A1111's names in the comments (``hr_*``)."""
    scale: float = 2.0         # hr_scale: the second pass's size over the first's
    upscaler: str = "Latent"   # hr_upscaler
    steps: int = 0             # hr_second_pass_steps; 0: the first pass's
    strength: float = 0.75     # denoising_strength
    resize_x: int = 0          # hr_resize_x / hr_resize_y: a size in pixels instead of scale
    resize_y: int = 0
    sampler: str = None        # hr_sampler_name; None: the first pass's
    prompt: str = ""           # hr_prompt / hr_negative_prompt; "": the first pass's
    negative_prompt: str = ""
    # A model upscaler run as ComfyUI runs it (engine/comfy.py), not as A1111: the
    # (upscale_method, width, height, crop) of the ``Upscaler.one_pass`` that takes the first
    # picture to width × height (method None: the model's one pass alone), cut about its
    # centre to the target, as ComfyUI's VAEEncode cuts a picture to multiples of 8.
    comfy_upscale: tuple = None

    def check(self, names, max_side, max_steps, model_upscalers=()):
        """Every model-free check; ``names`` maps a field to the name a message uses;
        ``model_upscalers`` names the upscale models that ``upscaler`` may also name."""
        def refuse(field, allowed, value):
            raise SdrtError(f"{names.get(field, field)} must be {allowed}, got "
                            f"{short_repr(value)}")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number(self.scale) and math.isfinite(self.scale)
                and 1 <= self.scale <= MAX_SCALE):
            refuse("scale", f"a number from 1 to {MAX_SCALE:g}", self.scale)
        if self.upscaler not in UPSCALERS and self.upscaler not in model_upscalers:
            models = (f" or an upscale model: {', '.join(sorted(model_upscalers))}"
                      if model_upscalers else " (an upscale model such as ESRGAN needs "
                      "its file: none is given)")
            refuse("upscaler", f"one of {', '.join(UPSCALERS)}{models}", self.upscaler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or \
                not 0 <= self.steps <= max_steps:
            refuse("steps", f"an integer from 0 (the first pass's) to {max_steps}", self.steps)
        if not (number(self.strength) and 0 < self.strength <= 1):
            refuse("strength", "a number in (0, 1]", self.strength)
        for field in ("resize_x", "resize_y"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 0 <= value <= max_side:
                refuse(field, f"an integer from 0 (use the scale) to {max_side}", value)
        if self.sampler is not None and split_sampler(self.sampler) is None:
            refuse("sampler", sampler_choices(), self.sampler)
        for field in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, field), str):
                refuse(field, "a string", getattr(self, field))
        return self

    def target(self, width, height, factor=8):
        """(width, height, cut_x, cut_y) of the second pass for a first pass of ``width`` ×
        ``height``, in multiples of the VAE's ``factor``. With both resize sides given and
        another aspect ratio, the upscale keeps the first pass's ratio and covers the asked
        size, and ``cut_x`` / ``cut_y`` latent columns / rows are cropped from it, half from
        each side (A1111's truncate)."""
        cut_x = cut_y = 0
        x, y = self.resize_x, self.resize_y
        if not x and not y:
            w, h = int(width * self.scale), int(height * self.scale)
        elif not y:
            w, h = x, x * height // width
        elif not x:
            w, h = y * width // height, y
        elif width / height < x / y:
            w, h = x, x * height // width
            cut_y = (h - y) // factor
        else:
            w, h = y * width // height, y
            cut_x = (w - x) // factor
        return (w // factor - cut_x) * factor, (h // factor - cut_y) * factor, cut_x, cut_y

    def schedule_steps(self, first_steps):
        """(num_inference_steps, UNet calls) of the second pass: A1111 runs exactly the calls
        asked for, out of a schedule that long over the strength."""
        calls = self.steps or first_steps
        return max(calls, math.ceil(calls / self.strength - 1e-9)), calls

    def params(self):
        """The PNG info pairs A1111 writes for a hires fix."""
        pairs = {"Hires upscale": self.scale if not (self.resize_x or self.resize_y) else None,
                 "Hires resize": (f"{self.resize_x}x{self.resize_y}"
                                  if self.resize_x or self.resize_y else None),
                 "Hires steps": self.steps or None, "Hires upscaler": self.upscaler,
                 "Hires sampler": self.sampler, "Hires prompt": self.prompt or None,
                 "Hires negative prompt": self.negative_prompt or None}
        return {k: v for k, v in pairs.items() if v is not None}


# The pipeline's ControlNet arguments that hold one value per ControlNet (or one for all).
_PER_NET = ("controlnet", "controlnet_conditioning_scale", "control_guidance_start",
            "control_guidance_end", "control_mode", "control_mask")


def pass_controls(control, units):
    """(the first pass's, the second pass's) ControlNet arguments: ``control`` the pipeline's
    (``controlnet`` a list of names; ``{}`` without ControlNets), ``units`` per ControlNet
    (runs in the first pass, runs in the second, is softened in the second) as A1111's
    ControlNet extension runs its units: ``hr_option`` "Low res only" or "High res only"
    leaves a unit out of a pass, and a canny unit runs in the second pass with the control
    mode "My prompt is more important" where it was balanced (outside guess mode)."""
    if not control:
        return {}, {}
    names = control["controlnet"]
    n = len(names)
    per_net = {f: v if isinstance(v, (list, tuple)) else [v] * n
               for f, v in control.items() if f in _PER_NET}
    per_net["control_image"] = control["control_image"] if n > 1 else [control["control_image"]]
    shared = {f: v for f, v in control.items() if f not in per_net}
    out = []
    for p in (0, 1):
        keep = [k for k in range(n) if units[k][p]]
        if not keep:
            out.append({})
            continue
        this = {f: [v[k] for k in keep] for f, v in per_net.items()}
        if p == 1 and not control.get("guess_mode"):
            modes = this.get("control_mode", ["balanced"] * len(keep))
            this["control_mode"] = ["prompt" if units[k][2] and m == "balanced" else m
                                    for k, m in zip(keep, modes)]
        if len(keep) == 1:
            this["control_image"] = this["control_image"][0]
            if "control_mask" in this:
                this["control_mask"] = this["control_mask"][0]
        out.append({**shared, **this})
    return tuple(out)


def _comfy_upscale(upscaler, images, scaling, width, height):
    """``Hires.comfy_upscale``: one pass of the model and ComfyUI's ImageScale, each picture
    then cut about its centre to ``width`` × ``height`` (VAEEncode's cut)."""
    if not (0 <= scaling[1] - width < 8 and 0 <= scaling[2] - height < 8):
        raise SdrtError(f"the hires fix's {width}x{height} is not what VAEEncode cuts ComfyUI's "
                        f"{scaling[1]}x{scaling[2]} upscale to")
    out = upscaler.one_pass(images, *scaling)
    if out[0].size != tuple(scaling[1:3]):
        raise SdrtError(f"the hires fix's upscale model {upscaler.name!r} gives a "
                        f"{out[0].width}x{out[0].height} picture where the workflow read "
                        f"{scaling[1]}x{scaling[2]}: its file changed since")
    left, top = (out[0].width - width) // 2, (out[0].height - height) // 2
    return [im.crop((left, top, left + width, top + height)) for im in out]


def generate(pipe, hires: Hires, prompt, negative_prompt, height, width, num_inference_steps,
             sampler, generator, control_units=None, hires_control_image=None, upscaler=None,
             **call):
    """Both passes: the first at ``height`` × ``width`` (a static plan where one applies), the
    second at ``hires.target``; returns PIL images. ``generator`` (one CPU generator per image)
    draws the first pass's noise and then, going on, the second's. ``call`` holds the other
    pipeline arguments both passes share (guidance scale, images per prompt, clip skip ...)
    and the ControlNet arguments, which ``control_units`` (``pass_controls``' ``units``;
    None: every ControlNet in both passes as given) divides between the passes. The second
    pass takes ``hires_control_image`` where given (laid out as ``control_image``: maps framed
    at its size, as A1111's ControlNet extension frames a unit's map again for it), else the
    first pass's control images, which the pipeline resizes. ``upscaler`` is the loaded
    ``Upscaler`` that ``hires.upscaler`` names where it names a model (run as A1111 runs it, or
    once as ComfyUI does: ``hires.comfy_upscale``)."""
    import torch
    from PIL import Image
    w, h, cut_x, cut_y = hires.target(width, height, pipe.vae_scale_factor)
    latent = hires.upscaler in LATENT_UPSCALERS
    control = {f: call.pop(f) for f in (*_PER_NET, "control_image", "guess_mode") if f in call}
    second = control
    if control and hires_control_image is not None:
        second = {**control, "control_image": hires_control_image}
    controls = (control, second)
    if control and control_units is not None:
        controls = (pass_controls(control, control_units)[0],
                    pass_controls(second, control_units)[1])
    first = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width,
                 num_inference_steps=num_inference_steps, sampler=sampler,
                 generator=generator, output_type="latent" if latent else "pil", **call,
                 **controls[0])
    if latent:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        f = pipe.vae_scale_factor
        size = (h // f + cut_y, w // f + cut_x)
        image = torch.nn.functional.interpolate(first.float(), size=size, mode=mode,
                                                antialias=antialias).to(first.dtype)
        image = image[:, :, cut_y // 2:image.shape[2] - (cut_y + 1) // 2,
                      cut_x // 2:image.shape[3] - (cut_x + 1) // 2]
    elif hires.upscaler in IMAGE_UPSCALERS:
        resample = Image.LANCZOS if hires.upscaler == "Lanczos" else Image.NEAREST
        image = [im.resize((w, h), resample) for im in first]
    else:
        if upscaler is None or upscaler.name != hires.upscaler:
            raise SdrtError(f"the hires fix's upscaler {hires.upscaler!r} is a model, and "
                            f"generate was given {getattr(upscaler, 'name', None)!r}")
        image = upscaler.resize(first, w, h) if hires.comfy_upscale is None else \
            _comfy_upscale(upscaler, first, hires.comfy_upscale, w, h)
    timings = dict(pipe.timings)
    steps, calls = hires.schedule_steps(num_inference_steps)
    # A1111's prompt editing on the second pass: its own steps, after the first pass's.
    from .prompt_schedule import editing_steps
    from .samplers import default_sampler
    first_sampler = sampler or default_sampler(pipe.scheduler_config)
    edit_steps = (editing_steps(hires.sampler or first_sampler, calls),
                  editing_steps(first_sampler, num_inference_steps))
    # The second pass takes one row per image: each its own prompt, scale and picture (a
    # list of one value per prompt is spread over that prompt's images).
    rows = len(first)

    def per_row(v, text=False):
        if isinstance(v, list):
            return [v[i * len(v) // rows] for i in range(rows)]
        return [v] * rows if text and v is not None else v
    call = dict(call, num_images_per_prompt=1,
                guidance_scale=per_row(call.get("guidance_scale", 7.5)))
    # (the first pass's noise: the second's goes on from the first pass's generators)
    for first_only in ("subseed", "subseed_strength", "seed_resize_from"):
        call.pop(first_only, None)
    images = pipe(per_row(hires.prompt or prompt, text=True),
                  negative_prompt=per_row(hires.negative_prompt or negative_prompt, text=True),
                  image=image, strength=hires.strength, num_inference_steps=steps,
                  sampler=hires.sampler or sampler, generator=generator, output_type="pil",
                  prompt_edit_steps=edit_steps, **call, **controls[1])
    pipe.timings = {k: timings.get(k, 0) + v for k, v in pipe.timings.items()}  # both passes
    return images
