"""``sdrt upscale``: A1111's Extras tab on files (``engine/extras.py``), and the upscaler
options ``sdrt generate`` shares with it. Every setting, every input image and every output
size is checked before torch loads; the PNGs keep their inputs' text chunks (A1111's
``parameters``, ComfyUI's ``prompt`` ...) and gain A1111's ``extras`` text, as A1111 saves an
Extras result."""
import os
import time

from .errors import PICKLE_SUFFIXES, SdrtError, refuse_pickle
from .extras import UPSCALER_NONE
from .hires import IMAGE_UPSCALERS

# What an upscaler option's value ends with where it names a model file.
_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def add_parser(sub, float_arg, size_arg):
    u = sub.add_parser(
        "upscale", help="upscale images with an upscale model or Lanczos (A1111's Extras)",
        description="Upscale images as A1111's Extras tab does: by --scale, or to cover --resize "
                    "(cut to it about the centre unless --no-crop), with --upscaler (an ESRGAN, "
                    "Real-ESRGAN, compact Real-ESRGAN or SPAN .safetensors file, a name in "
                    "--upscaler-dir, Lanczos or Nearest), optionally blended with --upscaler-2.")
    u.add_argument("images", metavar="IMAGE", nargs="+", help="the images to upscale")
    u.add_argument("--upscaler", metavar="NAME", default="Lanczos",
                   help="a .safetensors upscale model, a name in --upscaler-dir, Lanczos "
                        "(default) or Nearest")
    u.add_argument("--upscaler-dir", metavar="DIR", default=None,
                   help="the upscale models --upscaler and --upscaler-2 name, by file stem")
    size = u.add_mutually_exclusive_group()
    size.add_argument("--scale", metavar="F", type=float_arg, default=None,
                      help="upscale by F, 1 to 8 (default 2), to a multiple of 8 pixels")
    size.add_argument("--resize", metavar="WxH", type=size_arg, default=None,
                      help="upscale until the image covers WxH, then cut it to WxH about the "
                           "centre (A1111's 'Scale to')")
    u.add_argument("--no-crop", action="store_true",
                   help="with --resize: keep the whole upscaled image (A1111's 'Crop to fit' "
                        "off)")
    u.add_argument("--upscaler-2", metavar="NAME", default="None",
                   help="a second upscaler whose result is blended in at "
                        "--upscaler-2-visibility")
    u.add_argument("--upscaler-2-visibility", metavar="F", type=float_arg, default=0.0,
                   help="the second upscaler's weight in the blend, 0 to 1 (default 0)")
    u.add_argument("-o", "--output", default="upscaled.png",
                   help="output PNG (several images: OUT-0.png, OUT-1.png, ...)")
    u.add_argument("--overwrite", action="store_true", help="replace existing files")
    u.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is available, else cpu")
    u.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="the model's precision; default: fp16 on cuda, fp32 on cpu")


def folder_models(folder, option="--upscaler-dir"):
    """{name: path} of the upscale models in ``folder`` ({} for None), checked to be a
    folder."""
    from .upscaler_config import upscaler_files
    if folder is not None and not os.path.isdir(folder):
        raise SdrtError(f"{option} {folder} is not a folder")
    return upscaler_files(folder)


def model_choice(value, models, option, builtins=()):
    """(name, path) of an upscaler option's ``value``: one of ``builtins`` (path None), a name
    in ``models`` ({name: path}), or a model file (named by its stem); path None for anything
    else, left to the caller to refuse. A file that is missing, a pickle or no upscaler is
    refused by ``option`` before torch loads."""
    if value in builtins:
        return value, None
    if value in models:
        path = models[value]
    elif os.path.splitext(value)[1].lower() in _FILE_SUFFIXES or os.sep in value:
        refuse_pickle(value)
        if not os.path.isfile(value):
            raise SdrtError(f"{option} {value}: no such file")
        path = value
        value = os.path.splitext(os.path.basename(value))[0]
    else:
        return value, None
    from .upscaler_config import file_config
    try:
        file_config(path)
    except SdrtError as e:
        raise SdrtError(f"{option} {value}: {e}") from None
    return value, path


def upscaler_option(value, models, option):
    """(name, path) of an Extras-style upscaler option: None, Lanczos, Nearest (path None), a
    name in ``models`` or a model file; anything else refused, naming ``option``."""
    builtins = (UPSCALER_NONE, *IMAGE_UPSCALERS)
    name, path = model_choice(value, models, option, builtins)
    if path is None and name not in builtins:
        listed = f", or one of --upscaler-dir's: {', '.join(sorted(models))}" if models \
            else " (or give --upscaler-dir)"
        raise SdrtError(f"{option} must be a .safetensors upscale model, "
                        f"{', '.join(builtins)}{listed}; got {value!r}")
    return name, path


def _extras(a, models):
    """The checked settings: (Extras, {name: path} of the models it runs)."""
    from .extras import MAX_SCALE, Extras
    from .request import Limits
    paths = {}
    names = []
    for option, value in (("--upscaler", a.upscaler), ("--upscaler-2", a.upscaler_2)):
        name, path = upscaler_option(value, models, option)
        if path is not None:
            paths[name] = path
        names.append(name)
    if not 0 <= a.upscaler_2_visibility <= 1:
        raise SdrtError(f"--upscaler-2-visibility must be from 0 to 1, got "
                        f"{a.upscaler_2_visibility:g}")
    if a.resize is None:
        scale = 2.0 if a.scale is None else a.scale
        if not 1 <= scale <= MAX_SCALE:
            raise SdrtError(f"--scale must be from 1 to {MAX_SCALE:g}, got {scale:g}")
        return Extras(names[0], names[1], a.upscaler_2_visibility, scale), paths
    height, width = a.resize
    top = Limits.from_env().max_side
    if not (1 <= width <= top and 1 <= height <= top):
        raise SdrtError(f"--resize sides must be from 1 to {top} (SDRT_MAX_SIDE), got "
                        f"{width}x{height}")
    return Extras(names[0], names[1], a.upscaler_2_visibility, None, width, height,
                  not a.no_crop), paths


def upscale(a):
    from .images import read_image
    from .request import Limits
    if a.no_crop and a.resize is None:
        raise SdrtError("--no-crop applies to --resize")
    if not a.output.lower().endswith(".png"):
        raise SdrtError(f"-o {a.output} must end in .png")
    extras, paths = _extras(a, folder_models(a.upscaler_dir))
    images = [read_image(path) for path in a.images]
    top = Limits.from_env().max_side
    for path, im in zip(a.images, images):
        _, w, h = extras.size(im.width, im.height)
        if extras.upscaler_1 != UPSCALER_NONE and not (8 <= min(w, h) and max(w, h) <= top):
            raise SdrtError(f"{path} ({im.width}x{im.height}) would be upscaled to {w}x{h}; "
                            f"each side must be from 8 to {top} (SDRT_MAX_SIDE)")
    loaded = {}
    if paths:
        from .pipeline import resolve_device
        from .upscaler import load_upscaler
        device, dtype = resolve_device(a.device, a.dtype)
        loaded = {name: load_upscaler(path, device, dtype, name=name)
                  for name, path in paths.items()}
    t0 = time.perf_counter()
    results = extras.apply(lambda name, field: loaded[name], images)
    seconds = time.perf_counter() - t0
    written, taken = _save(results, images, a.output, a.overwrite)
    line = f"upscale {seconds:.2f} s → {', '.join(written)}"
    if taken:
        line += f" ({', '.join(taken)} {'exists' if len(taken) == 1 else 'exist'}; " \
                "--overwrite replaces)"
    print(line)


def _save(results, sources, output, overwrite):
    """Each result written atomically as a PNG with its source's text chunks and the Extras
    text (``extras``), under the next free name unless ``overwrite``."""
    from .cli_generate import write_pngs
    from .extras import png_with_text
    return write_pngs([png_with_text(image, source, "extras", text or None)
                       for (image, text), source in zip(results, sources)], output, overwrite)
