"""Control-image preprocessors that need no network, as A1111's ControlNet extension runs them:
each turns a picture into the map a ControlNet follows (``canny``'s edges for a canny
ControlNet, ``invert``'s white lines for a lineart or scribble one, ...).

A preprocessor that takes a resolution ("Processor Res", 64 to 2048, 512 by default) first
scales the picture so that its short side has that many pixels (cubic up, area down), pads it
to a multiple of 64 by repeating its edge, runs, and cuts the padding off, as the extension
does; "pixel perfect" picks the resolution at which the map needs no further scaling
(``pixel_perfect_resolution``). The map is then framed to the output size: as the extension
frames it for A1111's API (``frame_map``), like an init image elsewhere
(``images.frame_init_image``). OpenCV does the image work, as in
the extension (the ``control`` extra: ``pip install 'sdrt[control]'``), so a map is the
extension's map pixel for pixel (its OpenCV calls, on the same 8-bit RGB picture).

Preprocessors that run a network (depth, openpose, hed, lineart, segmentation, ...) are
refused by name (``NOT_RUN``): sdrt downloads nothing. Run them elsewhere and send their map
with "none".
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SdrtError
from .request import short_repr


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's settings, as the extension's ``module_detail`` lists it."""
    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 1.0

    def api_json(self):
        return {"name": self.label, "value": self.value, "min": self.minimum,
                "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)
# The most pixels a picture scaled to its preprocessor's resolution may have (a 2048-pixel
# short side at 4:1): a long thin picture would otherwise scale to gigabytes.
MAX_MAP_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Preprocessor:
    """``run(cv2, rgb, resolution, a, b)``: an 8-bit RGB array (H, W, 3) → the map, 8-bit
    (h, w, 3). ``label`` is the extension's display name, which units may give instead of
    ``name``; ``a`` and ``b`` its "Threshold A"/"Threshold B" sliders (None: it has none);
    ``opencv`` whether it needs OpenCV (``cv2`` is None for one that does not)."""
    name: str
    run: Callable
    resolution: bool = True
    a: Slider = None
    b: Slider = None
    label: str = None
    opencv: bool = True


def _pad64(n):
    return int(np.ceil(n / 64.0) * 64 - n)


def scaled_size(size, resolution):
    """(width, height) of a picture of ``size`` (w, h) with its short side scaled to
    ``resolution``."""
    w, h = size
    k = resolution / min(h, w)
    return int(np.round(w * k)), int(np.round(h * k))


def _scaled(cv2, rgb, resolution):
    """The picture with its short side scaled to ``resolution`` and edge-padded to multiples of
    64, and the (height, width) to cut the result back to."""
    h, w = rgb.shape[:2]
    k = resolution / min(h, w)
    tw, th = scaled_size((w, h), resolution)
    rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(rgb, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge"), (th, tw)


def _gray3(x):
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def _canny(cv2, rgb, res, low, high):
    padded, (h, w) = _scaled(cv2, rgb, res)
    return _gray3(cv2.Canny(padded, int(low), int(high)))[:h, :w]


def _invert(cv2, rgb, res, a, b):
    return 255 - rgb


def _threshold(cv2, rgb, res, level, b):
    padded, (h, w) = _scaled(cv2, rgb, res)
    out = np.zeros_like(padded)
    out[padded.min(axis=2) > level] = 255
    return out[:h, :w]


def _blur_gaussian(cv2, rgb, res, sigma, b):
    padded, (h, w) = _scaled(cv2, rgb, res)
    return cv2.GaussianBlur(np.ascontiguousarray(padded[:h, :w]), (0, 0), float(sigma))


def _scribble_xdog(cv2, rgb, res, level, b):
    """Difference of Gaussians (sigma 0.5 and 5): white where the darkest channel's
    difference passes ``level``."""
    padded, (h, w) = _scaled(cv2, rgb, res)
    x = padded.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5),
                        axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded)
    out[2 * (255 - dog) > level] = 255
    return out[:h, :w]


def _lineart_standard(cv2, rgb, res, a, b):
    """Dark lines on a light ground → white lines: how much darker each pixel is than its
    surroundings (a Gaussian of sigma 6), scaled by the median of the clear lines."""
    padded, (h, w) = _scaled(cv2, rgb, res)
    x = padded.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines))) if lines.size else 16.0
    return _gray3((intensity * 127).clip(0, 255).astype(np.uint8))[:h, :w]


def _tile_resample(cv2, rgb, res, rate, b):
    if rate < 1.1:
        return rgb
    h, w = rgb.shape[:2]
    # (at least a pixel: the extension's resize fails on a picture smaller than the rate)
    size = (max(1, int(w / rate)), max(1, int(h / rate)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _color_grid(cv2, rgb, res, a, b):
    """The picture's colours averaged over a 64-pixel grid (T2I-Adapter's colour map)."""
    h, w = rgb.shape[:2]
    th, tw = (res, int(round(w / h * res))) if h < w else (int(round(h / w * res)), res)
    rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(rgb, (tw // 64, th // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(coarse, (tw, th), interpolation=cv2.INTER_NEAREST)


def _recolor(space):
    """One channel of ``space`` (OpenCV's conversion from BGR, given the RGB picture as the
    extension gives it) raised to the power ``gamma``, as grey."""
    def run(cv2, rgb, res, gamma, b):
        code, channel = {"lab": (cv2.COLOR_BGR2LAB, 0), "hsv": (cv2.COLOR_BGR2HSV, 2)}[space]
        x = cv2.cvtColor(rgb, code)[:, :, channel].astype(np.float32) / 255.0
        return _gray3((x ** gamma * 255.0).clip(0, 255).astype(np.uint8))
    return run


_GAMMA = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
PREPROCESSORS = {p.name: p for p in (
    Preprocessor("none", lambda cv2, rgb, res, a, b: rgb, resolution=False, opencv=False),
    Preprocessor("canny", _canny, a=Slider("Low Threshold", 1, 255, 100),
                 b=Slider("High Threshold", 1, 255, 200)),
    Preprocessor("invert", _invert, resolution=False, opencv=False,
                 label="invert (from white bg & black line)"),
    Preprocessor("threshold", _threshold, a=Slider("Binarization Threshold", 0, 255, 127)),
    Preprocessor("blur_gaussian", _blur_gaussian, a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01)),
    Preprocessor("scribble_xdog", _scribble_xdog, a=Slider("XDoG Threshold", 1, 64, 32)),
    Preprocessor("lineart_standard", _lineart_standard,
                 label="lineart_standard (from white bg & black line)"),
    Preprocessor("tile_resample", _tile_resample, resolution=False,
                 a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
    Preprocessor("color", _color_grid, label="t2ia_color_grid"),
    Preprocessor("recolor_luminance", _recolor("lab"), resolution=False, a=_GAMMA),
    Preprocessor("recolor_intensity", _recolor("hsv"), resolution=False, a=_GAMMA),
)}
_BY_LABEL = {p.label: p for p in PREPROCESSORS.values() if p.label}
# The extension's preprocessors sdrt does not run (a prefix names a family of them): most run a
# network; the rest hook into sampling (reference, inpaint, tile_colorfix) or draw noise.
NOT_RUN = ("depth", "openpose", "dw_openpose", "animal_openpose", "densepose", "hed",
           "pidinet", "scribble_hed", "scribble_pidinet", "softedge", "lineart_anime",
           "lineart_coarse", "lineart_realistic", "lineart", "mlsd", "normal", "seg",
           "segmentation", "oneformer", "anime_face_segment", "mediapipe_face", "clip_vision",
           "ip-adapter", "instant_id", "revision", "reference", "inpaint", "lama", "shuffle",
           "tile_colorfix", "te_hed", "teed", "mobile_sam", "pulid", "sparsectrl")


def get(module, field="module"):
    """The preprocessor a unit's ``module`` names (its name or its label, any case; "None"
    or "" is "none"); ``SdrtError`` naming ``field`` for any other."""
    if module is None or (isinstance(module, str) and module.strip().lower() in ("", "none")):
        return PREPROCESSORS["none"]
    if isinstance(module, str):
        key = module.strip()
        found = PREPROCESSORS.get(key.lower()) or _BY_LABEL.get(key)
        if found is not None:
            return found
        if key.lower().startswith(NOT_RUN):
            raise SdrtError(f"{field}: sdrt does not run preprocessor {key!r} (it runs a "
                            f"network, hooks into sampling or draws noise); run it elsewhere "
                            f"and send its map with module none")
    raise SdrtError(f"{field} must be one of {', '.join(PREPROCESSORS)}, got "
                    f"{short_repr(module)}")


FIELDS = ("processor_res", "threshold_a", "threshold_b")


def settings(pre, resolution=None, a=None, b=None, names=FIELDS):
    """(resolution, a, b) for ``pre``: each given value checked against its slider's range
    (None or -1: the slider's default, as the extension reads -1); a value for a slider the
    preprocessor lacks is ignored, as there. ``SdrtError`` naming the value by its name in
    ``names`` (and its ``field`` attribute: its name in ``FIELDS``)."""
    out = []
    sliders = (RESOLUTION if pre.resolution else None, pre.a, pre.b)
    for field, name, value, slider in zip(FIELDS, names, (resolution, a, b), sliders):
        if slider is None:
            out.append(None)
        elif value is None or (type(value) in (int, float) and value == -1):
            out.append(slider.value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not np.isfinite(value) or not slider.minimum <= value <= slider.maximum:
            error = SdrtError(f"{name} ({pre.name}'s {slider.label}) must be from "
                              f"{slider.minimum:g} to {slider.maximum:g} (or -1: "
                              f"{slider.value:g}), got {short_repr(value)}")
            error.field = field
            raise error
        else:
            out.append(int(value) if slider is RESOLUTION else value)
    return tuple(out)


def pixel_perfect_resolution(size, width, height, resize):
    """The resolution at which a picture of ``size`` (w, h) is preprocessed so that its map
    needs no scaling to be framed at ``width`` × ``height`` by ``resize`` ("fill" fits it
    inside, the other modes cover the frame), as the extension's "Pixel Perfect" picks it."""
    w, h = size
    k = (min if resize == "fill" else max)(height / h, width / w)
    return int(np.round(k * min(w, h)))


def _cv2(name):
    try:
        import cv2
    except ImportError:
        raise SdrtError(f"preprocessor {name} needs OpenCV: pip install 'sdrt[control]' "
                        f"(opencv-python-headless)") from None
    return cv2


def available():
    """Whether the preprocessors beyond "none" can run here (OpenCV is installed)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def run(pre, image, resolution, a, b, field="processor_res"):
    """``pre``'s map of the PIL ``image`` at checked settings (``settings``), a PIL RGB
    image; the picture made 8-bit RGB first, transparency onto white, as the extension does.
    ``SdrtError`` naming ``field`` (its ``field`` attribute: "processor_res") where the
    picture scaled to ``resolution`` would have more than ``MAX_MAP_PIXELS``."""
    from PIL import Image

    from .images import to_rgb8
    if pre.resolution and pre.name != "none":
        tw, th = scaled_size(image.size, resolution)
        if tw * th > MAX_MAP_PIXELS:
            error = SdrtError(
                f"{field}: {pre.name} at resolution {resolution} would scale this "
                f"{image.width}x{image.height} picture to {tw}x{th}, over the {MAX_MAP_PIXELS} "
                f"pixels a map may have; give a lower resolution or a less elongated picture")
            error.field = "processor_res"
            raise error
    rgb = np.asarray(to_rgb8(image))
    if pre.name != "none":
        rgb = pre.run(_cv2(pre.name) if pre.opencv else None, np.ascontiguousarray(rgb),
                      resolution, a, b)
    return Image.fromarray(np.ascontiguousarray(rgb))


def apply(pre, image, resolution, a, b, perfect=False, frame=None, field="processor_res"):
    """(``pre``'s map of the PIL ``image``, the record of what ran: (name, resolution, a, b,
    perfect) as ``infotext.controlnet_unit`` writes it, or None for "none", whose map is the
    image as given). ``perfect``: "Pixel Perfect" picks the resolution for ``frame``, the
    (width, height, resize) the map is framed to (``pixel_perfect_resolution``); ``field``
    as ``run`` takes it."""
    if pre.name == "none":
        return image, None
    if perfect and pre.resolution:
        resolution = pixel_perfect_resolution(image.size, *frame)
    return run(pre, image, resolution, a, b, field), (pre.name, resolution, a, b, perfect)


# The extension's edge thinning (Zhang's "High Quality Edge Thinning"): hit-or-miss patterns
# (1: set, -1: clear, 0: either) of a pixel that can go without breaking a line, each in its
# four rotations, removed until none matches; then, where a map was enlarged, one pass of
# the spur patterns.
_THIN = ("--- .#. ###", ".-- ##- .#.")
_SPURS = ("--- -#- ..-", "--- -#- -..")
# The four lines through a pixel: it survives the extension's non-maximum suppression where
# it is the largest along one of them.
_LINES = ("... ### ...", ".#. .#. .#.", "#.. .#. ..#", "..# .#. #..")


def _kernels(patterns, dtype, rotations=4):
    """3x3 arrays of ``patterns`` (rows apart by spaces; "#" 1, "-" -1, "." 0), each in its
    ``rotations`` (by 90° counter-clockwise, as numpy's rot90), rotation by rotation."""
    values = {"#": 1, "-": -1, ".": 0}
    raw = [np.array([[values[c] for c in row] for row in p.split()], dtype) for p in patterns]
    return [np.ascontiguousarray(np.rot90(k, turns)) for turns in range(rotations) for k in raw]


_THIN_KERNELS = _kernels(_THIN, np.int32)
_SPUR_KERNELS = _kernels(_SPURS, np.int32)
_LINE_KERNELS = _kernels(_LINES, np.uint8, rotations=1)


def _thinned(cv2, x, spurs):
    for _ in range(32):
        removed = False
        for k in _THIN_KERNELS:
            hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, k) > 127
            removed |= bool(hits.any())
            x[hits] = 0
        if not removed:
            break
    if spurs:
        for k in _SPUR_KERNELS:
            x[cv2.morphologyEx(x, cv2.MORPH_HITMISS, k) > 127] = 0
    return x


def _map_resize(cv2, x, size):
    """The extension's resize of a map (H, W, 3) to ``size`` (w, h): nearest for a map of 3 to
    199 colours (a segmentation), area down and cubic up otherwise; a black-and-white map is
    made grey and split again by Otsu's threshold, and one of one-pixel lines (a canny map)
    is kept to one-pixel lines (non-maximum suppression, then thinning)."""
    w, h = size
    if x.shape[:2] == (h, w):
        return x
    area = x.shape[0] * x.shape[1]
    packed = (x[..., 0].astype(np.int32) << 16) | (x[..., 1].astype(np.int32) << 8) | x[..., 2]
    colours = len(np.unique(packed))
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    thin = False
    if binary:
        square = np.ones((3, 3), np.uint8)
        opened = cv2.dilate(cv2.erode(x, square), square)
        thin = 2 * np.count_nonzero(opened < x) > np.count_nonzero(x > 127)
    # (cubic where the area stays the same too)
    interpolation = cv2.INTER_NEAREST if 2 < colours < 200 else \
        cv2.INTER_AREA if w * h < area else cv2.INTER_CUBIC
    y = cv2.resize(x, (w, h), interpolation=interpolation)
    if not binary:
        return y
    grey = y.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
    if thin:
        keep = np.zeros(grey.shape, bool)
        for k in _LINE_KERNELS:
            keep |= cv2.dilate(grey, k) == grey
        grey = np.where(keep, grey, 0).astype(np.uint8)
    grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    return _gray3(_thinned(cv2, grey, w * h > area) if thin else grey)


def frame_map(image, width, height, resize="crop", field="image"):
    """A control map (PIL) brought to ``width`` × ``height`` as A1111's ControlNet extension
    frames every unit's map: "resize" stretches it, "crop" scales it to cover the frame and
    cuts the middle out, "fill" scales it to fit and centres it on the median colour of its
    border, each through the extension's map resize (``_map_resize``: edges stay one-pixel
    lines, segmentations keep their colours). A PIL RGB image; ``SdrtError`` naming ``field``
    where "crop" would scale the map past ``MAX_MAP_PIXELS``."""
    from PIL import Image

    from .images import to_rgb8
    cv2 = _cv2("framing a control map")
    x = np.asarray(to_rgb8(image))
    if resize == "resize":
        return Image.fromarray(_map_resize(cv2, x, (width, height)))
    old_h, old_w = x.shape[:2]
    k = (min if resize == "fill" else max)(height / old_h, width / old_w)
    size = (max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k))))
    if size[0] * size[1] > MAX_MAP_PIXELS:
        raise SdrtError(f"{field}: this {old_w}x{old_h} map would be scaled to "
                        f"{size[0]}x{size[1]} to cover {width}x{height}, over the "
                        f"{MAX_MAP_PIXELS} pixels a map may have; crop it closer to that shape")
    y = _map_resize(cv2, x, size)
    new_h, new_w = y.shape[:2]
    if resize == "fill":
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])  # (the map's, unscaled)
        out = np.empty((height, width, 3), np.uint8)
        out[:] = np.median(border, axis=0).astype(np.uint8)
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        out[top:top + new_h, left:left + new_w] = y[:height, :width]
        return Image.fromarray(out)
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return Image.fromarray(np.ascontiguousarray(y[top:top + height, left:left + width]))


def preprocess(image, module="canny", resolution=None, threshold_a=None, threshold_b=None):
    """The control map (a PIL RGB image) preprocessor ``module`` makes of the PIL ``image``,
    at ``resolution`` (see the module docstring) with its ``threshold_a``/``_b`` (None:
    its defaults). For a ControlNet's ``control_image``: ``pipe(prompt,
    control_image=preprocess(photo, "canny"))``."""
    pre = get(module)
    return run(pre, image, *settings(pre, resolution, threshold_a, threshold_b,
                                     names=("resolution", "threshold_a", "threshold_b")))
