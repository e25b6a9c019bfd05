"""AUTOMATIC1111's Extras tab's upscale (``modules/postprocessing.py`` and
``scripts/postprocessing_upscale.py``), shared by ``sdrt upscale`` and the server's
``/sdapi/v1/extra-single-image``: each image, made RGB, is upscaled by ``upscaler_1`` by
``scale`` (A1111's ``resize_mode`` 0) or until it covers ``width`` × ``height`` (1), to that
size rounded down to a multiple of 8 as A1111's ``Upscaler.upscale`` rounds it, then, with
``crop``, centred on a black canvas of exactly ``width`` × ``height``. Where ``upscaler_2`` is
named with a ``visibility`` above 0, the image is upscaled by it too and blended over the first
at that weight. "None" as ``upscaler_1`` leaves the image as it is. Each result comes with
A1111's postprocessing text ("Postprocess upscale by: 2.0, Postprocess upscaler: R-ESRGAN 4x+").
No torch at import: the settings are checked before a model loads.
"""
from dataclasses import dataclass

from .hires import IMAGE_UPSCALERS
from .infotext import quote

MAX_SCALE = 8.0  # A1111's upscaling_resize: from 1 to 8
UPSCALER_NONE = "None"  # A1111's name for no upscale


@dataclass(frozen=True)
class Extras:
    """One Extras upscale's settings, checked by whoever builds it (the CLI, the server)."""
    upscaler_1: str            # UPSCALER_NONE: the image as it is
    upscaler_2: str = UPSCALER_NONE
    visibility: float = 0.0    # extras_upscaler_2_visibility: upscaler_2's weight in the blend
    scale: float = 2.0         # resize_mode 0's upscaling_resize; None for resize_mode 1
    width: int = None          # resize_mode 1's upscaling_resize_w and _h
    height: int = None
    crop: bool = True          # resize_mode 1's upscaling_crop

    def size(self, width, height):
        """(the scale, the upscaled width and height) of an image of ``width`` × ``height``:
        A1111's size rounded down to a multiple of 8, before any crop."""
        by = self.scale if self.scale is not None else \
            max(self.width / width, self.height / height)
        return by, int(width * by // 8 * 8), int(height * by // 8 * 8)

    def apply(self, models, images):
        """[(upscaled image, A1111's postprocessing text)], one per PIL image; ``models(name,
        field)`` is the loaded ``Upscaler`` of a model name given in ``field``."""
        return [self._process(models, im) for im in images]

    def _process(self, models, image):
        from PIL import Image

        from .images import rgb_image
        image = rgb_image(image)
        if self.upscaler_1 == UPSCALER_NONE:
            return image, ""
        info = {}  # A1111's pp.info, in its order
        out = self._upscale(models, image, self.upscaler_1, "upscaler_1", info)
        info["Postprocess upscaler"] = self.upscaler_1
        if self.upscaler_2 != UPSCALER_NONE and self.visibility > 0:
            second = self._upscale(models, image, self.upscaler_2, "upscaler_2", info)
            out = Image.blend(out, second, self.visibility)
            info["Postprocess upscaler 2"] = self.upscaler_2
        return out, ", ".join(f"{k}: {quote(v)}" for k, v in info.items())

    def _upscale(self, models, image, name, field, info):
        """A1111's ``ScriptPostprocessingUpscale.upscale``."""
        from PIL import Image
        by, w, h = self.size(image.width, image.height)
        if self.scale is not None:
            info["Postprocess upscale by"] = self.scale
        else:
            info["Postprocess upscale to"] = f"{self.width}x{self.height}"
        if name in IMAGE_UPSCALERS:
            # A1111's UpscalerLanczos / UpscalerNearest in its Upscaler.upscale loop: a resize
            # by the scale unless the image already covers the size, then Lanczos to the size.
            resample = Image.LANCZOS if name == "Lanczos" else Image.NEAREST
            if image.width < w or image.height < h:
                image = image.resize((int(image.width * by), int(image.height * by)), resample)
            if image.size != (w, h):
                image = image.resize((w, h), Image.LANCZOS)
        else:
            image = models(name, field).upscale([image], by)[0]
        if self.scale is None and self.crop:
            canvas = Image.new("RGB", (self.width, self.height))
            canvas.paste(image, (self.width // 2 - image.width // 2,
                                 self.height // 2 - image.height // 2))
            image = canvas
            info["Postprocess crop to"] = f"{self.width}x{self.height}"
        return image


def png_with_text(image, source, key, text):
    """PIL ``image`` as PNG bytes with the text chunks of the image it was made from,
    ``source`` (A1111's ``parameters``, ComfyUI's ``prompt`` ...), and ``text`` in chunk ``key``
    in place of the source's (none where ``text`` is None): how A1111 keeps an Extras result's
    info, in ``postprocessing`` (its API) or ``extras`` (its saved files)."""
    import io

    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in source.info.items():
        if isinstance(k, str) and isinstance(v, str) and k != key:
            info.add_text(k, v)
    if text is not None:
        info.add_text(key, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
