"""The ``sdrt`` command: generate images, write the tiny model, export and check ONNX.

Bad input ends with one line on stderr and exit status 2, never a traceback, and never a
half-written output file (images are written to a temporary name, then renamed).
"""
import argparse
import os
import sys
import time

from .atomic import check_new_folder, sibling_name, write_folder
from .errors import SdrtError

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 1  # check-onnx: an exported network is past its tolerance


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors reported like every other bad input: one line, exit 2."""

    def error(self, message):
        raise SdrtError(message)


def _parser():
    from .samplers import SAMPLERS
    p = _Parser(prog="sdrt", description="Stable Diffusion inference engine")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", help="diffusers folder or single-file .safetensors "
                                   "(default: the built-in tiny model)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--steps", type=_positive_int, default=50)
    g.add_argument("--guidance", type=_float, default=7.5)
    g.add_argument("--sampler", default=None,
                   help=f"one of {', '.join(SAMPLERS)} (default: the model's scheduler)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--batch", type=_positive_int, default=1, help="images per prompt")
    g.add_argument("--init-image", default=None, help="image for img2img")
    g.add_argument("--strength", type=_float, default=0.8)
    g.add_argument("--device", choices=("cpu", "cuda"), default=None)
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--config", default=None,
                   help="diffusers folder with the configs for a single-file checkpoint")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    g.add_argument("--clip-skip", type=int, default=0)
    g.add_argument("-o", "--output", default="sdrt.png", help="output PNG path")
    g.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="run the networks in sdrt (torch) or in onnxruntime (onnx)")
    g.add_argument("--onnx-dir", default=None,
                   help="folder written by 'sdrt export onnx' (with --runtime onnx)")

    t = sub.add_parser("make-tiny", help="write the built-in tiny model as a diffusers folder")
    t.add_argument("dir")

    e = sub.add_parser("export", help="export the networks to another format")
    formats = e.add_subparsers(dest="format", required=True)
    o = formats.add_parser("onnx", help="text encoder, UNet, VAE decoder and encoder to ONNX")
    o.add_argument("--model", required=True, help="diffusers folder or single-file .safetensors")
    o.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    o.add_argument("--height", type=int, default=None, help="default: the UNet's native size")
    o.add_argument("--width", type=int, default=None)
    o.add_argument("--batch", type=_positive_int, default=1,
                   help="images per call; the UNet is exported at twice this, for guidance")
    o.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    o.add_argument("--dynamic", action="store_true",
                   help="free batch, height and width axes instead of static shapes")
    o.add_argument("--config", default=None,
                   help="diffusers folder with the configs for a single-file checkpoint")
    o.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)

    # Its options (--models, --systems, --repeats, ...) are bench_pipeline.py's own.
    sub.add_parser("bench", help="sdrt against diffusers on a GPU (benchmarks/bench_pipeline.py)",
                   add_help=False)

    c = sub.add_parser("check-onnx", help="compare an ONNX export with sdrt's own networks")
    c.add_argument("dir", help="folder written by 'sdrt export onnx'")
    c.add_argument("--model", default=None, help="default: the model the export was made from")
    c.add_argument("--device", choices=("cpu", "cuda"), default=None)
    return p


def _check_generate_args(a):
    """Checks that need no model, made before loading one (which can take a minute); the
    pipeline checks again against the model itself (e.g. its VAE's scale factor)."""
    from .samplers import SAMPLERS
    if a.sampler is not None and a.sampler not in SAMPLERS:
        raise SdrtError(f"unknown sampler {a.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and (v % 8 or not 8 <= v <= 4096):
            raise SdrtError(f"--{name} must be a multiple of 8 between 8 and 4096, got {v}")
    if a.init_image is not None and not 0 < a.strength <= 1:
        raise SdrtError(f"--strength must be in (0, 1], got {a.strength}")
    if not a.output.lower().endswith(".png"):
        raise SdrtError(f"output {a.output} must end in .png")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise SdrtError(f"cannot write to {out_dir}")
    if a.model is not None and not os.path.exists(a.model):
        raise SdrtError(f"model path {a.model} does not exist")
    if a.clip_skip < 0:
        raise SdrtError(f"--clip-skip must be 0 or more, got {a.clip_skip}")
    if a.runtime == "onnx" and a.onnx_dir is None:
        raise SdrtError("--runtime onnx needs --onnx-dir")
    if a.runtime != "onnx" and a.onnx_dir is not None:
        raise SdrtError("--onnx-dir is only used with --runtime onnx")


def _load_init_image(path):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise SdrtError(f"cannot read init image {path}: {e.__class__.__name__}")


def _parameters_text(a, seed, sampler, height, width, model):
    """The A1111-style ``parameters`` text that image tools read from a PNG."""
    lines = [a.prompt]
    if a.negative:
        lines.append(f"Negative prompt: {a.negative}")
    settings = [f"Steps: {a.steps}", f"Sampler: {sampler}", f"CFG scale: {a.guidance}",
                f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {model}"]
    if a.init_image:
        settings.append(f"Denoising strength: {a.strength}")
    return "\n".join(lines + [", ".join(settings)])


def save_png(image, path, parameters):
    """Write ``image`` to ``path`` atomically, with a ``parameters`` text chunk."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = sibling_name(path)
    try:
        with open(tmp, "xb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _output_paths(path, n):
    if n == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}-{i}{ext}" for i in range(n)]


def cmd_generate(a):
    from tqdm import tqdm

    from .pipeline import Pipeline, resolve_device
    _check_generate_args(a)
    init = _load_init_image(a.init_image) if a.init_image else None
    if a.runtime == "onnx":
        pipe = _onnx_pipeline(a)
    elif a.model is None:
        from .tiny import tiny_components
        device, dtype = resolve_device(a.device, a.dtype)
        c = tiny_components()
        for m in (c.text_encoder, c.unet, c.vae):
            m.to(device, dtype)
        pipe = Pipeline(c, device, dtype)
    else:
        device, dtype = resolve_device(a.device, a.dtype)
        pipe = Pipeline.from_pretrained(a.model, device, dtype, variant=a.variant,
                                        config=a.config, prediction_type=a.prediction_type)
    from .samplers import default_sampler
    sampler = a.sampler or default_sampler(pipe.scheduler_config)
    bars = []  # drawn at the first step, so a request refused up front prints one line

    def progress(step, steps):
        if not bars:
            bars.append(tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr,
                             leave=False))
        bars[0].update(1)

    images = pipe(a.prompt, negative_prompt=a.negative, height=a.height, width=a.width,
                  num_inference_steps=a.steps, guidance_scale=a.guidance, sampler=sampler,
                  seed=a.seed, image=init, strength=a.strength, num_images_per_prompt=a.batch,
                  clip_skip=a.clip_skip, callback=progress)
    for bar in bars:
        bar.close()
    width, height = images[0].size
    params = _parameters_text(a, pipe.last_seed, sampler, height, width, pipe.source)
    paths = _output_paths(a.output, len(images))
    for image, path in zip(images, paths):
        save_png(image, path, params)
    t = pipe.timings
    print(f"text {t['text']:.2f} s · denoise {t['denoise']:.2f} s "
          f"({t['unet_calls'] / max(t['denoise'], 1e-9):.1f} UNet calls/s) · "
          f"decode {t['decode']:.2f} s · seed {pipe.last_seed} → {', '.join(paths)}")


def _onnx_pipeline(a):
    """A Pipeline whose networks are the ONNX files of --onnx-dir, run by onnxruntime."""
    from sdrt.export.onnx_manifest import read_manifest
    from sdrt.export.onnx_runtime import onnx_components

    from .pipeline import Pipeline, resolve_device
    if a.dtype == "bf16":  # onnxruntime takes numpy arrays, and numpy has no bfloat16
        raise SdrtError("--runtime onnx runs in the export's dtype (fp32 or fp16), not bf16")
    device, dtype = resolve_device(a.device, a.dtype or read_manifest(a.onnx_dir)["dtype"])
    c = onnx_components(a.onnx_dir, a.model, device)
    if a.prediction_type is not None:
        c.scheduler_config = {**c.scheduler_config, "prediction_type": a.prediction_type}
    return Pipeline(c, device, dtype)


def cmd_make_tiny(a):
    from .tiny import write_tiny
    check_new_folder(a.dir)
    write_folder(a.dir, write_tiny)
    print(f"wrote the tiny model to {a.dir}")


def cmd_export(a):
    from sdrt.export.onnx_export import DEFAULT_OPSET, export_onnx
    t0 = time.perf_counter()
    manifest = export_onnx(a.model, a.out, height=a.height, width=a.width, batch=a.batch,
                           dtype=a.dtype, opset=DEFAULT_OPSET if a.opset is None else a.opset,
                           dynamic=a.dynamic, config=a.config, prediction_type=a.prediction_type)
    shapes = "dynamic batch and size" if a.dynamic else \
        f"{manifest['width']}x{manifest['height']}, batch {manifest['batch']}"
    print(f"exported {', '.join(m['file'] for m in manifest['models'].values())} "
          f"({shapes}, {manifest['dtype']}, opset {manifest['opset']}) to {a.out} "
          f"in {time.perf_counter() - t0:.1f} s")


def cmd_check_onnx(a):
    """Exit status 1 when any output is past its tolerance."""
    from sdrt.export.onnx_check import check_onnx, format_table
    rows = check_onnx(a.dir, a.model, device=a.device)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    if failed:
        print(f"{len(failed)} of {len(rows)} comparisons past tolerance", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def cmd_bench(a, rest):
    from sdrt.benchmarks.bench_pipeline import main as bench_main
    return bench_main(rest)


COMMANDS = {"generate": cmd_generate, "make-tiny": cmd_make_tiny, "export": cmd_export,
            "check-onnx": cmd_check_onnx}


def main(argv=None):
    try:
        args, rest = _parser().parse_known_args(argv)
        if args.command == "bench":
            status = cmd_bench(args, rest)
        elif rest:
            raise SdrtError(f"unrecognized arguments: {' '.join(rest)}")
        else:
            status = COMMANDS[args.command](args)
    except SdrtError as e:
        print(f"sdrt: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
