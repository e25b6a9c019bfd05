"""A request's IP-Adapter part, checked once, and its image tokens.

diffusers' ``ip_adapter_image`` (an image per adapter; a list of images for one adapter
joins their tokens) and a scale per adapter (diffusers' ``set_ip_adapter_scale``, A1111's
unit weight, ComfyUI's ``weight``), one number or a scale per block (diffusers' dicts,
InstantStyle's: ``ip_adapter.layer_scales``). The tokens are computed once per request, before the
denoising loop: the conditional rows get the reference images', the unconditional rows those
of a zero embedding (plain adapters) or of a zero image (plus and full), as diffusers.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .clip_vision import clip_pixels
from .control import number, per_item, refuse_without, select, unset
from .errors import SdrtError
from .request import MAX_CONTROL_SCALE, short_repr

MAX_IMAGES = 16  # reference images per adapter in one request (their tokens are joined)


@dataclass(frozen=True)
class ImagePromptRequest:
    """The IP-Adapters (by name, in order) a request runs, each one's reference images
    (float32 (3, H, W) CPU tensors in [0, 1]), scale (one per cross-attention layer) and share
    of the schedule."""
    names: tuple
    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple

    @classmethod
    def parse(cls, loaded, image, names=None, scale=1.0, start=0.0, end=1.0, tensors=None,
              layers=None):
        """The request's IP-Adapter part, or None without ``image``. ``image``: for one
        adapter an image or a list of images, for several a list with one entry (an image or
        a list) per adapter; ``scale``, ``start`` and ``end`` one value or one per adapter
        (the adapter runs on the UNet calls within [start, end] of the schedule, as a
        ControlNet's ``control_guidance_start``/``_end``); ``tensors(items)`` checks a list
        of images and returns each as float32 (B, 3, H, W) in [0, 1]; ``layers(scale,
        field, check)`` is an adapter's ``scale`` (a number, or diffusers' per-block dict)
        as one per cross-attention layer (``ip_adapter.layer_scales`` of the UNet)."""
        if image is None:
            refuse_without("ip_adapter_image", "the image an IP-Adapter reads", {
                "ip_adapter": names is not None, "ip_adapter_scale": not unset(scale, 1.0),
                "ip_adapter_guidance_start": not unset(start, 0.0),
                "ip_adapter_guidance_end": not unset(end, 1.0)})
            return None
        if not loaded:
            raise SdrtError("ip_adapter_image was given, but no IP-Adapter is loaded "
                            "(Pipeline.load_ip_adapter)")
        chosen = select(loaded, names, "ip_adapter", "IP-Adapter")
        n = len(chosen)
        if n == 1:
            entries = [image]
        elif not isinstance(image, (list, tuple)) or len(image) != n:
            raise SdrtError(f"ip_adapter_image must be a list of {n} entries (one image, or a "
                            f"list of images, per IP-Adapter: {', '.join(chosen)}), got "
                            f"{short_repr(image)}")
        else:
            entries = list(image)
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
        scales = each("ip_adapter_scale", scale, lambda field, v: layers(v, field, check))
        return cls(chosen, tuple(images), scales, starts, ends)

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
