"""Building the text encoder, UNet and VAE from a diffusers folder or a single-file checkpoint."""
import os
from dataclasses import dataclass

import torch

from .clip import CLIPTextModel, TextConfig
from .errors import SdrtError
from .memory import check_model_fits
from .request import Limits
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import (PICKLE_SUFFIXES, SafetensorsFiles, component_weights, load_parameters,
                      read_json, refuse_pickle)

MODEL_CLASSES = {
    "unet": (UNet2DConditionModel, UNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "text_encoder": (CLIPTextModel, TextConfig),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model"}


@dataclass
class Components:
    """What a pipeline runs: the three networks, the tokenizer and the scheduler config dict."""
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: object
    scheduler_config: dict
    source: str


def parse_config(component, config_dict, where=None):
    """The checked config object of one component, from its diffusers config dict."""
    try:
        return MODEL_CLASSES[component][1].from_dict(config_dict)
    except SdrtError as e:
        raise SdrtError(f"{where}: {e}" if where else str(e)) from None


def check_compatible(configs, where, tokenizer=None):
    """The three networks (checked configs by component) and the tokenizer fit together: the
    UNet attends to the text encoder's states and denoises the VAE's latents."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    pairs = [("unet", "cross_attention_dim", unet.cross_attention_dim,
              "text_encoder", "hidden_size", text.hidden_size),
             ("unet", "in_channels", unet.in_channels,
              "vae", "latent_channels", vae.latent_channels),
             ("unet", "out_channels", unet.out_channels,
              "vae", "latent_channels", vae.latent_channels)]
    for a, key_a, value_a, b, key_b, value_b in pairs:
        if value_a != value_b:
            raise SdrtError(f"{where}: {a} config {key_a} must equal {b} config {key_b} "
                            f"({value_b}), got {value_a}")
    if tokenizer is not None:
        if tokenizer.max_length > text.max_position_embeddings:
            raise SdrtError(f"{where}: text_encoder config max_position_embeddings must be at "
                            f"least the tokenizer's {tokenizer.max_length} tokens, got "
                            f"{text.max_position_embeddings}")
        if tokenizer.vocab_size > text.vocab_size:
            raise SdrtError(f"{where}: text_encoder config vocab_size must be at least the "
                            f"tokenizer's {tokenizer.vocab_size}, got {text.vocab_size}")


def parse_configs(config_dicts, device, dtype, where, limits=None):
    """Every component's config checked, the three checked together, and the model's size
    (counted from the configs) checked against ``limits`` and the device's memory, all before
    anything is built. Returns the config objects by component."""
    configs = {c: parse_config(c, config_dicts[c], where(c)) for c in MODEL_CLASSES}
    check_compatible(configs, where(None))
    check_model_fits(configs, dtype, device, Limits.from_env() if limits is None else limits,
                     where(None))
    return configs


def build(component, config, device="meta", where=None):
    """One of our modules from its config (a diffusers config dict or a checked config
    object), with uninitialised parameters."""
    model_cls, config_cls = MODEL_CLASSES[component]
    if not isinstance(config, config_cls):
        config = parse_config(component, config, where)
    try:
        with torch.device(device):
            return model_cls(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # The config checks should leave nothing for this; if one slips through, it still
        # ends as one line naming the component.
        raise SdrtError(f"{where or component}: the {component} config does not describe a "
                        f"model sdrt can build ({type(e).__name__}: {e})") from None


def _flat_text_key(name):
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix.
    return name[len("text_model."):]


def load_component(component, config, source, device, dtype, where):
    module = build(component, config, where=where)
    rename = None
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in source):
        rename = _flat_text_key
    return load_parameters(module, source, device, dtype, where, rename)


def _tokenizer(folder, pad_token):
    from .tokenizer import ClipTokenizer
    if folder is not None and os.path.isdir(os.path.join(folder, "tokenizer")):
        return ClipTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    return ClipTokenizer.bundled(pad_token=pad_token)


def _check_folder(path):
    if not os.path.exists(path):
        raise SdrtError(f"model path {path} does not exist")
    if not os.path.isdir(path):
        raise SdrtError(f"model path {path} is neither a folder nor a .safetensors file")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SdrtError(f"{path} is not a diffusers model folder: model_index.json is missing")


def load_folder(path, device, dtype, variant=None, limits=None):
    """A diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/."""
    _check_folder(path)
    read_json(os.path.join(path, "model_index.json"), "model index")
    for sub, name in (("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")):
        f = os.path.join(path, sub, name)
        if not os.path.isfile(f) and not (sub == "tokenizer" and
                                          os.path.isfile(os.path.join(path, sub, "tokenizer.json"))):
            raise SdrtError(f"{f} is missing")
    configs = parse_configs(
        {c: read_json(os.path.join(path, c, "config.json"), f"{c} config") for c in WEIGHT_STEMS},
        device, dtype, lambda c: os.path.join(path, c) if c else path, limits)
    modules = {}
    for component, stem in WEIGHT_STEMS.items():
        folder = os.path.join(path, component)
        files = component_weights(folder, stem, variant)
        with SafetensorsFiles(files) as f:
            modules[component] = load_component(component, configs[component], f.source,
                                                device, dtype, folder)
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"),
                          "scheduler config")
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      _tokenizer(path, None), scheduler, path)


def load_single_file(path, device, dtype, config=None, prediction_type=None, limits=None):
    """An original LDM/CompVis checkpoint in one ``.safetensors`` file.

    The configs come from ``config`` (a diffusers folder, for non-standard sizes) or from the
    real SD 1.x / 2.x configs that the checkpoint's keys point to.
    """
    from .convert_ldm import detect_family, family_configs, ldm_to_diffusers
    with SafetensorsFiles([path]) as f:
        keys = list(f.source)
        family = detect_family(keys)
        if config is not None:
            _check_folder(config)
            configs = {c: read_json(os.path.join(config, c, "config.json"), f"{c} config")
                       for c in MODEL_CLASSES}
            configs["scheduler"] = read_json(
                os.path.join(config, "scheduler", "scheduler_config.json"), "scheduler config")
            if prediction_type is not None:
                configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
        else:
            # For SD 2.x, "epsilon" also picks the 512-base configs over the 768-v ones.
            configs = family_configs(family, prediction_type)
        checked = parse_configs(configs, device, dtype,
                                lambda c: f"{path} ({c} config)" if c else path, limits)
        plan = ldm_to_diffusers(keys, family, configs["unet"], configs["vae"],
                                configs["text_encoder"])
        get = lambda key: f.source[key]()
        modules = {}
        for component in MODEL_CLASSES:
            source = {dkey: (lambda r=recipe: r.load(get)) for dkey, recipe in
                      plan[component].items()}
            modules[component] = load_component(component, checked[component], source, device,
                                                 dtype, f"{path} ({component})")
    pad = "!" if family == "sd2" else "<|endoftext|>"
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      _tokenizer(config, pad), configs["scheduler"], path)


def load(path, device, dtype, variant=None, config=None, prediction_type=None, limits=None):
    """Either layout, told apart by the path: a folder or a ``.safetensors`` file.

    ``limits`` (default ``Limits.from_env()``) bounds the model's parameter count; its weights
    must also fit the device's memory. Both are checked from the configs, before building."""
    if not isinstance(path, (str, os.PathLike)):
        raise SdrtError(f"path must be a model folder or a .safetensors file (a str or "
                        f"os.PathLike), got {path!r}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    for name, value in (("variant", variant), ("config", config)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise SdrtError(f"{name} must be a string, got {value!r}")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise SdrtError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                        f"{prediction_type!r}")
    if os.path.isfile(path):
        refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise SdrtError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
        return load_single_file(path, device, dtype, config, prediction_type, limits)
    if path.endswith(PICKLE_SUFFIXES + (".safetensors",)) and not os.path.exists(path):
        raise SdrtError(f"model file {path} does not exist")
    components = load_folder(path, device, dtype, variant, limits)
    if prediction_type is not None:
        components.scheduler_config = {**components.scheduler_config,
                                       "prediction_type": prediction_type}
    return components
