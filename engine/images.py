"""Reading init images from disk, and turning any PIL image into float RGB in [0, 1] (and any
inpainting mask into floats in [0, 1]).

``read_image`` applies the EXIF orientation (a phone's JPEG is stored sideways with a tag
saying how to turn it) and reports a file it cannot read in plain words naming the path.
``pil_to_float`` scales each pixel format by its own range, never clipping: a 16-bit PNG
(white = 65535) read as 8-bit would come out almost all white.

How each PIL mode becomes RGB:

- 8-bit ("L", "RGB", "P", "CMYK", "YCbCr", "1", ...): PIL's conversion to RGB, / 255.
- 16-bit greyscale ("I;16", "I;16L", "I;16B", "I;16N"): / 65535, repeated over R, G and B.
- 32-bit integer ("I"): / 65535 when every value is in [0, 65535] (PIL reads a 16-bit PNG or
  TIFF as "I"); non-negative values past 16 bits: / (2**31 - 1); negative values: the whole
  int32 range mapped linearly onto [0, 1].
- 32-bit float ("F"): values in [0, 1] are kept; values in [0, 255], PIL's own scale for
  "F", are divided by 255; any other range is mapped linearly from [min(0, lo), hi] to [0, 1].
- Alpha ("RGBA", "LA", "PA", "P" with a transparent colour, ...): composited onto white, as
  image viewers show transparency on a light page. The VAE takes RGB only, and dropping the
  alpha instead would bring back whatever colour the transparent pixels happen to store
  (often black).
"""
import os

import numpy as np

from .errors import SdrtError

MAX_MASK_BLUR = 64  # pixels, A1111's slider's end
# A1111's img2img resize modes, in the order its API's resize_mode numbers them, by the
# names sdrt's CLI takes: "resize" (stretch to the size), "crop" (keep the aspect ratio,
# cover the size, cut the overflow), "fill" (keep it, fit inside, stretch the edge rows or
# columns into the bands left) and "latent" (encode at the image's own size, then resize the
# latents bilinearly: the pipeline's ``latent_resize``).
RESIZE_MODES = ("resize", "crop", "fill", "latent")
_UINT16 = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def read_image(path, what="image"):
    """The image at ``path``, fully read, with its EXIF orientation applied.

    Raises ``SdrtError("cannot read {what} {path}: {reason}")`` with the reason in plain
    words: no such file, is a folder, permission denied, not an image file, damaged or
    truncated.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    def refuse(reason):
        return SdrtError(f"cannot read {what} {path}: {reason}")

    if os.path.isdir(path):
        raise refuse("is a folder")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # a new image, so closing the file is safe
    except FileNotFoundError:
        raise refuse("no such file") from None
    except PermissionError:
        raise refuse("permission denied") from None
    except UnidentifiedImageError:
        raise refuse("not an image file") from None
    except Image.DecompressionBombError as e:
        raise refuse(f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        # Pillow reports a damaged file with whichever of these its decoder hits first.
        raise refuse(f"the file is damaged or truncated ({e})") from None


def pil_to_float(image):
    """A PIL image of any mode → float32 array (H, W, 3) in [0, 1]; see the module docstring
    for how each mode is scaled."""
    mode = image.mode
    if mode in _UINT16:
        grey = np.asarray(image).astype(np.float32) / 65535
    elif mode == "I":
        grey = _int32_to_unit(np.asarray(image))
    elif mode == "F":
        grey = _float_to_unit(np.asarray(image))
    elif mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255  # (H, W, 4)
        alpha = rgba[..., 3:]
        return np.ascontiguousarray(rgba[..., :3] * alpha + (1 - alpha), dtype=np.float32)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)


def _int32_to_unit(a):
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 65535:
        return a.astype(np.float32) / 65535
    if lo >= 0:
        return (a.astype(np.float64) / _INT32_MAX).astype(np.float32)
    return ((a.astype(np.float64) - _INT32_MIN) / (_INT32_MAX - _INT32_MIN)).astype(np.float32)


def _float_to_unit(a):
    if not np.isfinite(a).all():
        raise SdrtError("a float image holds inf or NaN pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return a.astype(np.float32)
    if lo >= 0 and hi <= 255:
        return a.astype(np.float32) / 255
    lo = min(0.0, lo)
    return ((a.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)


# The most pixels fit_image resizes a whole picture to before cropping it (8192², the most a
# server accepts); a picture that would need more is cropped as it is resized.
MAX_FIT_PIXELS = 8192 * 8192


def fit_image(image, width, height, mode="resize", resample=None):
    """A PIL image (any mode) brought to ``width`` × ``height`` as A1111's resize ``mode``
    (``RESIZE_MODES``, "latent" excepted: that one is the pipeline's) does it, resampled
    with Lanczos unless ``resample`` says otherwise. "crop" and "fill" centre the image,
    offsets rounded as A1111 rounds them; "fill" stretches the image's first and last row
    (or column) over each band it leaves (the far band as wide as the near one, cut at the
    edge, as A1111 pastes it, stretched with PIL's default filter as A1111 stretches it)."""
    from PIL import Image
    resample = Image.LANCZOS if resample is None else resample
    if mode not in RESIZE_MODES[:3]:
        raise SdrtError(f"resize mode must be one of {', '.join(RESIZE_MODES[:3])}, got {mode!r}")
    if mode == "resize" or image.size == (width, height):
        return image if image.size == (width, height) else image.resize((width, height),
                                                                        resample)
    ratio, src_ratio = width / height, image.width / image.height
    # "crop" covers the size (the longer side overflows), "fill" fits inside it.
    wide = ratio > src_ratio if mode == "crop" else ratio < src_ratio
    src_w = width if wide else max(image.width * height // image.height, 1)
    src_h = height if not wide else max(image.height * width // image.width, 1)
    x, y = width // 2 - src_w // 2, height // 2 - src_h // 2
    if mode == "crop" and src_w * src_h > MAX_FIT_PIXELS:
        # A long thin picture covering the frame: resize only what the frame shows (the same
        # sampling positions: within two units of the last place of the whole resized picture).
        sx, sy = image.width / src_w, image.height / src_h
        return image.resize((width, height), resample,
                            box=(-x * sx, -y * sy, (width - x) * sx, (height - y) * sy))
    resized = image.resize((src_w, src_h), resample)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (x, y))
    if mode == "fill" and ratio != src_ratio:
        if ratio < src_ratio and y > 0:  # bands above and below
            out.paste(resized.resize((width, y), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, y), box=(0, src_h, width, src_h)),
                      (0, y + src_h))
        elif ratio > src_ratio and x > 0:  # bands left and right
            out.paste(resized.resize((x, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((x, height), box=(src_w, 0, src_w, height)),
                      (x + src_w, 0))
    return out


def frame_init_image(image, width, height, mode="resize"):
    """An init image brought to ``width`` × ``height`` by A1111's resize ``mode``: made 8-bit
    RGB as the pipeline reads it (``to_rgb8``) and fitted (``fit_image``) where its size
    differs; as it is for "latent" (the pipeline's ``latent_resize`` resizes its latents)."""
    if mode == "latent" or image.size == (width, height):
        return image
    return fit_image(to_rgb8(image), width, height, mode)


def to_rgb8(image):
    """A PIL image of any mode → 8-bit RGB, scaled as ``pil_to_float`` scales it (16 bits to
    their range, transparency onto white)."""
    from PIL import Image
    return Image.fromarray(np.rint(pil_to_float(image) * 255).astype(np.uint8))


def rgb_image(image):
    """A PIL image as 8-bit RGB the way ``image.convert("RGB")`` makes it (alpha dropped, as
    A1111 and ComfyUI convert), except that 16-bit, 32-bit integer and float pictures are
    scaled to their range first (``to_rgb8``): PIL would clip their values to 0..255 (a float
    picture in [0, 1] becomes black)."""
    if image.mode in _UINT16 or image.mode in ("I", "F"):
        return to_rgb8(image)
    return image.convert("RGB")


def mask_to_float(image):
    """A PIL inpainting mask → float32 array (H, W) in [0, 1], 1 where the image is repainted,
    read as A1111 reads a mask: by its alpha where it has transparency (opaque: repaint), else
    by its brightness (white: repaint; RGB weighted as PIL makes an image greyscale)."""
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255
        image = image.convert("RGB")
    rgb = pil_to_float(image)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def blur_mask(mask, sigma):
    """A float mask (H, W) blurred as A1111 blurs one (``mask_blur``): a Gaussian of standard
    deviation ``sigma`` pixels along each axis, cut at 2.5 sigma, the border reflected (OpenCV's
    default). A blurred mask, binarized at 0.5 later, has rounded corners and no specks."""
    if sigma <= 0:
        return mask
    import torch
    radius = int(2.5 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).float()
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    for dim in (3, 2):  # along x, then y
        pad = [0, 0, 0, 0]
        pad[0 if dim == 3 else 2:2 if dim == 3 else 4] = [radius, radius]
        mode = "reflect" if min(t.shape[2:]) > radius else "replicate"
        t = torch.nn.functional.pad(t, pad, mode=mode)
        weight = kernel.view(1, 1, 1, -1) if dim == 3 else kernel.view(1, 1, -1, 1)
        t = torch.nn.functional.conv2d(t, weight)
    return t[0, 0].clamp(0, 1).numpy()
