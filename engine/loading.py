"""Building the text encoder, UNet and VAE from a diffusers folder or a single-file checkpoint."""
import os
from dataclasses import dataclass

import torch

from .clip import CLIPTextModel, TextConfig
from .errors import SdrtError
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import (PICKLE_SUFFIXES, SafetensorsFiles, component_weights, load_parameters,
                      read_json, refuse_pickle)

MODEL_CLASSES = {
    "unet": (UNet2DConditionModel, UNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "text_encoder": (CLIPTextModel, TextConfig),
}
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


def build(component, config_dict, device="meta", where=None):
    """One of our modules from its diffusers config dict, with uninitialised parameters."""
    model_cls, config_cls = MODEL_CLASSES[component]
    try:
        with torch.device(device):
            return model_cls(config_cls.from_dict(config_dict))
    except SdrtError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # A config that parses but does not describe a model (a string where a number goes,
        # channels that do not split into groups, ...).
        raise SdrtError(f"{where or component}: the {component} config does not describe a "
                        f"model sdrt can build ({type(e).__name__}: {e})") from None


def _flat_text_key(name):
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix.
    return name[len("text_model."):]


def load_component(component, config_dict, source, device, dtype, where):
    module = build(component, config_dict, where=where)
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


def load_folder(path, device, dtype, variant=None):
    """A diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/."""
    _check_folder(path)
    read_json(os.path.join(path, "model_index.json"), "model index")
    for sub, name in (("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")):
        f = os.path.join(path, sub, name)
        if not os.path.isfile(f) and not (sub == "tokenizer" and
                                          os.path.isfile(os.path.join(path, sub, "tokenizer.json"))):
            raise SdrtError(f"{f} is missing")
    modules = {}
    for component, stem in WEIGHT_STEMS.items():
        folder = os.path.join(path, component)
        config = read_json(os.path.join(folder, "config.json"), f"{component} config")
        files = component_weights(folder, stem, variant)
        with SafetensorsFiles(files) as f:
            modules[component] = load_component(component, config, f.source, device, dtype,
                                                os.path.join(path, component))
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"),
                          "scheduler config")
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      _tokenizer(path, None), scheduler, path)


def load_single_file(path, device, dtype, config=None, prediction_type=None):
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
        plan = ldm_to_diffusers(keys, family, configs["unet"], configs["vae"],
                                configs["text_encoder"])
        get = lambda key: f.source[key]()
        modules = {}
        for component in MODEL_CLASSES:
            source = {dkey: (lambda r=recipe: r.load(get)) for dkey, recipe in
                      plan[component].items()}
            modules[component] = load_component(component, configs[component], source, device,
                                                 dtype, f"{path} ({component})")
    pad = "!" if family == "sd2" else "<|endoftext|>"
    return Components(modules["text_encoder"], modules["unet"], modules["vae"],
                      _tokenizer(config, pad), configs["scheduler"], path)


def load(path, device, dtype, variant=None, config=None, prediction_type=None):
    """Either layout, told apart by the path: a folder or a ``.safetensors`` file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise SdrtError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
        return load_single_file(path, device, dtype, config, prediction_type)
    if path.endswith(PICKLE_SUFFIXES + (".safetensors",)) and not os.path.exists(path):
        raise SdrtError(f"model file {path} does not exist")
    components = load_folder(path, device, dtype, variant)
    if prediction_type is not None:
        components.scheduler_config = {**components.scheduler_config,
                                       "prediction_type": prediction_type}
    return components
