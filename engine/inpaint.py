"""Inpainting as AUTOMATIC1111 frames it around the pipeline: the CLI and the A1111 API use it.

The pipeline inpaints as diffusers does: the whole image goes through the VAE and comes back
as the model drew it. A1111 adds two things, both here:

- **The overlay:** the result is pasted over the init image through the (blurred) mask, so
  every pixel outside the mask is the init image's own. Over the whole picture A1111 pastes
  through twice the mask (clipped to 1), so the blur's soft edge leans to the new pixels.
- **"Only masked"** (``inpaint_full_res``): the mask's bounding box, grown by ``padding``
  pixels and then to the output's aspect ratio, is cut out of the image and the mask,
  resized to the output size and inpainted there (more pixels for a small region), and the
  result is resized back into its place in the full-size image.
- **"fill"** (masked content, ``inpainting_fill=0``): before it is encoded, the masked part
  of the image is painted over with its surroundings' colours, blurred from coarse to fine,
  so that the denoising starts from the neighbourhood's colours rather than from what was
  masked.
"""
from dataclasses import dataclass

import numpy as np

from .errors import SdrtError

MAX_PADDING = 256  # pixels, A1111's slider's end
# A1111's "masked content", by the name its PNG info writes, in the order its API's
# inpainting_fill numbers them: whether the picture is filled under the mask before it is
# encoded (``fill_masked``), and the pipeline's ``masked_content`` (what the masked latents
# then start from).
MASKED_CONTENT = {"fill": (True, "original"), "original": (False, "original"),
                  "latent noise": (True, "latent_noise"),
                  "latent nothing": (True, "latent_nothing")}


@dataclass
class Inpaint:
    """An init image and mask prepared for the pipeline, and how to finish its results."""
    image: object  # PIL RGB: what the pipeline inpaints (the cut-out region, resized)
    mask: np.ndarray  # float32 (height, width) in [0, 1]: the pipeline's mask_image
    original: object  # PIL RGB: the picture the result is pasted into
    # float32 (H, W) in [0, 1], the original's size: the result's weight; None: not pasted
    # over the original (a ComfyUI workflow's result, decoded as it is)
    overlay: np.ndarray
    region: tuple = None  # (x1, y1, x2, y2) of the cut-out region in the original

    def frame_like(self, picture, resize_mode):
        """Another picture (a ControlNet's control image) framed as this job's init image:
        fitted by ``resize_mode`` to the output size, or for only the masked area to the
        original's size and then cut to the same region and resized to the output size, so
        that it lines up with what the pipeline inpaints (as A1111's ControlNet extension
        crops its images for "Only masked")."""
        from PIL import Image

        from .images import fit_image, to_rgb8
        picture, size = to_rgb8(picture), self.image.size
        if self.region is None:
            return picture if picture.size == size else fit_image(picture, *size, resize_mode)
        if picture.size != self.original.size:
            picture = fit_image(picture, *self.original.size, resize_mode)
        return picture.crop(self.region).resize(size, Image.LANCZOS)

    def finish(self, result):
        """A pipeline result (PIL) → the final picture: resized into its region (only
        masked) and pasted over the original through the overlay mask (if any)."""
        from PIL import Image
        if self.region is not None:
            x1, y1, x2, y2 = self.region
            canvas = self.original.copy()
            canvas.paste(result.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS),
                         (x1, y1))
            result = canvas
        if self.overlay is None:
            return result.convert("RGB")
        new = np.asarray(result.convert("RGB"), dtype=np.float32)
        old = np.asarray(self.original, dtype=np.float32)
        a = self.overlay[..., None]
        return Image.fromarray(np.rint(new * a + old * (1 - a)).clip(0, 255).astype(np.uint8))


def prepare(image, mask, width, height, only_masked=False, padding=32, fill=False,
            resize_mode="resize"):
    """``image`` (PIL) and its ``mask`` (float (H, W) in [0, 1], 1 where repainted, already
    blurred; resized to the image's size if it differs) → an ``Inpaint`` for an output of
    ``width`` × ``height`` pixels. Over the whole picture both are brought to that size by
    A1111's ``resize_mode`` ("resize", "crop" or "fill": ``images.fit_image``; "latent" is
    refused, the mask being drawn at the output size). With ``only_masked`` the region around
    the mask, grown by ``padding`` pixels, is inpainted at the output size (the resize mode
    does not apply, as in A1111); an empty mask is refused there (there is no region). With
    ``fill`` the image the pipeline gets is filled under the mask (``fill_masked``); the
    result is still pasted over the original."""
    job = _frame(image, mask, width, height, only_masked, padding, resize_mode)
    if fill:
        job.image = fill_masked(job.image, job.mask)
    return job


def _frame(image, mask, width, height, only_masked, padding, resize_mode):
    from PIL import Image

    from .images import fit_image, to_rgb8
    original = to_rgb8(image)  # RGB as the pipeline reads any image
    if mask.shape != (original.height, original.width):
        mask = _resize(mask, original.width, original.height)
    if not only_masked:
        if resize_mode == "latent":
            raise SdrtError("resize mode 'latent' (A1111's latent upscale) cannot inpaint the "
                            "whole picture: use resize, crop or fill, or only the masked area")
        if original.size != (width, height):
            original = fit_image(original, width, height, resize_mode)
            mask = _resize(mask, width, height, resize_mode)
        return Inpaint(original, mask, original, np.clip(mask * 2, 0, 1))
    region = crop_region(mask, padding)
    if region is None:
        raise SdrtError("mask must mark something to inpaint when only the masked area is "
                        "inpainted, got an empty mask")
    region = expand_region(region, width, height, original.width, original.height)
    x1, y1, x2, y2 = region
    cut = original.crop(region).resize((width, height), Image.LANCZOS)
    return Inpaint(cut, _resize(mask[y1:y2, x1:x2], width, height), original, mask, region)


# Coarse to fine: (Gaussian radius in pixels, times the layer is laid on), A1111's sequence.
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image, mask):
    """``image`` (PIL) with its masked part (``mask`` float (H, W), 1 where repainted) painted
    over with the colours around it: each layer is the kept pixels blurred by a Gaussian and
    normalised by the blurred coverage (premultiplied alpha), laid over the layers before it
    with that coverage as its alpha; the last layer, unblurred, puts every kept pixel back
    exactly. Blurs run on 8-bit planes, as PIL blurs them."""
    from PIL import Image, ImageFilter
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    keep = np.rint((1 - mask) * 255) / 255  # the coverage, on 8 bits as the image is
    planes = [keep] + [rgb[..., c] * keep for c in range(3)]  # alpha, then premultiplied RGB

    def blurred(plane, radius):
        if radius == 0:
            return plane
        image = Image.fromarray(np.rint(plane * 255).astype(np.uint8), "L")
        return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)),
                          dtype=np.float32) / 255
    out, out_alpha = np.zeros_like(rgb), np.zeros_like(keep)
    for radius, times in _FILL_LAYERS:
        alpha, *colour = (blurred(p, radius) for p in planes)
        colour = np.stack(colour, axis=-1) / np.maximum(alpha, 1 / 255)[..., None]
        for _ in range(times):  # "over", in straight alpha
            total = alpha + out_alpha * (1 - alpha)
            out = (colour * alpha[..., None] + out * (out_alpha * (1 - alpha))[..., None]) \
                / np.maximum(total, 1e-6)[..., None]
            out_alpha = total
    return Image.fromarray(np.rint(out.clip(0, 1) * 255).astype(np.uint8))


def crop_region(mask, padding):
    """(x1, y1, x2, y2), x2 and y2 exclusive: the bounding box of the mask's non-zero pixels
    (as 8 bits would store them) grown by ``padding`` on each side within the image; None
    for an empty mask."""
    ys, xs = np.nonzero(mask * 255 >= 0.5)
    if not len(xs):
        return None
    h, w = mask.shape
    return (max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0),
            min(int(xs.max()) + 1 + padding, w), min(int(ys.max()) + 1 + padding, h))


def expand_region(region, width, height, image_width, image_height):
    """``region`` grown along one axis, centred where it can be, to the aspect ratio of
    ``width`` × ``height``, and kept inside the image (A1111's expand_crop_region)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo, hi, by, size):
    """[lo, hi) grown by ``by``, half each side, then shifted back inside [0, size)."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, min(hi - lo, size)
    return lo, hi


def _resize(mask, width, height, mode="resize"):
    """A float mask brought to ``width`` × ``height`` by the resize ``mode`` (``fit_image``),
    bilinear, as the picture it goes with."""
    from PIL import Image

    from .images import fit_image
    image = Image.fromarray(np.asarray(mask, dtype=np.float32), "F")
    return np.asarray(fit_image(image, width, height, mode, Image.BILINEAR),
                      dtype=np.float32).clip(0, 1)
