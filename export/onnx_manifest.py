"""What an ONNX export folder holds: Optimum's Stable Diffusion layout, and ``sdrt_export.json``,
which records how the folder was made.

The layout is the one ``optimum-cli export onnx`` writes and ``ORTStableDiffusionPipeline``
(``ORTStableDiffusionXLPipeline``, ``...XLImg2ImgPipeline``) loads: ``model_index.json``, one
folder per network (``text_encoder/``, SDXL's ``text_encoder_2/``, ``unet/``, ``vae_decoder/``,
``vae_encoder/``; the SDXL refiner has no ``text_encoder/``) holding ``model.onnx`` (and
``model.onnx.data`` when its weights go to external data) and the network's ``config.json``,
and one folder per tokenizer and ``scheduler/``. Inputs and outputs carry Optimum's names; the
UNet's inputs follow its config (``unet_inputs``), the text encoders' outputs the family
(``output_names``).

Static exports fix every shape. The batch of each network (N = ``--batch`` images):

- text_encoder(s): 1 prompt; the runtime runs it once per prompt (and per negative prompt);
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
MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # SD 1.x/2.x
ALL_MODELS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
FILES = {m: f"{m}/model.onnx" for m in ALL_MODELS}

# (inputs, outputs) of each network, in call order, as Optimum names them. The UNet's inputs
# depend on its config: ``unet_inputs(config)``.
NAMES = {
    "text_encoder": (("input_ids",), ("last_hidden_state", "pooler_output")),
    # SDXL's second encoder (CLIPTextModelWithProjection): the projected pooled output first,
    # which diffusers' SDXL pipelines take as ``output[0]``.
    "text_encoder_2": (("input_ids",), ("text_embeds", "last_hidden_state")),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    # The decoder takes unscaled latents; the encoder gives the latent Gaussian's parameters,
    # (B, 2·latent_channels, h, w): mean, then log-variance, as diffusers' encoder does.
    "vae_decoder": (("latent_sample",), ("sample",)),
    "vae_encoder": (("sample",), ("latent_parameters",)),
}
# The inputs whose first axis is the batch: the runtime splits these; the rest are shared.
BATCHED = {"input_ids", "sample", "encoder_hidden_states", "latent_sample", "timestep_cond",
           "text_embeds", "time_ids", "controlnet_images", "adapter_images"}
# Batched inputs whose batch axis is not the first: the ControlNets' and adapters' images
# (N, B, 3, H, W).
BATCH_AXIS = {"controlnet_images": 1, "adapter_images": 1}
# SDXL's micro-conditioning: original size, crop corner, target size (the refiner: original
# size, crop corner, aesthetic score: ``Family.num_time_ids``, 5).
NUM_TIME_IDS = 6


def unet_inputs(config, num_time_ids=NUM_TIME_IDS):
    """{input name: shape after the batch axis} of a UNet of ``config`` (a UNetConfig), in
    call order. ``timestep`` is a scalar, as Optimum exports it. A guidance-distilled UNet
    (``time_cond_proj_dim``) adds ``timestep_cond`` (B, dim); an SDXL one
    (``addition_embed_type == "text_time"``) adds the pooled text ``text_embeds`` (B, P) and
    ``time_ids`` (B, ``num_time_ids``: the family's)."""
    h = w = None  # the latent size: given at export
    inputs = {"sample": (config.in_channels, h, w), "timestep": None,
              "encoder_hidden_states": (None, config.cross_attention_dim)}
    if getattr(config, "time_cond_proj_dim", None) is not None:
        inputs["timestep_cond"] = (config.time_cond_proj_dim,)
    if getattr(config, "addition_embed_type", None) == "text_time":
        width = config.projection_class_embeddings_input_dim - \
            config.addition_time_embed_dim * num_time_ids
        inputs["text_embeds"] = (width,)
        inputs["time_ids"] = (num_time_ids,)
    return inputs


def models_of(family):
    """The networks an export of ``family`` (a ``families.Family``) holds, in export order."""
    return (*family.text_encoders, "unet", "vae_decoder", "vae_encoder")


def output_names(name, family, config=None):
    """The output names of network ``name`` of a ``family`` model. SDXL's text encoders also
    give every layer's states, ``hidden_states.0`` (the embeddings) to ``hidden_states.{L}``
    (L = ``config.num_hidden_layers``, before the final LayerNorm), as Optimum exports them
    for its SDXL pipelines, which read the penultimate layer."""
    outputs = NAMES[name][1]
    if name.startswith("text_encoder") and family.penultimate:
        outputs += tuple(f"hidden_states.{i}" for i in range(config.num_hidden_layers + 1))
    return outputs


def manifest_family(manifest):
    """The family of an export (exports from before SDXL record none: SD 1.x/2.x)."""
    from sdrt.engine import families
    return families.get(manifest.get("family") or "sd1")


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
    missing = [FILES[m] for m in models_of(manifest_family(manifest))
               if not os.path.isfile(os.path.join(folder, FILES[m]))]
    if missing:
        raise SdrtError(f"{folder} is missing {', '.join(missing)}: an export from before "
                        "sdrt wrote Optimum's layout? export it again")
    return manifest
