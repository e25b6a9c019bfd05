"""The shipped demo model: ``engine/data/demo.safetensors`` (fp16, keys prefixed by component)
with its configs in ``engine/data/demo.json``, loaded by ``demo_components()``, run by
``demo_pipeline()`` and written as a diffusers folder by ``write_demo(folder)``. Importing it
does not import torch, so that the CLI can read ``demo_defaults`` before checking a request."""
import json
import os

from ..errors import SdrtError

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
WEIGHTS = os.path.join(DATA, "demo.safetensors")
CONFIG = os.path.join(DATA, "demo.json")
NETWORKS = ("text_encoder", "unet", "vae")


def demo_config(path=CONFIG) -> dict:
    """The demo model's configs (unet, vae, text_encoder, scheduler, pad_token), its
    ``demo_defaults`` (sampler, num_inference_steps, guidance_scale, height, width) and the
    ``training`` record, a fresh copy."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as e:
        raise SdrtError(f"cannot read the demo model's config {path}: {e}") from None


def demo_components(folder=DATA, device="cpu", dtype=None):
    """The demo model's networks (weights cast to ``dtype``, default float32), tokenizer and
    scheduler config (``loading.Components``), from ``folder``'s ``demo.safetensors`` and
    ``demo.json`` (default: the shipped ones)."""
    import torch
    from safetensors.torch import load_file

    from ..loading import Components, build
    from ..tokenizer import ClipTokenizer
    dtype = torch.float32 if dtype is None else dtype
    config = demo_config(os.path.join(folder, "demo.json"))
    weights = os.path.join(folder, "demo.safetensors")
    if not os.path.isfile(weights):
        raise SdrtError(f"the demo model's weights {weights} are missing")
    tensors = load_file(weights)
    modules = {}
    for name in NETWORKS:
        prefix = name + "."
        state = {k[len(prefix):]: v.to(device, dtype) for k, v in tensors.items()
                 if k.startswith(prefix)}
        module = build(name, config[name], device="meta")
        module.load_state_dict(state, strict=True, assign=True)
        modules[name] = module.eval()
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      ClipTokenizer.bundled(pad_token=config["pad_token"]), config["scheduler"],
                      "built-in demo model")


def demo_pipeline(device="cpu", dtype=None, prediction_type=None, vae_dtype=None):
    """A ``Pipeline`` of the shipped demo model, what ``sdrt generate`` and ``sdrt serve`` run
    without ``--model``; ``prediction_type`` overrides its scheduler's (as for the same model
    written by ``write_demo``), ``vae_dtype`` is the Pipeline's."""
    import torch

    from ..pipeline import Pipeline
    dtype = torch.float32 if dtype is None else dtype
    c = demo_components(device=device, dtype=dtype)
    if prediction_type is not None:
        c.scheduler_config = {**c.scheduler_config, "prediction_type": prediction_type}
    return Pipeline(c, device, dtype, vae_dtype=vae_dtype)


def write_demo(folder, source=DATA):
    """Write the demo model as a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/; weights in float32), plus ``demo_defaults.json`` with the settings
    it was tuned for."""
    from ..tiny import write_model
    config = demo_config(os.path.join(source, "demo.json"))
    write_model(folder, config, demo_components(source))
    with open(os.path.join(folder, "demo_defaults.json"), "w", encoding="utf-8") as fh:
        json.dump(config["demo_defaults"], fh, indent=2)
