"""What an ONNX export folder holds: the four file names, their inputs and outputs, and
``sdrt_export.json``, which records how the folder was made.

Static exports fix every shape. The batch of each network (N = ``--batch`` images):

- text_encoder: 1 prompt; the runtime runs it once per prompt (and per negative prompt);
- unet: 2N, the conditional and unconditional halves of classifier-free guidance in one call;
- vae_decoder: N;
- vae_encoder: 1 image; the pipeline encodes an init image once, then repeats its latents.

The runtime splits a larger batch that is a multiple of the exported one into exported-size
calls, so one export serves several prompts; guidance ≤ 1 (a UNet batch of N) needs a
``--dynamic`` export.
"""
import json
import os

from sdrt.engine.errors import SdrtError
from sdrt.engine.weights import read_json

MANIFEST = "sdrt_export.json"
MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
FILES = {m: f"{m}.onnx" for m in MODELS}

# (inputs, outputs) of each network, in call order. Names follow diffusers' ONNX pipelines.
NAMES = {
    "text_encoder": (("input_ids",), ("last_hidden_state",)),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_decoder": (("latent",), ("image",)),
    "vae_encoder": (("image",), ("latent_mean", "latent_std")),
}
# The inputs whose first axis is the batch: the runtime splits these; the rest are shared.
BATCHED = {"input_ids", "sample", "encoder_hidden_states", "latent", "image"}

DTYPES = ("fp32", "fp16")
# The manifest fields the runtime and check-onnx read.
REQUIRED = ("dtype", "height", "width", "batch", "configs", "scheduler_config")


def sdrt_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(folder, manifest):
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")


def read_manifest(folder):
    """The manifest of an export folder; SdrtError when the folder is not one."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise SdrtError(f"ONNX folder {folder} does not exist")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise SdrtError(f"{folder} is not an sdrt ONNX export: {MANIFEST} is missing")
    manifest = read_json(path, "ONNX export manifest")
    if not isinstance(manifest, dict) or any(k not in manifest for k in REQUIRED):
        raise SdrtError(f"{path} is not an sdrt ONNX export manifest: it needs the fields "
                        f"{', '.join(REQUIRED)}")
    if manifest["dtype"] not in DTYPES:
        raise SdrtError(f"{path}: unknown dtype {manifest['dtype']!r}")
    missing = [FILES[m] for m in MODELS if not os.path.isfile(os.path.join(folder, FILES[m]))]
    if missing:
        raise SdrtError(f"{folder} is missing {', '.join(missing)}")
    return manifest
