"""The ``sdrt`` command: generate images, write the tiny model, export and check ONNX.

Bad input ends with one line on stderr and exit status 2, never a traceback, and never a
half-written output file. Arguments are checked before torch is imported (1.5 s and 350 MB),
so a rejected call returns at once. Python warnings print as one line each,
``sdrt: warning: ...``.
"""
import argparse
import math
import os
import sys
import time
import warnings

from .atomic import check_new_folder, write_folder
from .errors import SdrtError
from .request import sampler_choices

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 1  # check-onnx: an exported network is past its tolerance
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def int_arg(text):
    """argparse type: an integer, or a one-line error (also ``sdrt serve``'s)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")


def _positive_int(text):
    v = int_arg(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def float_arg(text):
    """argparse type: a number, or a one-line error (also ``sdrt serve``'s)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")


def size_arg(text):
    """``WxH`` (A1111's order, as in "Size: 1024x768") → (height, width), diffusers' order."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 1 or h < 1:
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x768 (positive "
                                         f"integers), got {text!r}") from None
    return (h, w)


def freeu_arg(text):
    """``B1,B2,S1,S2`` → four numbers (FreeU's factors)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected B1,B2,S1,S2 such as 1.3,1.4,0.9,0.2, got "
                                         f"{text!r}")
    return values


def crop_arg(text):
    """``LEFT,TOP`` → (top, left), diffusers' ``crops_coords_top_left`` order."""
    try:
        left, top = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,TOP such as 0,0, got {text!r}") from None
    return (top, left)


def _lora_option(text):
    """PATH[:SCALE] → (PATH, SCALE); only a trailing ':number' is a scale, so a path with a
    colon in it still works."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the scale of {text} must be a finite number")
        return path, value
    return text, 1.0


class _Store(argparse.Action):
    """argparse's ``store``, also noting the option in ``namespace.given``, so that an option
    set on the command line but doing nothing in this call can be named in a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = namespace.given | {self.dest}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show
    (no default, or an on/off flag), or the help already says what the default is."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or \
                "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors reported like every other bad input: one line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, _Store)
        self.register("action", "store", _Store)
        self.set_defaults(given=frozenset())

    def error(self, message):
        raise SdrtError(message)


def version():
    """The installed distribution's version; the source tree's when sdrt is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("sdrt")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def _parser():
    p = _Parser(prog="sdrt", description="Stable Diffusion inference engine.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generate_options(sub.add_parser(
        "generate", help="generate images from a prompt",
        description="Generate images from a prompt and write them as PNGs, with the settings "
                    "in a 'parameters' text chunk. Without --model it runs the built-in tiny "
                    "model, whose pictures are noise."))

    t = sub.add_parser("make-tiny", help="write the random tiny test model as a diffusers folder")
    t.add_argument("dir", metavar="DIR", help="folder to create (must not exist, or be empty)")

    d = sub.add_parser("make-demo", help="write the small trained demo model as a diffusers folder")
    d.add_argument("dir", metavar="DIR", help="folder to create (must not exist, or be empty)")

    from .cli_upscale import add_parser as add_upscale_parser
    add_upscale_parser(sub, float_arg, size_arg)

    from sdrt.serve.cli import add_parser as add_serve_parser  # standard library only, no torch
    add_serve_parser(sub)

    e = sub.add_parser("export", help="export the networks to another format")
    formats = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    o = formats.add_parser("onnx", help="text encoder(s), UNet, VAE decoder and encoder to ONNX",
                           description="Export the text encoder(s), UNet, VAE decoder and VAE "
                                       "encoder to ONNX, in the folder layout Optimum's "
                                       "ORTStableDiffusionPipeline (SDXL: "
                                       "ORTStableDiffusionXLPipeline) loads, with an "
                                       "sdrt_export.json manifest.")
    o.add_argument("--model", metavar="PATH", required=True,
                   help="diffusers folder or single-file .safetensors")
    o.add_argument("--out", metavar="DIR", required=True,
                   help="folder to create (must not exist, or be empty)")
    o.add_argument("--height", metavar="H", type=int, default=None,
                   help="image height the networks are exported for (default: the UNet's "
                        "native size)")
    o.add_argument("--width", metavar="W", type=int, default=None,
                   help="image width (default: the UNet's native size)")
    o.add_argument("--batch", metavar="N", type=_positive_int, default=1,
                   help="images per call; the UNet is exported at twice this, for guidance")
    o.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the exported weights")
    o.add_argument("--fp16", dest="dtype", action="store_const", const="fp16",
                   help="the same as --dtype fp16")
    o.add_argument("--opset", metavar="N", type=int, default=None,
                   help="ONNX opset, 18 to 23 (default: 18)")
    o.add_argument("--dynamic", action="store_true",
                   help="free batch, height and width axes instead of static shapes")
    o.add_argument("--config", metavar="DIR", default=None,
                   help="diffusers folder with the configs for a single-file checkpoint")
    o.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the scheduler's prediction type; for an SD 2.x single file, "
                        "epsilon also selects the 512-base configs")
    o.add_argument("--lora", metavar="PATH[:SCALE]", type=_lora_option, action="append",
                   default=[], help="merge a LoRA (kohya/A1111 or diffusers .safetensors) at SCALE "
                                    "(default 1) into the exported weights; repeat for several")
    o.add_argument("--embedding", metavar="PATH", action="append", default=[],
                   help="add a textual-inversion embedding (.safetensors, A1111 or diffusers "
                        "layout) to the exported text encoders and tokenizers, its token the "
                        "file's name; repeat for several")
    o.add_argument("--controlnet", metavar="PATH", action="append", default=[],
                   help="a ControlNet or T2I-Adapter (diffusers folder or .safetensors file) "
                        "for the UNet to run on every call, its image and scale two more UNet "
                        "inputs (controlnet_images, controlnet_scales; adapter_*); repeat for "
                        "several")
    o.add_argument("--optimize", choices=("ort",), default=None,
                   help="run ONNX Runtime's Stable Diffusion optimizer on every network (with "
                        "--fp16: then its float16 conversion, float32 inputs and outputs kept), "
                        "and check the result against sdrt where --target runs here")
    o.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                   help="with --optimize: the execution provider to fuse for. cuda: all of "
                        "ORT's fusions (GroupNorm, BiasSplitGelu, NhwcConv... run only on "
                        "CUDA); cpu: those the CPU provider runs")

    c = sub.add_parser("check-onnx", help="compare an ONNX export with sdrt's own networks",
                       description="Run each exported network in onnxruntime and in sdrt, on "
                                   "random inputs and on those of a real generation; print a "
                                   "table, and exit 1 past tolerance.")
    c.add_argument("dir", metavar="DIR", help="folder written by 'sdrt export onnx'")
    c.add_argument("--model", metavar="PATH", default=None,
                   help="model to compare with (default: the model the export was made from)")
    c.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is available, else cpu")

    # Its options (--models, --systems, --repeats, ...) are bench_pipeline.py's own:
    # 'sdrt bench --help' lists them.
    sub.add_parser("bench", help="sdrt against diffusers on a GPU (benchmarks/bench_pipeline.py)",
                   add_help=False)
    return p


def _generate_options(g):
    g.add_argument("prompt", nargs="?", default=None,
                   help="what to draw (may come from --from-png or --workflow instead)")
    g.add_argument("--from-png", metavar="IMAGE.png", default=None,
                   help="regenerate from the settings in a PNG's A1111 PNG info (prompt, negative "
                        "prompt, steps, sampler, guidance, seed, size, clip skip); any option "
                        "given as well overrides the PNG's")
    g.add_argument("--workflow", metavar="FILE", default=None,
                   help="run a ComfyUI workflow's settings: a .json saved with 'Save (API "
                        "Format)' or a PNG ComfyUI saved (a plain checkpoint → LoRAs → "
                        "KSampler → VAEDecode graph); --model, --lora and --init-image give "
                        "the files it names, and any option given overrides its value")
    g.add_argument("--model", metavar="PATH",
                   help="diffusers folder or single-file .safetensors checkpoint (default: the "
                        "built-in demo model)")
    g.add_argument("--negative", metavar="TEXT", default=None,
                   help="negative prompt: what to steer away from (used when --guidance is "
                        "above 1)")
    g.add_argument("--prompt-2", metavar="TEXT", default=None,
                   help="SDXL: the prompt of the second text encoder (OpenCLIP bigG; default: "
                        "the prompt)")
    g.add_argument("--negative-2", metavar="TEXT", default=None,
                   help="SDXL: the second text encoder's negative prompt (default: --negative)")
    g.add_argument("--original-size", metavar="WxH", type=size_arg, default=None,
                   help="SDXL micro-conditioning: the size the image is to look as if it was "
                        "taken at (default: the output size)")
    g.add_argument("--target-size", metavar="WxH", type=size_arg, default=None,
                   help="SDXL micro-conditioning: the target size (default: the output size)")
    g.add_argument("--crop", metavar="LEFT,TOP", type=crop_arg, default=None,
                   help="SDXL micro-conditioning: the top-left corner of the crop the image is "
                        "to look cut from (default: 0,0, uncropped)")
    g.add_argument("--negative-original-size", metavar="WxH", type=size_arg, default=None,
                   help="SDXL: the negative half's --original-size (default: the prompt's)")
    g.add_argument("--negative-target-size", metavar="WxH", type=size_arg, default=None,
                   help="SDXL: the negative half's --target-size (default: the prompt's)")
    g.add_argument("--negative-crop", metavar="LEFT,TOP", type=crop_arg, default=None,
                   help="SDXL: the negative half's --crop (default: the prompt's)")
    g.add_argument("--aesthetic-score", metavar="S", type=float_arg, default=None,
                   help="SDXL refiner: the aesthetic score to condition on (default 6)")
    g.add_argument("--negative-aesthetic-score", metavar="S", type=float_arg, default=None,
                   help="SDXL refiner: the negative half's aesthetic score (default 2.5)")
    g.add_argument("--refiner", metavar="PATH", default=None,
                   help="SDXL refiner (diffusers folder or single file): the base denoises to "
                        "--refiner-start of the noise schedule, the refiner the rest")
    g.add_argument("--refiner-start", metavar="F", type=float_arg, default=0.8,
                   help="with --refiner: the fraction of the schedule where the refiner takes "
                        "over, in (0, 1) (A1111's 'Refiner switch at')")
    g.add_argument("--steps", metavar="N", type=int_arg, default=50,
                   help="denoising steps (without --model, the built-in model's own number "
                        "instead)")
    g.add_argument("--guidance", metavar="G", type=float_arg, default=7.5,
                   help="classifier-free guidance scale; 1 or less turns guidance off (one "
                        "UNet pass per step instead of two; without --model, the built-in "
                        "model's own scale instead)")
    g.add_argument("--sampler", metavar="NAME", default=None,
                   help=f"{sampler_choices()}: sampler X along A1111's or ComfyUI's schedule "
                        "S (default: the one matching the model's scheduler)")
    g.add_argument("--seed", metavar="S", type=int_arg, default=-1,
                   help="seed of the initial noise, from 0 to 2**64 - 1; -1 draws one at "
                        "random. The seed used is printed and stored in the PNG")
    g.add_argument("--subseed", metavar="S", type=int_arg, default=-1,
                   help="A1111's variation seed: with --subseed-strength, image i's noise "
                        "moves towards the noise of S + i (-1: one drawn at random)")
    g.add_argument("--subseed-strength", metavar="F", type=float_arg, default=0.0,
                   help="how far the noise moves towards the variation seed's, from 0 (not "
                        "at all) to 1 (A1111's variation strength)")
    g.add_argument("--seed-resize-from", metavar="WxH", type=size_arg, default=None,
                   help="A1111's Resize seed from: centre the noise the seed draws at WxH in "
                        "this size's, so that a seed found at one size keeps its composition at "
                        "another")
    g.add_argument("--height", metavar="H", type=int_arg, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's native "
                        "size, or the init image's)")
    g.add_argument("--width", metavar="W", type=int_arg, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's native "
                        "size, or the init image's)")
    g.add_argument("--batch", metavar="N", type=int_arg, default=1,
                   help="images to generate from the prompt")
    g.add_argument("--init-image", metavar="PATH", default=None,
                   help="start from this image (image-to-image); its EXIF orientation is "
                        "applied and transparency is composited onto white")
    g.add_argument("--strength", metavar="S", type=float_arg, default=None,
                   help="with --init-image: how much of the image to repaint, in (0, 1]; 1 "
                        "keeps nothing of it; the hires fix's is 0.75 unless given "
                        "(default: 0.8)")
    g.add_argument("--noise-multiplier", metavar="F", type=float_arg, default=1.0,
                   help="with --init-image: multiply its initial noise by F, 0 to 10 (A1111's "
                        "Noise multiplier for img2img; e.g. 1.05 for more detail)")
    g.add_argument("--resize-mode", default="resize",
                   choices=("resize", "crop", "fill", "latent"),
                   help="how --init-image is brought to --width × --height (A1111's resize "
                        "mode): resize: stretch it; crop: keep its aspect ratio, cover the "
                        "size and cut the overflow; fill: keep it, fit inside and stretch the "
                        "edges over the bands left; latent: encode it at its own size and "
                        "resize the latents (A1111's latent upscale)")
    g.add_argument("--mask", metavar="PATH", default=None,
                   help="with --init-image: inpaint, repainting where this mask is white (or, "
                        "in a PNG with transparency, opaque: A1111's masks) and keeping the "
                        "rest; resized to the init image")
    g.add_argument("--mask-blur", metavar="PX", type=int_arg, default=4,
                   help="blur the mask by a Gaussian of this many pixels before it is cut at "
                        "half (A1111's mask blur; 0: none)")
    g.add_argument("--invert-mask", action="store_true",
                   help="repaint where --mask is black instead (A1111's 'inpaint not "
                        "masked')")
    g.add_argument("--masked-content", default="original",
                   choices=("original", "fill", "latent-noise", "latent-nothing"),
                   help="what the masked part starts from (A1111's 'masked content'): the init "
                        "image; its surroundings' colours blurred over it; or, in the "
                        "latents, unit noise or zeros"),
    g.add_argument("--inpaint-area", choices=("whole", "masked"), default="whole",
                   help="whole: inpaint the whole picture; masked: only the mask's region, "
                        "grown by --masked-padding, cut out and inpainted at --width × "
                        "--height, then pasted back (A1111's 'Only masked')")
    g.add_argument("--masked-padding", metavar="PX", type=int_arg, default=32,
                   help="with --inpaint-area masked: pixels of context around the mask")
    g.add_argument("--hr-scale", metavar="F", type=float_arg, default=None,
                   help="hires fix (A1111's): draw at --width × --height, upscale by F and "
                        "redraw at that size with image-to-image at --strength (default 0.75 "
                        "here)")
    g.add_argument("--hr-resize", metavar="WxH", type=size_arg, default=None,
                   help="hires fix to this size instead of --hr-scale (A1111's 'resize "
                        "width/height to')")
    g.add_argument("--hr-upscaler", metavar="NAME", default="Latent",
                   help="how the hires fix upscales: Latent, Latent (antialiased), Latent "
                        "(bicubic), Latent (bicubic antialiased), Latent (nearest), Latent "
                        "(nearest-exact), Lanczos, Nearest, or an upscale model (ESRGAN, "
                        "Real-ESRGAN, compact Real-ESRGAN, SPAN): a .safetensors file or a name in "
                        "--upscaler-dir")
    g.add_argument("--upscaler-dir", metavar="DIR", default=None,
                   help="upscale models that --hr-upscaler, --sd-upscale-upscaler and "
                        "workflows name, by file stem (A1111's models/ESRGAN, ComfyUI's "
                        "models/upscale_models)")
    g.add_argument("--hr-steps", metavar="N", type=int_arg, default=0,
                   help="the hires fix's steps (0: --steps)")
    g.add_argument("--hr-sampler", metavar="NAME", default=None,
                   help="the hires fix's sampler (default: --sampler)")
    g.add_argument("--hr-prompt", metavar="TEXT", default="",
                   help="the hires fix's prompt (default: the prompt)")
    g.add_argument("--hr-negative", metavar="TEXT", default="",
                   help="the hires fix's negative prompt (default: --negative)")
    g.add_argument("--sd-upscale", metavar="F", type=float_arg, default=None,
                   help="A1111's SD upscale script: upscale --init-image by F (1 to 8) with "
                        "--sd-upscale-upscaler, cut it into tiles of --width × --height "
                        "(default 512x512, as A1111's) and redraw each by image-to-image at "
                        "--strength, --batch tiles a call; one picture")
    g.add_argument("--sd-upscale-overlap", metavar="PX", type=int_arg, default=64,
                   help="with --sd-upscale: pixels by which neighbouring tiles overlap and are "
                        "blended, 0 to 256 and below the tile's sides")
    g.add_argument("--sd-upscale-upscaler", metavar="NAME", default="None",
                   help="with --sd-upscale: None (the image as it is, A1111's default), "
                        "Lanczos, Nearest, or an upscale model: a .safetensors file or a name "
                        "in --upscaler-dir")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is available, else cpu")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--vae-dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="the VAE's precision; auto: as diffusers (fp32 for SDXL's VAE in an "
                        "fp16 run, else --dtype); bf16 keeps fp32's range at half the bytes "
                        "(ComfyUI's --bf16-vae)")
    g.add_argument("--variant", metavar="NAME", default=None,
                   help="load a diffusers folder's *.VARIANT.safetensors weights, e.g. fp16")
    g.add_argument("--config", metavar="DIR", default=None,
                   help="diffusers folder whose configs and tokenizer a single-file checkpoint "
                        "uses")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the scheduler's prediction type; for an SD 2.x single file, "
                        "epsilon also selects the 512-base configs")
    g.add_argument("--eta", metavar="F", type=float_arg, default=0.0,
                   help="DDIM's share of fresh noise a step, 0 to 1 (diffusers' eta, A1111's "
                        "Eta for DDIM; the other samplers do not read it)")
    g.add_argument("--zero-snr", action="store_true",
                   help="a zero-terminal-SNR schedule: the betas rescaled so that the last "
                        "level is pure noise, timesteps trailing (diffusers' "
                        "rescale_betas_zero_snr, ComfyUI's zsnr) for models trained on it; a "
                        "single file marked v_pred and ztsnr gets it without this")
    g.add_argument("--clip-skip", metavar="N", type=int_arg, default=0,
                   help="skip the last N layers of the text encoder")
    g.add_argument("--zero-out-negative", action="store_true",
                   help="the negative half's text conditioning zeros, whatever --negative says "
                        "(ComfyUI's ConditioningZeroOut on the negative; a --workflow's sets it)")
    g.add_argument("--pag-scale", metavar="F", type=float_arg, default=0.0,
                   help="perturbed-attention guidance: the conditional pass again with the mid "
                        "block's self-attention perturbed, this much of the difference added "
                        "(diffusers' pag_scale, ComfyUI's PerturbedAttentionGuidance; e.g. 3)")
    g.add_argument("--guidance-rescale", metavar="F", type=float_arg, default=0.0,
                   help="rescale the guided prediction towards the conditional one's standard "
                        "deviation by this fraction, 0 to 1 (diffusers' guidance_rescale, "
                        "ComfyUI's RescaleCFG; e.g. 0.7 for zero-terminal-SNR v-prediction "
                        "models)")
    g.add_argument("--guidance-rescale-style", choices=("diffusers", "comfy"),
                   default="diffusers",
                   help="measure the deviations on the UNet's outputs (diffusers) or on the "
                        "velocities they predict (comfy: ComfyUI's RescaleCFG); the same for "
                        "a v-prediction model")
    g.add_argument("--vae-tiling", action="store_true",
                   help="encode and decode pictures past the VAE's sample size in overlapping "
                        "tiles, as diffusers' enable_vae_tiling (less memory for large ones)")
    g.add_argument("--tiling", action="store_true",
                   help="images that tile without seams: every padded convolution of the "
                        "UNet and the VAE wraps around (A1111's Tiling)")
    g.add_argument("--freeu", metavar="B1,B2,S1,S2", type=freeu_arg, default=None,
                   help="FreeU on the UNet's up path: backbone factors B1, B2 and skip factors "
                        "S1, S2 (SD 1.x: 1.5,1.6,0.9,0.2; SDXL: 1.3,1.4,0.9,0.2)")
    g.add_argument("--freeu-style", choices=("diffusers", "comfy", "comfy_v2"),
                   default="diffusers",
                   help="where and how FreeU acts: as diffusers' enable_freeu, ComfyUI's FreeU "
                        "node, or its FreeU_V2 (a --workflow's node sets it)")
    g.add_argument("--vae", metavar="PATH", default=None,
                   help="decode (and encode) with this VAE instead of the model's, as A1111's "
                        "SD VAE setting: a .safetensors file (original or diffusers layout) or "
                        "a diffusers VAE folder; the PNG records it")
    g.add_argument("--lora", metavar="PATH[:SCALE]", type=_lora_option, action="append",
                   default=[], help="apply a LoRA (kohya/A1111 or diffusers .safetensors) at "
                                    "SCALE (default 1); repeat for several")
    g.add_argument("--controlnet", metavar="PATH[:WEIGHT]", type=_lora_option, action="append",
                   default=[], help="a ControlNet (diffusers folder, or .safetensors as A1111 "
                   "and ComfyUI use them) and its weight (default 1); repeat it for several, "
                   "each with its --control-image. With --runtime onnx: one the export runs, "
                   "by its name or file")
    g.add_argument("--control-image", metavar="PATH", action="append", default=[],
                   help="the image (edges, depth, pose ...) the --controlnet of the same place "
                   "follows; it sets the size when neither --init-image nor --width/--height do")
    g.add_argument("--control-mask", metavar="PATH", action="append", default=[],
                   help="the region (white; grey weighs it) the --controlnet of the same place "
                   "acts in, as the A1111 extension's effective region mask; give one per "
                   "--controlnet, 'none' for one without")
    g.add_argument("--control-resize", choices=("resize", "crop", "fill"), default="crop",
                   help="how a control image is brought to the output size, as "
                   "--resize-mode (A1111's ControlNet default: crop, 'Crop and Resize')")
    g.add_argument("--control-module", metavar="NAME", action="append", default=[],
                   help="the preprocessor that makes the --control-image into the ControlNet's "
                   "map, as A1111's ControlNet extension names them (canny, invert, threshold, "
                   "blur_gaussian, scribble_xdog, lineart_standard, tile_resample, color, "
                   "recolor_luminance, recolor_intensity; needs sdrt[control]); one for every "
                   "--controlnet, or one per --controlnet (default: none, the image is the map)")
    g.add_argument("--control-res", metavar="N", type=int_arg, default=None,
                   help="the preprocessor's resolution: the picture's short side, in pixels, "
                   "when it runs (64 to 2048; default 512)")
    g.add_argument("--control-threshold-a", metavar="F", type=float_arg, default=None,
                   help="the preprocessor's first setting (canny: the low threshold, 100; "
                   "threshold: the level, 127; ...; default: the preprocessor's)")
    g.add_argument("--control-threshold-b", metavar="F", type=float_arg, default=None,
                   help="its second setting (canny: the high threshold, 200)")
    g.add_argument("--pixel-perfect", action="store_true",
                   help="run the preprocessor at the resolution at which its map fits the "
                   "output without scaling (A1111's 'Pixel Perfect'), not --control-res")
    g.add_argument("--control-start", metavar="F", type=float_arg, default=0.0,
                   help="the fraction of the steps after which the ControlNets start")
    g.add_argument("--control-end", metavar="F", type=float_arg, default=1.0,
                   help="the fraction of the steps after which they stop")
    g.add_argument("--control-mode", choices=("balanced", "prompt", "controlnet"),
                   action="append", default=[],
                   help="A1111's ControlNet control mode, one for every --controlnet or one per "
                   "--controlnet: prompt ('My prompt is more important') softens the residuals "
                   "towards the first skips, controlnet ('ControlNet is more important') also "
                   "keeps them from CFG's unconditional half (default: balanced)")
    g.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: the ControlNets see only the prompt's half, "
                   "their residuals ramped from 0.1x to 1x towards the mid block")
    g.add_argument("--ip-adapter", metavar="PATH[:WEIGHT]", type=_lora_option,
                   action="append", default=[],
                   help="an IP-Adapter (.safetensors as h94/IP-Adapter ships them: plain, plus, "
                   "plus-face, full-face) and its weight (default 1); repeat it for several, "
                   "each with its --ip-adapter-image")
    g.add_argument("--ip-adapter-image", metavar="PATH", action="append", default=[],
                   help="the reference image the --ip-adapter of the same place reads")
    g.add_argument("--ip-adapter-mask", metavar="PATH", action="append", default=[],
                   help="the region (white) the --ip-adapter of the same place acts in, as "
                   "diffusers' ip_adapter_masks (binarized); give one per --ip-adapter, "
                   "'none' for one without")
    g.add_argument("--image-encoder", metavar="PATH", default=None,
                   help="the CLIP vision model the IP-Adapters read: a transformers folder or "
                   "a .safetensors file (ComfyUI's clip_vision); default: the image_encoder "
                   "folder beside each --ip-adapter (h94/IP-Adapter's layout)")
    g.add_argument("--ip-adapter-start", metavar="F", type=float_arg, default=0.0,
                   help="the fraction of the steps after which the IP-Adapters start")
    g.add_argument("--ip-adapter-end", metavar="F", type=float_arg, default=1.0,
                   help="the fraction of the steps after which they stop")
    g.add_argument("--embedding", metavar="PATH", action="append", default=[],
                   help="textual-inversion embedding (.safetensors, A1111 or diffusers layout); "
                        "write its token in the prompt: the file's name for A1111 files, the "
                        "token it holds for diffusers files (repeatable)")
    g.add_argument("--styles-file", metavar="FILE", default=None,
                   help="an A1111 styles.csv (name, prompt, negative_prompt) that --style "
                        "names")
    g.add_argument("--style", metavar="NAME", action="append", default=[],
                   help="apply this style of --styles-file to the prompts, as A1111 does: its "
                        "text with {prompt} replaced, else appended after ', ' (repeatable, in "
                        "order)")
    g.add_argument("--prompt-syntax", choices=("a1111", "plain", "comfy"), default="a1111",
                   help="a1111: (word:1.2) weights, [word], BREAK, and prompts past 75 tokens "
                        "in chunks, as AUTOMATIC1111 reads them; plain: the text as it is, cut "
                        "at 77 tokens (diffusers); comfy: (word:1.2) weights and chunks as "
                        "ComfyUI reads them, embedding:NAME (--workflow's default)")
    g.add_argument("-o", "--output", metavar="OUT.png", default="sdrt.png",
                   help="PNG to write. An existing file is kept: the first free name of "
                        "OUT-1.png, OUT-2.png, ... is used instead (for --batch N: of "
                        "OUT-0.png, OUT-1.png, ...)")
    g.add_argument("--outdir", metavar="DIR", default=None,
                   help="folder to write into, created if missing; -o is then a name in it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing files: -o exactly (OUT-0.png ... OUT-(N-1).png for "
                        "--batch N)")
    g.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="run the networks in sdrt (torch) or in onnxruntime (onnx)")
    g.add_argument("--onnx-dir", metavar="DIR", default=None,
                   help="folder written by 'sdrt export onnx' (with --runtime onnx)")
    g.add_argument("--no-compile", action="store_true",
                   help="run eagerly on CUDA. By default, text-to-image on CUDA first builds a "
                        "static plan (buffers and CUDA graphs; its time is shown apart) and "
                        "replays it. On the CPU every request runs eagerly")


def cmd_make_tiny(a):
    check_new_folder(a.dir)
    from .tiny import write_tiny
    write_folder(a.dir, write_tiny)
    print(f"wrote the tiny model to {a.dir}")


def cmd_export(a):
    if not os.path.exists(a.model):
        raise SdrtError(f"model path {a.model} does not exist")
    check_new_folder(a.out)
    from sdrt.export.onnx_export import DEFAULT_OPSET, export_onnx
    t0 = time.perf_counter()
    if "target" in a.given and a.optimize is None:
        warnings.warn("--target does nothing without --optimize ort")
    manifest = export_onnx(a.model, a.out, height=a.height, width=a.width, batch=a.batch,
                           dtype=a.dtype, opset=DEFAULT_OPSET if a.opset is None else a.opset,
                           dynamic=a.dynamic, config=a.config, prediction_type=a.prediction_type,
                           optimize=a.optimize, target=a.target, controlnets=a.controlnet,
                           loras=a.lora, embeddings=a.embedding)
    shapes = "dynamic batch and size" if a.dynamic else \
        f"{manifest['width']}x{manifest['height']}, batch {manifest['batch']}"
    added = "".join(f", {what} " + ", ".join(e[key] for e in manifest[field])
                    for field, what, key in (("loras", "LoRAs", "name"),
                                             ("embeddings", "embeddings", "token"),
                                             ("controlnets", "ControlNets", "name"))
                    if manifest[field])
    print(f"exported {', '.join(m['file'] for m in manifest['models'].values())} "
          f"({shapes}, {manifest['dtype']}, opset {manifest['opset']}{added}) to {a.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    optimized = manifest["optimized"]
    if optimized:
        fused = {op: sum(counts[op] for counts in optimized["fused"].values())
                 for op in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd",
                            "Attention", "MultiHeadAttention")}
        print(f"optimized by ONNX Runtime {optimized['onnxruntime_version']} for "
              f"{optimized['target']}: " + ", ".join(f"{n} {op}" for op, n in fused.items()) +
              ("; checked against sdrt" if optimized["checked"] else
               f"; not checked: {optimized['target']} does not run here (check-onnx it where "
               "it does)"))


def check_export_folder(path, option):
    """``path`` (given as ``option``) can be an ONNX export: a folder. Whether it holds the
    manifest is read with the manifest itself."""
    if not os.path.exists(path):
        raise SdrtError(f"{option} {path} does not exist")
    if not os.path.isdir(path):
        raise SdrtError(f"{option} {path} is a file, not a folder: give the folder that "
                        "'sdrt export onnx' wrote")


def cmd_check_onnx(a):
    """Exit status 1 when any output is past its tolerance."""
    check_export_folder(a.dir, "ONNX folder")
    from sdrt.export.onnx_check import check_onnx, format_table
    rows = check_onnx(a.dir, a.model, device=a.device)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    if failed:
        print(f"{len(failed)} of {len(rows)} comparisons past tolerance", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def cmd_bench(a, rest):
    """``rest`` goes to bench_pipeline.py's own parser, whose --help and errors exit."""
    from sdrt.benchmarks.bench_pipeline import main as bench_main
    try:
        return bench_main(rest)
    except SystemExit as e:
        return e.code


def cmd_generate(a):
    from .cli_generate import generate
    return generate(a)


def cmd_upscale(a):
    from .cli_upscale import upscale
    return upscale(a)


def cmd_make_demo(a):
    check_new_folder(a.dir)
    from .demo.model import write_demo
    write_folder(a.dir, write_demo)
    print(f"wrote the demo model to {a.dir}")


def cmd_serve(a):
    from sdrt.serve.cli import run
    return run(a)


COMMANDS = {"generate": cmd_generate, "make-tiny": cmd_make_tiny, "export": cmd_export,
            "make-demo": cmd_make_demo, "serve": cmd_serve, "upscale": cmd_upscale,
            "check-onnx": cmd_check_onnx}


def _one_line(text):
    return " ".join(str(text).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the CLI: one short line, no source line or category.
    tqdm.write lifts a progress bar that is on screen above the line instead of gluing the
    line to it."""
    from tqdm import tqdm
    tqdm.write(f"sdrt: warning: {_one_line(message)}", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            try:
                args, rest = parser.parse_known_args(argv)
            except SystemExit as e:  # --help and --version print, then exit 0
                return e.code
            if args.command == "bench":
                status = cmd_bench(args, rest)
            elif rest:
                raise SdrtError(f"unrecognized arguments: {' '.join(rest)}")
            else:
                status = COMMANDS[args.command](args)
        except SdrtError as e:
            print(f"sdrt: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            # Any progress bar was closed on the way out, ending its line.
            print("sdrt: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
