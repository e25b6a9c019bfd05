"""FreeU (Si et al. 2023): on the UNet's up path, the backbone features scaled up and the skip
features' lowest frequencies scaled down, before the two are joined.

Where it acts and how, the tools differ; ``FreeU.style`` names whose rule runs:

- ``"diffusers"`` (``pipe.enable_freeu``, as diffusers' ``enable_freeu``): in up levels 0 and 1
  (counted from the bottom), at each ResNet, the first half of the backbone's channels times
  b1 (level 0) or b2 (level 1), and the skip filtered with s1 or s2.
- ``"comfy"`` (ComfyUI's FreeU node): at every ResNet of the up path whose backbone has 4× or
  2× the UNet's first-level channels (1280 and 640 on SD 1.x and SDXL), the same with
  (b1, s1) or (b2, s2), so also the first ResNet of the level above a 4× or 2× one.
- ``"comfy_v2"`` (ComfyUI's FreeU_V2): where ``"comfy"`` acts, the half's factor grows from 1
  with the backbone's channel mean: ``1 + (b − 1) · m``, m that mean scaled to [0, 1] over
  each picture's pixels.

The filter (``fourier_filter``): the skip's 2-d FFT (in float32), its centred frequencies
within 1 of the middle (a 2×2 block) times s, back. The factors are Python numbers: a static
plan is built per FreeU setting (``StaticShape.freeu``).
"""
import math
from dataclasses import dataclass

import torch

from .errors import SdrtError
from .request import MAX_FREEU_FACTOR

STYLES = ("diffusers", "comfy", "comfy_v2")


@dataclass(frozen=True)
class FreeU:
    b1: float
    b2: float
    s1: float
    s2: float
    style: str = "diffusers"

    def __post_init__(self):
        if self.style not in STYLES:
            raise SdrtError(f"FreeU style must be one of {', '.join(STYLES)}, got "
                            f"{self.style!r}")
        for name in ("b1", "b2", "s1", "s2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and 0 <= value <= MAX_FREEU_FACTOR):
                raise SdrtError(f"FreeU {name} must be a number from 0 to "
                                f"{MAX_FREEU_FACTOR:g}, got {value!r}")

    def factors(self, level, channels, first_channels):
        """(b, s) at a ResNet of up level ``level`` whose backbone has ``channels`` channels
        (the UNet's first level ``first_channels``), or None where FreeU does not act."""
        if self.style == "diffusers":
            return {0: (self.b1, self.s1), 1: (self.b2, self.s2)}.get(level)
        return {4 * first_channels: (self.b1, self.s1),
                2 * first_channels: (self.b2, self.s2)}.get(channels)

    def apply(self, x, skip, level, first_channels):
        """The backbone ``x`` and skip (B, C, h, w) of a ResNet of up level ``level``, with
        FreeU applied where it acts (new tensors; the inputs are left as they are)."""
        found = self.factors(level, x.shape[1], first_channels)
        if found is None:
            return x, skip
        b, s = found
        half = x.shape[1] // 2
        if self.style == "comfy_v2":
            mean = x.mean(1, keepdim=True)
            low = mean.amin(dim=(2, 3), keepdim=True)
            high = mean.amax(dim=(2, 3), keepdim=True)
            b = (b - 1) * (mean - low) / (high - low) + 1
        x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
        return x, fourier_filter(skip, s)


def fourier_filter(x, scale, threshold=1):
    """``x`` (B, C, H, W) with its centred 2-d frequencies within ``threshold`` of the middle
    (rows and columns H // 2 − t … H // 2 + t − 1 after the shift) times ``scale``: FFT in
    float32, the result in ``x``'s dtype."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)
