"""A1111's ControlNet extension over the server: the units of a txt2img/img2img request's
``alwayson_scripts.controlnet.args``, and the extension's ``/controlnet/model_list``,
``/controlnet/module_list`` and ``/controlnet/version``.

A unit names a ControlNet of ``--controlnet-dir`` by ``model`` ("NAME [HASH]" as
``model_list`` gives it, or "NAME") and brings its control image (``image``, base64; an
img2img unit without one takes the first init image, as the extension does), its ``weight``,
``resize_mode``, ``guidance_start`` and ``guidance_end``, and its ``module``: "none" (the image
is the map) or a preprocessor that needs no network (``engine.preprocess``: canny, invert,
threshold, ...) with its ``processor_res``, ``threshold_a``/``_b`` (-1: the defaults) and
``pixel_perfect``, run on the image before it is framed (as the extension frames a map:
``engine.preprocess.frame_map``), and its ``control_mode`` ("Balanced",
"My prompt is more important", "ControlNet is more important", or 0 to 2) and ``hr_option``
(in a hires fix: "Both" passes, "Low res only", "High res only"; a canny unit's second pass
is softened, as the extension's is). Fields that would change the picture in ways sdrt does
not implement (a preprocessor that runs a network, a unit mask) are refused with a 400 naming
the field; ``low_vram`` is accepted and does nothing. ``POST /controlnet/detect`` returns a
preprocessor's maps, as the extension's does.

A unit whose ``module`` is one of the extension's IP-Adapter preprocessors (``IP_MODULES``)
runs an IP-Adapter file of ``--controlnet-dir`` (``model``) with the CLIP image encoder of
``--clip-vision-dir`` the module names (ViT-H or ViT-bigG, checked against what the adapter
reads) on its ``image``, at its ``weight`` within ``guidance_start``/``guidance_end``.
"""
import math
import os
import re

from fastapi import Request

from sdrt.engine.errors import SdrtError
from sdrt.engine.infotext import controlnet_unit
from sdrt.engine.request import MAX_CONTROL_SCALE, short_repr

MAX_UNITS = 8
# The extension's resize modes, by label and by number, as sdrt's framing calls them.
RESIZE = {"Just Resize": "resize", "Crop and Resize": "crop", "Resize and Fill": "fill",
          0: "resize", 1: "crop", 2: "fill", "Envelope (Outer Fit)": "fill",
          "Scale to Fit (Inner Fit)": "crop"}
_HASHED = re.compile(r"^(.*) \[[0-9a-fA-F]+\]$")
# field → the values that leave sdrt's computation as it is (anything else is refused)
_OFF = {"guessmode": (False,), "mask": (None, ""), "mask_image": (None, "")}
# The extension's IP-Adapter preprocessors → the image encoder each runs ("h": OpenCLIP
# ViT-H/14, "g": ViT-bigG/14; None: whichever fits the adapter).
IP_MODULES = {"ip-adapter_clip_sd15": "h", "ip-adapter_clip_h": "h",
              "ip-adapter_clip_sdxl_plus_vith": "h", "ip-adapter_clip_sdxl": "g",
              "ip-adapter_clip_g": "g", "ip-adapter-auto": None}
# hr_option → (runs in a hires fix's first pass, in its second)
HR_OPTIONS = {"Both": (True, True), "Low res only": (True, False), "High res only": (False, True)}


def script_args(scripts):
    """The ControlNet extension's args of ``alwayson_scripts`` (its key in any case), or
    None."""
    for name, script in (scripts or {}).items():
        if isinstance(name, str) and name.lower() == "controlnet":
            return script.get("args") if isinstance(script, dict) else script
    return None


def parse(server, args, init_images, width, height, api_error, frame=True):
    """The enabled units → (``BatchKey.controls``, the control images framed to
    ``width`` × ``height`` (None without ``frame``: an inpainting request frames them per
    job), the PNG info's (("ControlNet 0", text), ...), each unit's (picture, resize mode)
    for an inpainting job to frame as its init image, ``inpaint.Inpaint.frame_like``, and
    the IP-Adapter units' (``BatchKey.image_prompts``, their reference pictures)). A 400
    naming ``alwayson_scripts.controlnet.args[i].FIELD`` for a unit sdrt cannot run."""
    from sdrt.engine.control import control_mode as checked_mode
    from sdrt.engine.preprocess import apply, frame_map

    where = "alwayson_scripts.controlnet.args"

    def bad(message, field=None):
        return api_error(400, message, "bad_request", f"{where}{field or ''}")

    if not isinstance(args, list):
        raise bad(f"{where} must be a list of ControlNet units, got {short_repr(args)}")
    units = [(i, u) for i, u in enumerate(args)
             if not (isinstance(u, dict) and u.get("enabled", True) is False)]
    if len(units) > MAX_UNITS:
        raise bad(f"{where} may enable at most {MAX_UNITS} units, got {len(units)}")
    controls, images, info, sources, prompts, references = [], [], [], [], [], []
    for i, (index, unit) in enumerate(units):
        at = f"[{index}]"
        if not isinstance(unit, dict):
            raise bad(f"{where}{at} must be an object, got {short_repr(unit)}", at)
        module = unit.get("module", "none")
        if isinstance(module, str) and module.startswith("ip-adapter"):
            prompt, picture, text = _ip_unit(server, unit, at, module, init_images, bad)
            if prompt[0] in [p[0] for p in prompts]:
                raise bad(f"{where}{at}.model: IP-Adapter {prompt[0]!r} is in two units; give "
                          f"each unit its own", f"{at}.model")
            prompts.append(prompt)
            references.append(picture)
            info.append((f"ControlNet {i}", text))
            continue
        try:
            pre, res, a, b = _processor(unit, f"{where}{at}")
        except SdrtError as e:
            raise bad(str(e), f"{at}.{getattr(e, 'field', 'module')}") from None
        perfect = unit.get("pixel_perfect", False)
        if not isinstance(perfect, bool):
            raise bad(f"{where}{at}.pixel_perfect must be true or false, got "
                      f"{short_repr(perfect)}", f"{at}.pixel_perfect")
        for field, off in _OFF.items():
            if unit.get(field, off[0]) not in off:
                raise bad(f"{where}{at}.{field} must be {' or '.join(map(repr, off))}, got "
                          f"{short_repr(unit[field])}", f"{at}.{field}")
        model = unit.get("model")
        name = _HASHED.sub(r"\1", model) if isinstance(model, str) else None
        if not name or server.runner.controlnet_path(name) is None:
            known = ", ".join(server.runner.controlnet_names()) or "none: sdrt serve " \
                                                                   "--controlnet-dir DIR"
            raise bad(f"{where}{at}.model must name a ControlNet of --controlnet-dir (GET "
                      f"/controlnet/model_list; have {known}), got {short_repr(model)}",
                      f"{at}.model")
        if name in [c[0] for c in controls]:
            raise bad(f"{where}{at}.model: ControlNet {name!r} is in two units; give each "
                      f"unit its own", f"{at}.model")
        numbers = _numbers(unit, at, bad)
        try:
            control_mode = checked_mode(f"{where}{at}.control_mode",
                                        unit.get("control_mode", "Balanced"), labels=True)
        except SdrtError as e:
            raise bad(str(e), f"{at}.control_mode") from None
        hr_option = unit.get("hr_option", "Both")
        if not isinstance(hr_option, str) or hr_option not in HR_OPTIONS:
            raise bad(f"{where}{at}.hr_option must be one of {', '.join(HR_OPTIONS)}, got "
                      f"{short_repr(hr_option)}", f"{at}.hr_option")
        mode = unit.get("resize_mode", "Crop and Resize")
        if isinstance(mode, bool) or not isinstance(mode, (int, str)) or mode not in RESIZE:
            raise bad(f"{where}{at}.resize_mode must be Just Resize, Crop and Resize or Resize "
                      f"and Fill (or 0, 1, 2), got {short_repr(mode)}", f"{at}.resize_mode")
        picture = _picture(server, unit, at, init_images, bad)
        region = _region_mask(server, unit.get("effective_region_mask"), at, bad)
        try:
            picture, processor = apply(pre, picture, res, a, b, perfect,
                                       (width, height, RESIZE[mode]),
                                       f"{where}{at}.processor_res")
        except SdrtError as e:
            raise bad(str(e), f"{at}.{getattr(e, 'field', 'module')}") from None
        framed = None
        try:  # (as the extension frames every unit's map)
            if frame:
                framed = frame_map(picture, width, height, RESIZE[mode], f"{where}{at}.image")
        except SdrtError as e:
            raise bad(str(e), f"{at}.image") from None
        for out, value in zip((controls, images, info), unit_parts(
                server, i, name, framed, numbers["weight"], RESIZE[mode],
                numbers["guidance_start"], numbers["guidance_end"], processor, control_mode,
                (*HR_OPTIONS[hr_option], pre.name == "canny"), region)):
            out.append(value)
        sources.append((picture, RESIZE[mode]))
    return (tuple(controls), tuple(images), tuple(info), tuple(sources),
            (tuple(prompts), tuple(references)))


def _numbers(unit, at, bad):
    """A unit's checked weight, guidance_start and guidance_end."""
    where = "alwayson_scripts.controlnet.args"
    numbers = {}
    for field, default, top in (("weight", 1.0, MAX_CONTROL_SCALE),
                                ("guidance_start", 0.0, 1.0), ("guidance_end", 1.0, 1.0)):
        v = unit.get(field, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                not math.isfinite(v) or not 0 <= v <= top:
            raise bad(f"{where}{at}.{field} must be a number from 0 to {top:g}, got "
                      f"{short_repr(v)}", f"{at}.{field}")
        numbers[field] = float(v)
    if numbers["guidance_start"] >= numbers["guidance_end"]:
        raise bad(f"{where}{at}.guidance_start must be below guidance_end, got "
                  f"{numbers['guidance_start']:g} and {numbers['guidance_end']:g}",
                  f"{at}.guidance_start")
    return numbers


def _picture(server, unit, at, init_images, bad):
    """A unit's image (base64), or an img2img request's first init image without one."""
    from .app import _decode_bytes, b64_bytes
    where = "alwayson_scripts.controlnet.args"
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # {"image": base64, "mask": ...} of newer extensions
        if image.get("mask") not in (None, ""):
            raise bad(f"{where}{at}.image.mask must be null: unit masks are not supported",
                      f"{at}.image")
        image = image.get("image")
    if image in (None, ""):
        if not init_images:
            raise bad(f"{where}{at}.image is missing: a txt2img unit needs its control "
                      f"image", f"{at}.image")
        return init_images[0]
    if isinstance(image, str):
        field = f"{where}{at}.image"
        return _decode_bytes(b64_bytes(image, field, field), field, server.limits)
    raise bad(f"{where}{at}.image must be a base64-encoded image, got "
              f"{short_repr(image, 40)}", f"{at}.image")


def _ip_unit(server, unit, at, module, init_images, bad):
    """An IP-Adapter unit → (its ``BatchKey.image_prompts`` entry, its reference picture, its
    PNG info text). Its ``module`` names the image
    encoder the extension runs (ViT-H or ViT-bigG, or "ip-adapter-auto"), found in
    --clip-vision-dir; its ``model`` an IP-Adapter file of --controlnet-dir. The mask is the
    extension's: a base64 image whose red channel in [0, 1] weighs the unit's attention
    (``ip_adapter_mask_style="a1111"``)."""
    import hashlib
    where = "alwayson_scripts.controlnet.args"
    if module not in IP_MODULES:
        faceid = ("; FaceID reads an insightface embedding, which sdrt does not compute"
                  if "face_id" in module or "faceid" in module else "")
        raise bad(f"{where}{at}.module must be one of {', '.join(IP_MODULES)} for an "
                  f"IP-Adapter{faceid}, got {short_repr(module)}", f"{at}.module")
    model = unit.get("model")
    name = _HASHED.sub(r"\1", model) if isinstance(model, str) else None
    path = server.runner.controlnet_path(name) if name else None
    if path is None or os.path.isdir(path):
        raise bad(f"{where}{at}.model must name an IP-Adapter file of --controlnet-dir (GET "
                  f"/controlnet/model_list), got {short_repr(model)}", f"{at}.model")
    try:
        encoder = server.runner.ip_encoder(path, IP_MODULES[module])
    except SdrtError as e:
        raise bad(f"{where}{at}.model: {e}", f"{at}.model") from None
    if encoder is None:
        raise bad(f"{where}{at}.module: no image encoder of --clip-vision-dir gives what "
                  f"IP-Adapter {name!r} reads (sdrt serve --clip-vision-dir DIR with its "
                  f"CLIP vision model)", f"{at}.module")
    numbers = _numbers(unit, at, bad)
    picture = _picture(server, unit, at, init_images, bad)
    digest = hashlib.sha256(picture.tobytes() + repr((picture.mode, picture.size)).encode())
    mask = _region_mask(server, unit.get("effective_region_mask"), at, bad)
    short = server.runner.controlnet_hash(name)
    text = controlnet_unit(f"{name} [{short}]" if short else name, numbers["weight"], "crop",
                           numbers["guidance_start"], numbers["guidance_end"],
                           processor=(module, None, None, None, False))
    return ((name, numbers["weight"], numbers["guidance_start"], numbers["guidance_end"],
             encoder, digest.hexdigest(), None if mask is None else RegionMask(mask)), picture,
            text)


class BlockScales:
    """An IP-Adapter's per-block scales (diffusers' dict, ``value``) in a ``BatchKey``: equal
    (and hashed) by their numbers."""

    def __init__(self, value):
        import json
        self.value = value
        self._key = json.dumps(value, sort_keys=True)

    def __eq__(self, other):
        return isinstance(other, BlockScales) and other._key == self._key

    def __hash__(self):
        return hash(self._key)


class RegionMask:
    """A unit's region mask in a ``BatchKey``: equal (and hashed) by its pixels, so requests
    batch together only with the same mask; ``array`` is float32 (H, W) in [0, 1]."""

    def __init__(self, array):
        import hashlib
        self.array = array
        self._digest = hashlib.sha256(array.tobytes() + repr(array.shape).encode()).digest()

    def __eq__(self, other):
        return isinstance(other, RegionMask) and other._digest == self._digest

    def __hash__(self):
        return hash(self._digest)


def _region_mask(server, value, at, bad):
    """A unit's ``effective_region_mask`` (a base64 image, or null) → its red channel as
    float32 (H, W) in [0, 1], or None."""
    import numpy as np

    from .app import _decode_bytes, b64_bytes
    if value in (None, ""):
        return None
    field = f"alwayson_scripts.controlnet.args{at}.effective_region_mask"
    if not isinstance(value, str):
        raise bad(f"{field} must be a base64-encoded image or null, got "
                  f"{short_repr(value, 40)}", f"{at}.effective_region_mask")
    picture = _decode_bytes(b64_bytes(value, field, field), field, server.limits)
    return np.asarray(picture.convert("RGB"), dtype=np.float32)[..., 0] / 255.0


def _processor(unit, where):
    """A unit's preprocessor and its checked (resolution, threshold A, threshold B)."""
    from sdrt.engine.preprocess import FIELDS, get, settings
    pre = get(unit.get("module", "none"), f"{where}.module")
    return (pre, *settings(pre, *(unit.get(f) for f in FIELDS),
                           names=tuple(f"{where}.{f}" for f in FIELDS)))


def unit_parts(server, index, name, framed, weight, resize, start, end, processor=None,
               mode="balanced", passes=(True, True, False), region=None):
    """One unit's (``BatchKey.controls`` entry, its ``framed`` control image, ("ControlNet
    {index}", its PNG info text)), for A1111's units and ComfyUI's nodes alike; ``resize``
    the mode it was framed by, ``processor`` and ``mode`` as ``infotext.controlnet_unit``
    takes them, ``passes`` its part in a hires fix (``hires.pass_controls``' units),
    ``region`` its ``effective_region_mask`` (float32 (H, W), in the key as ``RegionMask``)."""
    short = server.runner.controlnet_hash(name)
    return ((name, weight, start, end, mode, passes,
             None if region is None else RegionMask(region)), framed,
            (f"ControlNet {index}", controlnet_unit(f"{name} [{short}]" if short else name,
                                                    weight, resize, start, end,
                                                    processor=processor, mode=mode)))


def register(app, server_of):
    """The extension's listing routes."""

    @app.get("/controlnet/model_list", tags=["AUTOMATIC1111"])
    async def model_list(request: Request):
        """--controlnet-dir's ControlNets, "NAME [HASH]" (the first 8 hex digits of the
        file's sha256; a diffusers folder by its name alone), as units' ``model`` takes
        them."""
        from fastapi.concurrency import run_in_threadpool
        runner = server_of(request).runner

        def titles():
            return [f"{n} [{h}]" if (h := runner.controlnet_hash(n)) else n
                    for n in runner.controlnet_names()]
        return {"model_list": await run_in_threadpool(titles)}

    @app.get("/controlnet/module_list", tags=["AUTOMATIC1111"])
    async def module_list(alias_names: bool = False):
        """The preprocessors units' ``module`` takes: "none" (send the map) and, where
        OpenCV is installed (``sdrt[control]``), those that need no network; each one's
        sliders (resolution, thresholds) as the extension lists them. ``alias_names``: by
        the extension's display names."""
        from sdrt.engine.preprocess import PREPROCESSORS, RESOLUTION, available
        shown = [p for p in PREPROCESSORS.values() if not p.opencv or available()]
        key = (lambda p: p.label or p.name) if alias_names else (lambda p: p.name)
        detail = {key(p): {"model_free": p.name == "none", "sliders": [
            s.api_json() for s in ((RESOLUTION if p.resolution and p.name != "none" else None),
                                   p.a, p.b) if s is not None]} for p in shown}
        detail.update({m: {"model_free": False, "sliders": []} for m in IP_MODULES})
        return {"module_list": [key(p) for p in shown] + list(IP_MODULES),
                "module_detail": detail}

    @app.post("/controlnet/detect", tags=["AUTOMATIC1111"])
    async def detect(request: Request):
        """A preprocessor's maps of ``controlnet_input_images`` (base64), as the extension's
        route returns them: {"images": [base64 PNG, ...], "info": "Success"}; its
        ``controlnet_module``, ``controlnet_processor_res``, ``controlnet_threshold_a``/``_b``
        (-1: the defaults). A 400 naming the field for a bad one."""
        from fastapi.concurrency import run_in_threadpool
        from .app import json_body
        return await run_in_threadpool(_detect, server_of(request), await json_body(request))

    @app.get("/controlnet/version", tags=["AUTOMATIC1111"])
    async def version():
        """The extension API's version, as clients check it (its units' fields as above)."""
        return {"version": 2}


def _detect(server, body):
    """``POST /controlnet/detect``'s work (in a worker thread: decoding and OpenCV)."""
    import base64
    import io

    from sdrt.engine.preprocess import FIELDS, get, run, settings

    from .app import ApiError, _decode_bytes, b64_bytes

    def bad(message, field):
        return ApiError(400, message, "bad_request", field)

    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {short_repr(body)}", None)
    try:
        pre = get(body.get("controlnet_module", "none"), "controlnet_module")
        names = tuple(f"controlnet_{f}" for f in FIELDS)
        res, a, b = settings(pre, *(body.get(n) for n in names), names=names)
    except SdrtError as e:
        field = getattr(e, "field", None)
        raise bad(str(e), f"controlnet_{field}" if field else "controlnet_module") from None
    images = body.get("controlnet_input_images")
    if not isinstance(images, list) or not images or len(images) > MAX_UNITS:
        raise bad(f"controlnet_input_images must be a list of 1 to {MAX_UNITS} base64 images, "
                  f"got {short_repr(images, 40)}", "controlnet_input_images")
    maps = []
    for i, image in enumerate(images):
        field = f"controlnet_input_images[{i}]"
        if not isinstance(image, str):
            raise bad(f"{field} must be a base64-encoded image, got {short_repr(image, 40)}",
                      field)
        picture = _decode_bytes(b64_bytes(image, field, field), field, server.limits)
        try:
            out = run(pre, picture, res, a, b, f"{field} at controlnet_processor_res")
        except SdrtError as e:
            raise bad(str(e), f"controlnet_{getattr(e, 'field', 'module')}") from None
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        maps.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"images": maps, "info": "Success"}
