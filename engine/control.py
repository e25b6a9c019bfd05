"""A request's ControlNet part, checked once: which loaded ControlNets run, each one's control
image, conditioning scale, share of the schedule and control mode, and guess mode (diffusers'
``controlnet_conditioning_scale``, ``control_guidance_start``/``_end`` and ``guess_mode``;
A1111's control modes as ``control_mode``).
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from .adapter import T2IAdapter, adapter_scales, runs_as_adapter
from .controlnet import residual_scales
from .errors import SdrtError
from .request import CONTROL_MODES, MAX_CONTROL_SCALE, short_repr


def load_control_net(path, unet_config, vae_scale_factor, device, dtype, variant=None):
    """A ControlNet or a T2I-Adapter (told apart by its files) for a UNet of ``unet_config``,
    checked to fit it: what ``Pipeline.load_controlnet`` and the ONNX export load."""
    from .adapter import check_fits as adapter_fits
    from .adapter import fits as adapter_ok
    from .adapter import is_adapter, load_adapter
    from .controlnet import check_fits, load_controlnet
    if is_adapter(path):
        net = load_adapter(path, device, dtype, fits=lambda cfg: adapter_ok(
            cfg, unet_config, vae_scale_factor))
        adapter_fits(net.config, unet_config, vae_scale_factor, os.fspath(path))
    else:
        net = load_controlnet(path, device, dtype, dataclasses.asdict(unet_config), variant)
        check_fits(net.config, unet_config, os.fspath(path))
    return net


def per_item(field, value, n, check, what="ControlNet"):
    """One value for every net (``what``: the kind, in messages), or a list with one per net;
    each passed through ``check``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SdrtError(f"{field} must be one value or a list of {n} (one per {what}), "
                            f"got {len(value)} values")
        return tuple(check(field, v) for v in value)
    return (check(field, value),) * n


def number(lo, hi):
    """A ``per_item`` check: a number from ``lo`` to ``hi``, as a float."""
    def check(field, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not lo <= v <= hi:
            raise SdrtError(f"{field} must be a number from {lo:g} to {hi:g}, got "
                            f"{short_repr(v)}")
        return float(v)
    return check


def control_mode(field, v, labels=False):
    """A control mode by sdrt's name, A1111's label or A1111's number → sdrt's name;
    ``labels``: A1111's labels and numbers only, as its API takes them. ``SdrtError`` naming
    ``field`` for anything else."""
    for name, (label, number) in CONTROL_MODES.items():
        if (v == name and not labels) or v == label or (type(v) is int and v == number):
            return name
    a1111 = [label for label, _ in CONTROL_MODES.values()]
    if labels:
        raise SdrtError(f"{field} must be one of {', '.join(a1111)} (or 0 to 2), got "
                        f"{short_repr(v)}")
    raise SdrtError(f"{field} must be one of {', '.join(CONTROL_MODES)} (A1111's "
                    f"{', '.join(map(repr, a1111))}), got {short_repr(v)}")


def unset(value, default):
    """Whether a numeric setting was left at its default."""
    return type(value) in (int, float) and value == default


def refuse_without(image_field, what, given):
    """Refuse the first setting ``given`` marks as set ({field: bool}) when ``image_field``
    was not given: ``what`` (e.g. "the image a ControlNet follows") would not use it."""
    for field, set_ in given.items():
        if set_:
            raise SdrtError(f"{field} was given without {image_field} ({what})")


def select(loaded, controlnet, field="controlnet", what="ControlNet"):
    """The names of the ControlNets (``what``: the kind of net, ``field`` the argument) a
    request runs: ``controlnet`` (a loaded one's name or a list of them) or, when None, all
    of ``loaded``, in load order."""
    if controlnet is None:
        return tuple(loaded)
    names = (controlnet,) if isinstance(controlnet, str) else controlnet
    if not isinstance(names, (list, tuple)) or not names or \
            not all(isinstance(n, str) for n in names):
        raise SdrtError(f"{field} must be a loaded {what}'s name or a non-empty list of "
                        f"them, got {short_repr(controlnet)}")
    for name in names:
        if name not in loaded:
            raise SdrtError(f"{field} {name!r} is not loaded (loaded: "
                            f"{', '.join(loaded) or 'none'})")
    if len(set(names)) != len(names):
        raise SdrtError(f"{field} names a{'n' * what.startswith('I')} {what} twice: "
                        f"{', '.join(names)}")
    return tuple(names)


@dataclass(frozen=True)
class ControlRequest:
    """The ControlNets (by name, in order) a request runs and each one's settings;
    ``images`` holds each net's control images as given (checked, not yet resized)."""
    names: tuple
    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple
    guess_mode: bool
    modes: tuple = ()  # per net: a CONTROL_MODES name
    # per net: its region mask (float32 (1, 1, H, W) in [0, 1], as given) or None; () for none
    masks: tuple = ()

    @classmethod
    def parse(cls, loaded, control_image, controlnet=None, scale=1.0, start=0.0, end=1.0,
              guess_mode=False, mode="balanced", mask=None, mask_tensor=None):
        """Checked settings, or None for a request without ``control_image``; ``loaded``
        the names of the loaded ControlNets, in load order. ``mask``: a net's region (the
        A1111 ControlNet extension's ``effective_region_mask``), for several nets a list
        with one (or None) per net; ``mask_tensor(item)`` checks one and returns it as
        float32 (1, 1, H, W) in [0, 1]."""
        if control_image is None:
            refuse_without("control_image", "the image a ControlNet follows", {
                "controlnet": controlnet is not None, "guess_mode": guess_mode is not False,
                "controlnet_conditioning_scale": not unset(scale, 1.0),
                "control_guidance_start": not unset(start, 0.0),
                "control_guidance_end": not unset(end, 1.0),
                "control_mode": mode not in ("balanced", "Balanced", 0),
                "control_mask": mask is not None})
            return None
        if not loaded:
            raise SdrtError("control_image was given, but no ControlNet is loaded "
                            "(Pipeline.load_controlnet)")
        names = select(loaded, controlnet)
        n = len(names)
        if n == 1:
            images = (control_image,)
        elif not isinstance(control_image, (list, tuple)) or len(control_image) != n:
            raise SdrtError(f"control_image must be a list of {n} entries, one per ControlNet "
                            f"({', '.join(names)}), each an image or a list of images")
        else:
            images = tuple(control_image)
        for entry in images:
            if isinstance(entry, (list, tuple)) and not entry:
                raise SdrtError("control_image holds an empty list")
        if not isinstance(guess_mode, bool):
            raise SdrtError(f"guess_mode must be true or false, got {short_repr(guess_mode)}")
        scales = per_item("controlnet_conditioning_scale", scale, n, number(0.0, MAX_CONTROL_SCALE))
        starts = per_item("control_guidance_start", start, n, number(0.0, 1.0))
        ends = per_item("control_guidance_end", end, n, number(0.0, 1.0))
        for s, e in zip(starts, ends):
            if s >= e:
                raise SdrtError(f"control_guidance_start must be below control_guidance_end, "
                                f"got {s:g} and {e:g}")
        modes = per_item("control_mode", mode, n, control_mode)
        if guess_mode and any(m != "balanced" for m in modes):
            raise SdrtError("control_mode must be balanced in guess mode (guess mode ramps the "
                            "residuals and keeps them from the unconditional half already)")
        masks = ()
        if mask is not None:
            if n > 1 and (not isinstance(mask, (list, tuple)) or len(mask) != n):
                raise SdrtError(f"control_mask must be a list of {n} entries, one per "
                                f"ControlNet ({', '.join(names)}), each a mask or None")
            masks = tuple(None if m is None else mask_tensor(m)
                          for m in (mask if n > 1 else [mask]))
            if all(m is None for m in masks):
                masks = ()
        return cls(names, images, scales, starts, ends, guess_mode, modes, masks)


def control_batch(tensors, batch, dtype, device):
    """One net's control images (float32 (r, 3, H, W) on the CPU, at the request's size) as
    (batch, 3, H, W) in ``dtype``: one image for every row, or one per prompt, each repeated
    for its images (``r`` divides ``batch``)."""
    rows = tensors.shape[0]
    if batch % rows:
        raise SdrtError(f"control_image must hold one image or one per prompt (a count that "
                        f"divides the batch of {batch}), got {rows}")
    return tensors.repeat_interleave(batch // rows, dim=0).to(device, dtype)


def scale_count(net):
    """How many factors a net's row of ``Control.scales`` uses: a ControlNet's residuals
    and its mid one, an adapter's features."""
    return net.num_features if isinstance(net, T2IAdapter) else net.num_residuals + 1


def control_scales(nets, scales, starts, ends, guess_mode, calls, modes=None):
    """``Control.scales`` (calls, nets, 2, n + 1) on the CPU, n + 1 the most factors a net
    has (``scale_count``; the rest zero): net k's ``residual_scales`` (an adapter's
    ``adapter_scales``) at ``scales[k]`` in control mode ``modes[k]`` (default balanced) on
    the UNet calls i whose share of the schedule, [i/calls, (i+1)/calls], lies within
    [``starts[k]``, ``ends[k]``], and zero on the others (diffusers' ``controlnet_keep``).
    Guess mode ramps the ControlNets only."""
    modes = modes or ("balanced",) * len(nets)
    table = torch.zeros(calls, len(nets), 2, max(scale_count(n) for n in nets))
    for i in range(calls):
        for k, net in enumerate(nets):
            on = not (i / calls < starts[k] or (i + 1) / calls > ends[k])
            if runs_as_adapter(net):
                row = adapter_scales(net, scales[k] * float(on), modes[k])
            else:
                row = residual_scales(net, scales[k] * float(on), guess_mode, modes[k])
            table[i, k, :, :row.shape[1]] = row
    return table
