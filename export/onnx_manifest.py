"""What an ONNX export folder holds: Optimum's Stable Diffusion layout, and ``sdrt_export.json``,
which records how the folder was made.

The layout is the one ``optimum-cli export onnx`` writes and ``ORTStableDiffusionPipeline``
loads: ``model_index.json``, one folder per network (``text_encoder/``, ``unet/``,
``vae_decoder/``, ``vae_encoder/``) holding ``model.onnx`` (and ``model.onnx.data`` when its
weights go to external data) and the network's ``config.json``, and ``tokenizer/`` and
``scheduler/``. Inputs and outputs carry Optimum's names; the UNet's inputs follow its config
(``unet_inputs``).

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
FILES = {m: f"{m}/model.onnx" for m in MODELS}

# (inputs, outputs) of each network, in call order, as Optimum names them. The UNet's inputs
# depend on its config: ``unet_inputs(config)``.
NAMES = {
    "text_encoder": (("input_ids",), ("last_hidden_state", "pooler_output")),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    # The decoder takes unscaled latents; the encoder gives the latent Gaussian's parameters,
    # (B, 2·latent_channels, h, w): mean, then log-variance, as diffusers' encoder does.
    "vae_decoder": (("latent_sample",), ("sample",)),
    "vae_encoder": (("sample",), ("latent_parameters",)),
}
# The inputs whose first axis is the batch: the runtime splits these; the rest are shared.
BATCHED = {"input_ids", "sample", "encoder_hidden_states", "latent_sample", "timestep_cond",
           "text_embeds", "time_ids"}
# SDXL's micro-conditioning: original size, crop corner, target size.
NUM_TIME_IDS = 6


def unet_inputs(config):
    """{input name: shape after the batch axis} of a UNet of ``config`` (a UNetConfig), in
    call order. ``timestep`` is a scalar, as Optimum exports it. A guidance-distilled UNet
    (``time_cond_proj_dim``) adds ``timestep_cond`` (B, dim); an SDXL one
    (``addition_embed_type == "text_time"``) adds the pooled text ``text_embeds`` (B, P) and
    ``time_ids`` (B, 6)."""
    h = w = None  # the latent size: given at export
    inputs = {"sample": (config.in_channels, h, w), "timestep": None,
              "encoder_hidden_states": (None, config.cross_attention_dim)}
    if getattr(config, "time_cond_proj_dim", None) is not None:
        inputs["timestep_cond"] = (config.time_cond_proj_dim,)
    if getattr(config, "addition_embed_type", None) == "text_time":
        width = config.projection_class_embeddings_input_dim - \
            config.addition_time_embed_dim * NUM_TIME_IDS
        inputs["text_embeds"] = (width,)
        inputs["time_ids"] = (NUM_TIME_IDS,)
    return inputs

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
        raise SdrtError(f"{folder} is missing {', '.join(missing)}: an export from before "
                        "sdrt wrote Optimum's layout? export it again")
    return manifest
