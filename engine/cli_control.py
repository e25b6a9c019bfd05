"""``sdrt generate``'s ControlNet options, as A1111's ControlNet extension offers them:
``--controlnet PATH[:WEIGHT]`` (repeatable: several ControlNets, their residuals summed), one
``--control-image`` per ControlNet, framed to the output size by ``--control-resize``
(A1111's "Crop and Resize" by default), ``--control-start``/``--control-end`` (its guidance
start and end), ``--control-mode`` (its control modes), ``--guess-mode``, and a preprocessor
per ControlNet (``--control-module``,
with ``--control-res``, ``--control-threshold-a``/``-b``, ``--pixel-perfect``;
``engine.preprocess``). Checked before torch is imported; the PNG records each unit as A1111's
extension writes it (``ControlNet 0: "Module: canny, Model: ..."``).
"""
import os

from .errors import SdrtError
from .infotext import CONTROL_RESIZE_LABELS, controlnet_unit
from .infotext import file_stem, numbered_stems
from .request import CONTROL_MODES, MAX_CONTROL_SCALE


def _at(value, i):
    """Unit i's value of --control-start/--control-end: the option's, or a workflow's own per
    unit (a list)."""
    return value[i] if isinstance(value, list) else value


def from_workflow(a, units, where):
    """A ComfyUI workflow's ControlNetApplyAdvanced nodes (``comfy.Control``) as the options:
    each ControlNet is the --controlnet of its file name, at the node's strength, with the
    --control-image of its image's file name (or the one given, for one node); its start and
    end, unless --control-start/--control-end are given; its preprocessor node's module and
    settings, unless --control-module is."""
    a.controlnet, a.control_image = _given_files(
        [(unit.name, unit.image, unit.strength) for unit in units], a.controlnet, a.control_image,
        lambda name: f"{where} applies ControlNet {name!r}: pass --controlnet "
                     f"PATH/{file_stem(name)}.safetensors (or its folder)",
        lambda image: f"{where} conditions a ControlNet on image {image!r}: pass "
                      f"--control-image PATH/{os.path.basename(image)}")
    for option, attr in (("control_start", "start"), ("control_end", "end")):
        if option not in a.given:
            setattr(a, option, [getattr(unit, attr) for unit in units])
    if any(unit.preprocessor for unit in units) and not a.control_module:
        # a preprocessor node's module and settings, per unit
        a.control_module = [u.preprocessor[0] if u.preprocessor else "none" for u in units]
        for option, k in (("control_res", 1), ("control_threshold_a", 2),
                          ("control_threshold_b", 3)):
            if option not in a.given:
                setattr(a, option, [u.preprocessor[k] if u.preprocessor else None
                                    for u in units])


def _given_files(nodes, models, images, no_model, no_image):
    """A workflow's nodes, (model file name, image file name, weight) each, as options: the
    given (model path, weight) and image path of each, matched by file name (for one node,
    the one image given will do); ``SdrtError(no_model(name))`` or ``no_image(name)`` for one
    not given."""
    by_stem = {file_stem(path): path for path, _ in models}
    by_name = {os.path.basename(p): p for p in images}
    chosen, pictures = [], []
    for name, image, weight in nodes:
        if file_stem(name) not in by_stem:
            raise SdrtError(no_model(name))
        picture = by_name.get(os.path.basename(image))
        if picture is None and len(nodes) == len(images) == 1:
            picture = images[0]
        if picture is None:
            raise SdrtError(no_image(image))
        chosen.append((by_stem[file_stem(name)], weight))
        pictures.append(picture)
    return chosen, pictures


def _preset_files(a, prompt, where):
    """``prompt`` (an IPAdapterUnifiedLoader's) with the files its preset finds among the
    given --ip-adapter and --image-encoder files, by their names (for an SD 1.x model or an
    SDXL one: sdrt generate reads the workflow before the model)."""
    from dataclasses import replace

    from .comfy import preset_files
    adapters = [os.path.basename(p) for p, _ in a.ip_adapter]
    encoders = None if prompt.encoder else (
        [os.path.basename(a.image_encoder)] if a.image_encoder else [])
    errors = []
    for sdxl in (False, True):
        try:
            adapter, encoder = preset_files(prompt.preset, sdxl, adapters, encoders)
            return replace(prompt, adapter=adapter, encoder=prompt.encoder or encoder)
        except SdrtError as e:
            errors.append(str(e))
    raise SdrtError(f"{where}: {errors[0]}: pass it as --ip-adapter PATH or --image-encoder "
                    f"PATH")


def ip_from_workflow(a, prompts, where):
    """A ComfyUI workflow's IPAdapterAdvanced nodes (``comfy.ImagePrompt``) as the options:
    each IP-Adapter the --ip-adapter of its file name at the node's weight, its reference the
    --ip-adapter-image of its LoadImage's file name (or the one given, for one node), read by
    --image-encoder (one for every node: its file name must be the CLIPVisionLoader's), from
    and to the node's start_at and end_at unless --ip-adapter-start/--ip-adapter-end are
    given; ``a.ip_adapter_prep`` says how each image is prepared (``comfy.clip_vision_image``).
    """
    prompts = [_preset_files(a, p, where) if p.preset else p for p in prompts]
    masks = {os.path.basename(p): p for p in a.ip_adapter_mask}
    for prompt in prompts:
        if prompt.mask is not None and os.path.basename(prompt.mask[0]) not in masks:
            raise SdrtError(f"{where} confines an IP-Adapter to mask {prompt.mask[0]!r}: pass "
                            f"--ip-adapter-mask PATH/{os.path.basename(prompt.mask[0])}")
    if not any(prompt.mask for prompt in prompts) and a.ip_adapter_mask:
        raise SdrtError(f"{where} applies IP-Adapters without masks: drop --ip-adapter-mask")
    encoders = sorted({p.encoder for p in prompts})
    if len(encoders) > 1:
        raise SdrtError(f"{where} reads its IP-Adapters' images with {' and '.join(encoders)}; "
                        f"sdrt generate takes one --image-encoder")
    if a.image_encoder is None or file_stem(a.image_encoder) != file_stem(encoders[0]):
        raise SdrtError(f"{where} reads its IP-Adapters' images with {encoders[0]!r}: pass "
                        f"--image-encoder PATH/{os.path.basename(encoders[0])}")
    a.ip_adapter, a.ip_adapter_image = _given_files(
        [(p.adapter, p.image, p.weight) for p in prompts], a.ip_adapter, a.ip_adapter_image,
        lambda name: f"{where} applies IP-Adapter {name!r}: pass --ip-adapter "
                     f"PATH/{os.path.basename(name)}",
        lambda image: f"{where} gives an IP-Adapter image {image!r}: pass "
                      f"--ip-adapter-image PATH/{os.path.basename(image)}")
    a.ip_adapter_prep = [prompt.prep for prompt in prompts]
    # (each mask the file its node names, read from the channel it reads, as ComfyUI reads it)
    a.ip_adapter_mask = [masks[os.path.basename(p.mask[0])] if p.mask else "none"
                         for p in prompts] if any(p.mask for p in prompts) else []
    a.ip_adapter_mask_channels = [p.mask[1] if p.mask else None for p in prompts]
    a.ip_adapter_weight_types = [prompt.weight_type for prompt in prompts]
    for option, attr in (("ip_adapter_start", "start"), ("ip_adapter_end", "end")):
        if option not in a.given:
            setattr(a, option, [getattr(prompt, attr) for prompt in prompts])


def _unit_model(unit):
    """A unit's model name, without the " [HASH]" the extension writes after it."""
    import re
    return re.sub(r" \[[0-9a-fA-F]+\]$", "", unit.get("Model", ""))


def _unit_fields(text):
    """A PNG's ``ControlNet N`` value ("Module: none, Model: NAME [HASH], Weight: 1, ...") as
    {field: value}."""
    fields = {}
    for part in text.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def from_png(a, pairs, where):
    """--from-png: the ControlNet units A1111's extension (or sdrt) recorded, applied to the
    --controlnet files of the same names (weight, resize mode, guidance start and end, guess
    mode, control mode, preprocessor and its settings) unless those options are given; a unit whose
    ControlNet is not given is named in a warning, as is a preprocessor sdrt does not run (its
    map is the --control-image to pass)."""
    import re
    import warnings

    from .preprocess import get
    units = [_unit_fields(v) for k, v in sorted(pairs.items())
             if re.fullmatch(r"ControlNet \d+", k) and isinstance(v, str)]
    ip_units = [u for u in units if u.get("Module", "").startswith("ip-adapter")]
    _ip_from_png(a, ip_units, where)
    units = [u for u in units if u not in ip_units]
    if not units:
        return
    n = len(a.controlnet)
    index = {name: i for i, name in enumerate(names(a))}  # as infotext names them
    starts, ends = [a.control_start] * n, [a.control_end] * n
    modules, control_modes = ["none"] * n, ["balanced"] * n
    by_label = {label: name for name, (label, _) in CONTROL_MODES.items()}
    settings = {o: [getattr(a, o)] * n for o in ("control_res", "control_threshold_a",
                                                 "control_threshold_b")}
    resize = {v: k for k, v in CONTROL_RESIZE_LABELS.items()}
    for unit in units:
        model = _unit_model(unit)
        if model not in index:
            warnings.warn(f"{where} used ControlNet {model}: pass --controlnet FILE for it and "
                          f"its --control-image, or the image will differ")
            continue
        i = index[model]
        try:
            a.controlnet[i] = (a.controlnet[i][0], float(unit.get("Weight", 1)))
            starts[i] = float(unit.get("Guidance Start", 0))
            ends[i] = float(unit.get("Guidance End", 1))
            for option, field in (("control_res", "Processor Res"),
                                  ("control_threshold_a", "Threshold A"),
                                  ("control_threshold_b", "Threshold B")):
                if field in unit and option not in a.given:
                    settings[option][i] = float(unit[field])
        except ValueError:
            raise SdrtError(f"{where}: ControlNet unit {unit} has a value that is not a "
                            f"number") from None
        try:
            modules[i] = get(unit.get("Module", "none")).name
        except SdrtError:
            warnings.warn(f"{where} ran preprocessor {unit['Module']} for ControlNet {model}: "
                          f"sdrt does not run it; pass its map as --control-image")
        if unit.get("Pixel Perfect") == "True" and modules[i] != "none":
            a.pixel_perfect = True
        if unit.get("Resize Mode") in resize and "control_resize" not in a.given:
            a.control_resize = resize[unit["Resize Mode"]]
        if unit.get("Guess Mode") == "True":
            a.guess_mode = True
        control_modes[i] = by_label.get(unit.get("Control Mode"), "balanced")
    for option, values in (("control_start", starts), ("control_end", ends), *settings.items()):
        if option not in a.given:
            setattr(a, option, values)
    if not a.control_module:
        a.control_module = modules
    if not a.control_mode:
        a.control_mode = control_modes


def _ip_from_png(a, units, where):
    """--from-png's IP-Adapter units, applied to the --ip-adapter files of the same names
    (weight; guidance start and end, one for all, unless given); a unit whose adapter is not
    given is named in a warning."""
    import warnings
    index = {name: i for i, name in enumerate(ip_names(a))}
    for unit in units:
        model = _unit_model(unit)
        if model not in index:
            warnings.warn(f"{where} used IP-Adapter {model}: pass --ip-adapter FILE for it and "
                          f"its --ip-adapter-image, or the image will differ")
            continue
        i = index[model]
        try:
            a.ip_adapter[i] = (a.ip_adapter[i][0], float(unit.get("Weight", 1)))
            for option, field, default in (("ip_adapter_start", "Guidance Start", 0),
                                           ("ip_adapter_end", "Guidance End", 1)):
                if option not in a.given:
                    setattr(a, option, float(unit.get(field, default)))
        except ValueError:
            raise SdrtError(f"{where}: IP-Adapter unit {unit} has a value that is not a "
                            f"number") from None


def check(a):
    """The ControlNet options fit together and with the others; their files exist."""
    if not a.controlnet:
        for option, given in (("--control-image", a.control_image),
                              ("--control-mask", a.control_mask)):
            if given:
                raise SdrtError(f"{option} needs --controlnet (the ControlNet that follows it)")
        return
    if a.control_mask and len(a.control_mask) != len(a.controlnet):
        raise SdrtError(f"--control-mask: give one per --controlnet ('none' for one without), "
                        f"got {len(a.control_mask)} for {len(a.controlnet)}")
    if len(a.control_image) != len(a.controlnet):
        raise SdrtError(f"--control-image: give one per --controlnet ({len(a.controlnet)} "
                        f"ControlNet{'s' * (len(a.controlnet) > 1)}, {len(a.control_image)} "
                        f"image{'s' * (len(a.control_image) != 1)})")
    for path, weight in a.controlnet:
        # With --runtime onnx a ControlNet of the exported UNet, by name or by its file.
        if not os.path.exists(path) and a.runtime != "onnx":
            raise SdrtError(f"--controlnet {path} does not exist")
        if not 0 <= weight <= MAX_CONTROL_SCALE:
            raise SdrtError(f"--controlnet {path}: the weight must be from 0 to "
                            f"{MAX_CONTROL_SCALE:g}, got {weight:g}")
    for i in range(len(a.controlnet)):
        start, end = _at(a.control_start, i), _at(a.control_end, i)
        for option, value in (("--control-start", start), ("--control-end", end)):
            if not 0 <= value <= 1:
                raise SdrtError(f"{option} must be from 0 to 1, got {value:g}")
        if start >= end:
            raise SdrtError(f"--control-start must be below --control-end, got {start:g} and "
                            f"{end:g}")
    modes(a)
    preprocessors(a)


def _per_net(a, option, values, default):
    """An option given once for every --controlnet or once per --controlnet, as one value
    per --controlnet."""
    n, values = len(a.controlnet), values or [default]
    if len(values) not in (1, n):
        raise SdrtError(f"{option}: give one for every --controlnet or one per --controlnet "
                        f"({n} ControlNets, {len(values)} given)")
    return values * n if len(values) == 1 else list(values)


def modes(a):
    """Each --controlnet's control mode (--control-mode)."""
    out = _per_net(a, "--control-mode", a.control_mode, "balanced")
    if a.guess_mode and any(m != "balanced" for m in out):
        raise SdrtError("--control-mode must be balanced with --guess-mode (guess mode ramps "
                        "the residuals and keeps them from the unconditional half already)")
    return out


_OPTIONS = ("--control-res", "--control-threshold-a", "--control-threshold-b")


def preprocessors(a):
    """Each --controlnet's preprocessor and its checked (resolution, threshold A, threshold
    B): --control-module (one for all, or one per ControlNet) with the settings given."""
    from .preprocess import available, get, settings
    out = []
    for i, module in enumerate(_per_net(a, "--control-module", a.control_module, "none")):
        pre = get(module, "--control-module")
        if pre.opencv and not available():
            raise SdrtError(f"--control-module {pre.name} needs OpenCV: pip install "
                            f"'sdrt[control]' (opencv-python-headless)")
        values = (a.control_res, a.control_threshold_a, a.control_threshold_b)
        out.append((pre, *settings(pre, *(_at(v, i) for v in values), names=_OPTIONS)))
    return out


def warn_unused(a, unused):
    if not a.controlnet:
        for option in ("control_resize", "control_start", "control_end"):
            if option in a.given:
                unused(f"--{option.replace('_', '-')}", "it applies to --controlnet")
        if a.guess_mode:
            unused("--guess-mode", "it applies to --controlnet")
        for option in ("control_module", "control_mode"):
            if getattr(a, option):
                unused(f"--{option.replace('_', '-')}", "it applies to --controlnet")
    elif all(m.lower() in ("none", "") for m in a.control_module or ["none"]):
        for option in ("control_res", "control_threshold_a", "control_threshold_b"):
            if option in a.given:
                unused(f"--{option.replace('_', '-')}", "it applies to --control-module")
        if a.pixel_perfect:
            unused("--pixel-perfect", "it applies to --control-module")


def read_images(a):
    """The --control-image files, and in ``a.control_masks`` the --control-mask files
    (float32 (H, W) in [0, 1], None for 'none'; [] without)."""
    from .images import mask_to_float, read_image
    a.control_masks = [None if path == "none" else mask_to_float(read_image(path, "control mask"))
                       for path in a.control_mask]
    return [read_image(path, "control image") for path in a.control_image]


def names(a):
    """The name each --controlnet is loaded under: its file or folder name, numbered where
    two are the same."""
    return numbered_stems(p for p, _ in a.controlnet)


def load(a, pipe):
    return [pipe.load_controlnet(path, name=name)
            for (path, _), name in zip(a.controlnet, names(a))]


def call(a, images, loaded, width, height, first=None, inpaint=None):
    """The pipeline arguments of the ControlNets ``loaded`` (their names), each image made
    the map by its preprocessor and framed to ``width`` × ``height`` by --control-resize, or
    as ``inpaint`` (an ``inpaint.Inpaint``) frames the init image; {} without --controlnet.
    ``first``: the first pass's (width, height), which --pixel-perfect fits the map to (a
    hires fix's is smaller). Records the preprocessors run in ``a.control_processors``."""
    a.control_processors = []
    if not a.controlnet:
        return {}
    from .images import frame_init_image
    from .preprocess import apply
    maps = []
    for im, (pre, *values) in zip(images, preprocessors(a)):
        image, record = apply(pre, im, *values, a.pixel_perfect,
                              (*(first or (width, height)), a.control_resize), "--control-res")
        maps.append(image)
        a.control_processors.append(record)
    framed = [inpaint.frame_like(im, a.control_resize) if inpaint is not None else
              frame_init_image(im, width, height, a.control_resize) for im in maps]
    masks = {}
    if any(m is not None for m in a.control_masks):
        masks["control_mask"] = a.control_masks if len(framed) > 1 else a.control_masks[0]
    return dict(control_image=framed if len(framed) > 1 else framed[0], controlnet=loaded,
                controlnet_conditioning_scale=[w for _, w in a.controlnet],
                control_guidance_start=a.control_start, control_guidance_end=a.control_end,
                guess_mode=a.guess_mode, control_mode=modes(a), **masks)


def hires_units(a):
    """Each ControlNet's part in a hires fix (``hires.pass_controls``' units): both passes,
    a canny one softened in the second, as A1111's extension runs it; None without
    --controlnet."""
    if not a.controlnet:
        return None
    return [(True, True, p is not None and p[0] == "canny") for p in a.control_processors]


def ip_names(a):
    """The name each --ip-adapter is loaded under: its file name, numbered where two are the
    same."""
    return numbered_stems(p for p, _ in a.ip_adapter)


# The ControlNet extension's IP-Adapter preprocessor for an image encoder's width.
_IP_MODULES = {1280: "ip-adapter_clip_h", 1664: "ip-adapter_clip_g"}


def ip_infotext(a, identities, widths, first):
    """(("ControlNet N", text), ...) of the --ip-adapter units, numbered from ``first``, as
    the extension records an IP-Adapter unit; ``identities`` the (name, short hash) of each,
    ``widths`` the hidden size of the encoder each reads (which names the module)."""
    n = len(a.ip_adapter)
    per = lambda v: v if isinstance(v, list) else [v] * n  # noqa: E731 (a workflow's: per node)
    return tuple((f"ControlNet {first + i}", controlnet_unit(
        f"{name} [{short[:8]}]" if short else name, weight, "crop", start, end,
        processor=(_IP_MODULES.get(width, "ip-adapter-auto"), None, None, None, False)))
        for i, ((_, weight), (name, short), width, start, end) in enumerate(zip(
            a.ip_adapter, identities, widths, per(a.ip_adapter_start), per(a.ip_adapter_end))))


def infotext(a, identities):
    """(("ControlNet 0", text), ...) for the PNG; ``identities`` the (name, short hash) of
    each --controlnet (hash None for a folder)."""
    return tuple((f"ControlNet {i}", controlnet_unit(
        f"{name} [{short[:8]}]" if short else name, weight, a.control_resize,
        _at(a.control_start, i), _at(a.control_end, i), a.guess_mode, processor, mode))
        for i, ((_, weight), (name, short), processor, mode) in enumerate(zip(
            a.controlnet, identities, a.control_processors, modes(a))))
