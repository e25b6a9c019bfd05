"""A request's IP-Adapter part, checked once, and its image tokens.

diffusers' ``ip_adapter_image`` (an image per adapter; a list of images for one adapter
joins their tokens) and a scale per adapter (diffusers' ``set_ip_adapter_scale``, A1111's
unit weight, ComfyUI's ``weight``), one number or a scale per block (diffusers' dicts,
InstantStyle's: ``ip_adapter.layer_scales``). The tokens are computed once per request, before the
denoising loop: the conditional rows get the reference images', the unconditional rows those
of a zero embedding (plain adapters) or of a zero image (plus and full), as diffusers.

An adapter may also be confined to regions of the picture, one mask per reference image
(diffusers' ``ip_adapter_masks``, the regional IP-Adapter; the A1111 ControlNet extension's
``effective_region_mask``): each image then gets its own attention, weighed at every query by
its mask brought to that layer's grid (``MASK_STYLES``), and may carry a scale of its own.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .clip_vision import clip_pixels
from .control import number, per_item, refuse_without, select, unset
from .errors import SdrtError
from .layers import grid_weights
from .request import MAX_CONTROL_SCALE, short_repr

MAX_IMAGES = 16  # reference images per adapter in one request (their tokens are joined)
# How a mask (greyscale, in [0, 1]) becomes a layer's weights. "diffusers"
# (IPAdapterMaskProcessor): resized to the picture (Lanczos), binarized at 0.5, then bicubic
# to each grid. "a1111" (the A1111 ControlNet extension, whose masks are an image's red
# channel): as it is, bilinear to each grid.
MASK_STYLES = ("diffusers", "a1111")


@dataclass(frozen=True)
class ImagePromptRequest:
    """The IP-Adapters (by name, in order) a request runs, each one's reference images
    (float32 (3, H, W) CPU tensors in [0, 1]), scale (one per cross-attention layer) and share
    of the schedule; and each one's masks (float32 (images, 1, H, W) CPU tensors in [0, 1],
    greyscale, as given) with a scale per image, or None, read as ``mask_style`` says."""
    names: tuple
    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple
    masks: tuple = ()
    mask_scales: tuple = ()
    mask_style: str = "diffusers"

    @classmethod
    def parse(cls, loaded, image, names=None, scale=1.0, start=0.0, end=1.0, tensors=None,
              layers=None, mask=None, mask_style="diffusers", mask_tensors=None):
        """The request's IP-Adapter part, or None without ``image``. ``image``: for one
        adapter an image or a list of images, for several a list with one entry (an image or
        a list) per adapter; ``scale``, ``start`` and ``end`` one value or one per adapter
        (the adapter runs on the UNet calls within [start, end] of the schedule, as a
        ControlNet's ``control_guidance_start``/``_end``); ``tensors(items)`` checks a list
        of images and returns each as float32 (B, 3, H, W) in [0, 1]; ``layers(scale,
        field, check)`` is an adapter's ``scale`` (a number, or diffusers' per-block dict)
        as one per cross-attention layer (``ip_adapter.layer_scales`` of the UNet).

        ``mask``: for one adapter a mask or a list (one per image), a (1, images, H, W)
        tensor (diffusers' preprocessed masks) or None; for several a list with one such
        entry per adapter. A masked adapter's ``scale`` may be a list of numbers, one per
        image (diffusers' ``set_ip_adapter_scale([[0.7, 0.7]])``). ``mask_tensors(items)``
        checks a list of masks and returns them as float32 (images, 1, H, W) in [0, 1]."""
        if mask_style not in MASK_STYLES:
            raise SdrtError(f"ip_adapter_mask_style must be one of {', '.join(MASK_STYLES)}, "
                            f"got {short_repr(mask_style)}")
        if image is None:
            refuse_without("ip_adapter_image", "the image an IP-Adapter reads", {
                "ip_adapter_mask": mask is not None,
                "ip_adapter": names is not None, "ip_adapter_scale": not unset(scale, 1.0),
                "ip_adapter_guidance_start": not unset(start, 0.0),
                "ip_adapter_guidance_end": not unset(end, 1.0)})
            return None
        if not loaded:
            raise SdrtError("ip_adapter_image was given, but no IP-Adapter is loaded "
                            "(Pipeline.load_ip_adapter)")
        chosen = select(loaded, names, "ip_adapter", "IP-Adapter")
        n = len(chosen)
        entries = _per_adapter(image, n, "ip_adapter_image", f"one image, or a list of images, "
                                                             f"per IP-Adapter: {', '.join(chosen)}")
        images = []
        for entry in entries:
            items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if not 1 <= len(items) <= MAX_IMAGES:
                raise SdrtError(f"ip_adapter_image must hold 1 to {MAX_IMAGES} images per "
                                f"IP-Adapter, got {len(items)}")
            images.append(tuple(t for batch in tensors(items) for t in batch))
        each = lambda field, value, check: per_item(field, value, n, check, "IP-Adapter")
        starts = each("ip_adapter_guidance_start", start, number(0.0, 1.0))
        ends = each("ip_adapter_guidance_end", end, number(0.0, 1.0))
        for k in range(n):
            if starts[k] >= ends[k]:
                raise SdrtError(f"ip_adapter_guidance_start must be below "
                                f"ip_adapter_guidance_end, got {starts[k]:g} and {ends[k]:g}")
        check = number(0.0, MAX_CONTROL_SCALE)
        masks = _masks(mask, n, [len(i) for i in images], mask_tensors)
        scales, mask_scales = [], [None if m is None else (1.0,) * m.shape[0] for m in masks]
        for k, v in enumerate(each("ip_adapter_scale", scale, lambda field, v: v)):
            field = "ip_adapter_scale" + (f"[{k}]" if n > 1 else "")
            if isinstance(v, (list, tuple)):
                if masks[k] is None:
                    raise SdrtError(f"{field} is a list (one scale per image), which only an "
                                    f"IP-Adapter with ip_adapter_mask takes")
                mask_scales[k] = per_item(field, v, len(images[k]), check,
                                          "image of the IP-Adapter")
                v = 1.0
            scales.append(layers(v, "ip_adapter_scale", check))
        if all(m is None for m in masks):
            masks = mask_scales = ()
        return cls(chosen, tuple(images), tuple(scales), starts, ends, tuple(masks),
                   tuple(mask_scales), mask_style)

    def regions(self, size, grids, rows):
        """Per adapter, its masks for a (height, width) ``size`` picture as weights at the
        queries of every grid in ``grids`` (the UNet's levels, (h, w) each), joined, each
        image's scale in: float32 (rows, images, Σ h·w); (rows, 0, Σ h·w) for an adapter
        without masks. () for a request without masks."""
        if not self.masks:
            return ()
        total = sum(h * w for h, w in grids)
        out = []
        for masks, scales in zip(self.masks, self.mask_scales):
            if masks is None:
                out.append(torch.zeros(rows, 0, total))
                continue
            if self.mask_style == "diffusers":
                if tuple(masks.shape[2:]) != tuple(size):
                    masks = torch.stack([_lanczos(m[0], size) for m in masks])[:, None]
                masks, mode = (masks >= 0.5).float(), "bicubic"
            else:
                mode = "bilinear"
            # (as diffusers' IPAdapterMaskProcessor.downsample and the extension interpolate)
            weights = grid_weights(masks, grids, mode) * torch.tensor(scales)[:, None]
            out.append(weights.expand(rows, -1, -1).contiguous())
        return tuple(out)

    def scale_table(self, rows, calls):
        """(rows, calls, layers, adapters) float32 on the CPU: adapter k's scale of each
        cross-attention layer on the UNet calls i whose share of the schedule, [i/calls,
        (i+1)/calls], lies within [start, end], zero on the others (the rule of diffusers'
        ``controlnet_keep``)."""
        layers = torch.tensor(self.scales, dtype=torch.float32).T  # (layers, adapters)
        table = torch.zeros(calls, *layers.shape)
        for i in range(calls):
            for k in range(len(self.names)):
                if not (i / calls < self.starts[k] or (i + 1) / calls > self.ends[k]):
                    table[i, :, k] = layers[:, k]
        return table.expand(rows, -1, -1, -1).contiguous()


def _lanczos(plane, size):
    """A float (H, W) plane resized to (height, width) ``size`` by PIL's Lanczos filter."""
    from PIL import Image
    image = Image.fromarray(plane.numpy(), "F").resize(size[::-1], Image.LANCZOS)
    return torch.from_numpy(np.array(image, dtype=np.float32))


def _per_adapter(value, n, field, what):
    """``value`` as one entry per adapter: itself for one, else a list of ``n`` (``what``
    says what each entry is, in the refusal)."""
    if n == 1:
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise SdrtError(f"{field} must be a list of {n} entries ({what}), got "
                        f"{short_repr(value)}")
    return list(value)


def _masks(mask, n, counts, mask_tensors):
    """Per adapter, its masks as float32 (images, 1, H, W), or None (``parse``)."""
    if mask is None:
        return [None] * n
    entries = _per_adapter(mask, n, "ip_adapter_mask", "None, a mask or a list of masks, one "
                                                       "per image, for each IP-Adapter")
    out = []
    for k, (entry, count) in enumerate(zip(entries, counts)):
        field = "ip_adapter_mask" + (f"[{k}]" if n > 1 else "")
        if entry is None:
            out.append(None)
            continue
        if isinstance(entry, torch.Tensor) and entry.dim() == 4 and entry.shape[0] == 1:
            entry = list(entry[0])  # diffusers' (1, images, H, W): a mask per image
        items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        masks = mask_tensors(items)
        if masks.shape[0] != count:
            raise SdrtError(f"{field} must hold one mask per image of its IP-Adapter "
                            f"({count}), got {masks.shape[0]}")
        out.append(masks)
    return out


def _pil(image):
    """A float32 (3, H, W) image in [0, 1] → a PIL image (8 bits a channel, as it came)."""
    from PIL import Image
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def image_tokens(adapters, encoders, request: ImagePromptRequest, batch, cfg, device):
    """Per adapter, the (rows, n, D) image tokens of ``request``: ``adapters`` and
    ``encoders`` the modules of its adapters, in order; ``batch`` images, with ``cfg`` the
    unconditional rows first."""
    out = []
    for adapter, encoder, images in zip(adapters, encoders, request.images):
        pixels = clip_pixels([_pil(i) for i in images], encoder.config.image_size).to(device)
        states = adapter.config.reads_states

        def tokens(x):  # every image's tokens, joined: (1, images · tokens, D)
            embeds, hidden = encoder(x, states_only=states)
            return adapter.tokens(hidden if states else embeds).reshape(1, -1, adapter.config
                                                                        .cross_attention_dim)
        positive = tokens(pixels)
        rows = [positive.expand(batch, -1, -1)]
        if cfg:
            if states:
                negative = tokens(torch.zeros_like(pixels))
            else:
                zeros = torch.zeros(len(images), encoder.config.projection_dim, device=device)
                negative = adapter.tokens(zeros).reshape(1, -1, adapter.config
                                                         .cross_attention_dim)
            rows.insert(0, negative.expand(batch, -1, -1))
        out.append(torch.cat(rows).contiguous())
    return tuple(out)
