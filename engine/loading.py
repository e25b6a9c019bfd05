"""Building the text encoder, UNet and VAE from a diffusers folder or a single-file checkpoint."""
import os
from dataclasses import dataclass, field

import torch

from . import families
from .clip import CLIPTextModel, TextConfig, checkpoint_rename, text_model_class
from .errors import PICKLE_SUFFIXES, SdrtError
from .families import SD1, TEXT_ENCODERS, TOKENIZERS, Family
from .memory import check_model_fits
from .request import ZERO_SNR, Limits
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import (SafetensorsFiles, component_weights, load_parameters,
                      read_json, refuse_pickle)

MODEL_CLASSES = {
    "unet": (UNet2DConditionModel, UNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "text_encoder": (CLIPTextModel, TextConfig),
    "text_encoder_2": (CLIPTextModel, TextConfig),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}


@dataclass
class Components:
    """What a pipeline runs: the networks, the tokenizers and the scheduler config dict. A
    family without a first text encoder (the SDXL refiner) has ``text_encoder`` and
    ``tokenizer`` None; SD 1.x/2.x have no ``text_encoder_2``."""
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: object
    scheduler_config: dict
    source: str
    text_encoder_2: CLIPTextModel | None = None
    tokenizer_2: object = None
    family: Family = SD1
    model_index: dict = field(default_factory=dict)  # diffusers' pipeline options

    def networks(self) -> dict:
        """The family's networks by component name."""
        return {c: getattr(self, c) for c in ("unet", "vae", *self.family.text_encoders)}


def parse_config(component, config_dict, where=None):
    """The checked config object of one component, from its diffusers config dict."""
    try:
        return MODEL_CLASSES[component][1].from_dict(config_dict)
    except SdrtError as e:
        raise SdrtError(f"{where}: {e}" if where else str(e)) from None


def check_compatible(configs, where, tokenizers=None, family=None):
    """The networks (checked configs by component) and the tokenizers (by component) fit
    together: the UNet attends to the text encoders' states (concatenated), denoises the VAE's
    latents, and (SDXL) takes the pooled embedding and the family's micro-conditioning."""
    unet, vae = configs["unet"], configs["vae"]
    texts = [c for c in TEXT_ENCODERS if c in configs]
    width = sum(configs[c].hidden_size for c in texts)
    what = " + ".join(f"{c} config hidden_size ({configs[c].hidden_size})" for c in texts)
    latent = vae.latent_channels
    # An inpainting UNet also takes the mask and the masked image's latents.
    inpainting = unet.in_channels == 2 * latent + 1
    pairs = [("unet", "cross_attention_dim", unet.cross_attention_dim, what, width),
             ("unet", "in_channels", unet.in_channels,
              f"vae config latent_channels ({latent}) or, for an inpainting UNet, "
              f"{2 * latent + 1} (the latents, a mask and the masked image's latents)",
              2 * latent + 1 if inpainting else latent),
             ("unet", "out_channels", unet.out_channels,
              f"vae config latent_channels ({vae.latent_channels})", vae.latent_channels)]
    if family is not None and family.pooled is not None:
        pooled = configs[family.pooled]
        if not pooled.with_projection:
            raise SdrtError(f"{where}: {family.pooled} must be a CLIPTextModelWithProjection "
                            f"(an {family.label} model's pooled text embedding is projected); "
                            f"its config's architectures do not name it")
        time_width = unet.addition_time_embed_dim * family.num_time_ids
        pairs.append(("unet", "projection_class_embeddings_input_dim",
                      unet.projection_class_embeddings_input_dim,
                      f"{family.pooled} config projection_dim ({pooled.projection_dim}) + "
                      f"{family.num_time_ids} time ids × unet config addition_time_embed_dim "
                      f"({unet.addition_time_embed_dim})",
                      (pooled.projection_dim or 0) + time_width))
    for a, key_a, value_a, b, value_b in pairs:
        if value_a != value_b:
            total = f" = {value_b}" if "+" in b else ""  # a sum is worked out
            raise SdrtError(f"{where}: {a} config {key_a} must equal {b}{total}, got {value_a}")
    for component, tokenizer in (tokenizers or {}).items():
        text = configs[component]
        if tokenizer.max_length > text.max_position_embeddings:
            raise SdrtError(f"{where}: {component} config max_position_embeddings must be at "
                            f"least the tokenizer's {tokenizer.max_length} tokens, got "
                            f"{text.max_position_embeddings}")
        if tokenizer.vocab_size > text.vocab_size:
            raise SdrtError(f"{where}: {component} config vocab_size must be at least the "
                            f"tokenizer's {tokenizer.vocab_size}, got {text.vocab_size}")


def parse_configs(config_dicts, device, dtype, where, limits=None, family=None):
    """Every component's config checked, the networks checked together, and the model's size
    (counted from the configs) checked against ``limits`` and the device's memory, all before
    anything is built. Returns the config objects by component."""
    configs = {c: parse_config(c, d, where(c)) for c, d in config_dicts.items()
               if c in MODEL_CLASSES}
    check_compatible(configs, where(None), family=family)
    check_model_fits(configs, dtype, device, Limits.from_env() if limits is None else limits,
                     where(None))
    return configs


def build(component, config, device="meta", where=None):
    """One of our modules from its config (a diffusers config dict or a checked config
    object), with uninitialised parameters."""
    config_cls = MODEL_CLASSES[component][1]
    if not isinstance(config, config_cls):
        config = parse_config(component, config, where)
    model_cls = text_model_class(config) if component in TEXT_ENCODERS else \
        MODEL_CLASSES[component][0]
    try:
        with torch.device(device):
            return model_cls(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # The config checks should leave nothing for this; if one slips through, it still
        # ends as one line naming the component.
        raise SdrtError(f"{where or component}: the {component} config does not describe a "
                        f"model sdrt can build ({type(e).__name__}: {e})") from None


def load_component(component, config, source, device, dtype, where):
    module = build(component, config, where=where)
    rename = checkpoint_rename(list(source)) if component in TEXT_ENCODERS else None
    return load_parameters(module, source, device, dtype, where, rename)


def _tokenizer(folder, name, pad_token):
    """The tokenizer in ``folder/name`` where there is one, else the bundled CLIP vocabulary
    padded with ``pad_token``."""
    from .tokenizer import ClipTokenizer
    if folder is not None and os.path.isdir(os.path.join(folder, name)):
        return ClipTokenizer.from_folder(os.path.join(folder, name))
    return ClipTokenizer.bundled(pad_token=pad_token)


def family_tokenizers(folder, family, pad_tokens=None):
    """``{"tokenizer": ..., "tokenizer_2": ...}`` as ``family`` has them: each from ``folder``
    (a diffusers folder or None) where it holds one, else the bundled CLIP vocabulary padded
    with ``pad_tokens[name]`` where that is given and not None, else the family's own pad
    token."""
    pad_tokens = pad_tokens or {}
    return {name: _tokenizer(folder, name, pad_tokens.get(name) or default)
            for name, default in zip(family.tokenizers, family.pad_tokens)}


def _present(model_index, folder):
    """The components a diffusers folder holds: those model_index.json names with a class
    (``[null, null]`` marks one the pipeline runs without), or, for an index that does not
    list them, the subfolders that exist."""
    listed = {k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, list)}
    if listed:
        return {k for k in listed if model_index[k][0] is not None}
    return {c for c in (*MODEL_CLASSES, *TOKENIZERS, "scheduler")
            if os.path.isdir(os.path.join(folder, c))}


def _check_folder(path):
    if not os.path.exists(path):
        raise SdrtError(f"model path {path} does not exist")
    if not os.path.isdir(path):
        raise SdrtError(f"model path {path} is neither a folder nor a .safetensors file")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SdrtError(f"{path} is not a diffusers model folder: model_index.json is missing")


def load_folder(path, device, dtype, variant=None, limits=None):
    """A diffusers-format folder: model_index.json, unet/, vae/, the family's text encoders
    and tokenizers (text_encoder/, tokenizer/ and, for SDXL, text_encoder_2/, tokenizer_2/),
    scheduler/."""
    _check_folder(path)
    model_index = read_json(os.path.join(path, "model_index.json"), "model index")
    present = _present(model_index, path)
    where = lambda c: os.path.join(path, c) if c else path
    texts = {c: read_json(os.path.join(path, c, "config.json"), f"{c} config")
             for c in TEXT_ENCODERS if c in present}
    unet = read_json(os.path.join(path, "unet", "config.json"), "unet config")
    family = families.recognise(unet, texts, model_index, path)
    for component, tokenizer in zip(family.text_encoders, family.tokenizers):
        folder = os.path.join(path, tokenizer)
        if not (os.path.isfile(os.path.join(folder, "vocab.json"))
                or os.path.isfile(os.path.join(folder, "tokenizer.json"))):
            raise SdrtError(f"{os.path.join(folder, 'vocab.json')} is missing")
    if not os.path.isfile(os.path.join(path, "scheduler", "scheduler_config.json")):
        raise SdrtError(f"{os.path.join(path, 'scheduler', 'scheduler_config.json')} is missing")
    config_dicts = {"unet": unet,
                    "vae": read_json(os.path.join(path, "vae", "config.json"), "vae config"),
                    **{c: texts[c] for c in family.text_encoders}}
    configs = parse_configs(config_dicts, device, dtype, where, limits, family)
    modules = {}
    for component in config_dicts:
        folder = os.path.join(path, component)
        files = component_weights(folder, WEIGHT_STEMS[component], variant)
        with SafetensorsFiles(files) as f:
            modules[component] = load_component(component, configs[component], f.source,
                                                device, dtype, folder)
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"),
                          "scheduler config")
    tokenizers = family_tokenizers(path, family)
    return _components(modules, tokenizers, scheduler, path, family, model_index)


def _components(modules, tokenizers, scheduler, source, family, model_index):
    check_compatible({c: m.config for c, m in modules.items()}, source,
                     {c: tokenizers[t] for c, t in zip(family.text_encoders, family.tokenizers)},
                     family)
    return Components(modules.get("text_encoder"), modules["unet"], modules["vae"],
                      tokenizers.get("tokenizer"), scheduler, source,
                      modules.get("text_encoder_2"), tokenizers.get("tokenizer_2"), family,
                      model_index)


def single_file_configs(family, prediction_type, source):
    """The real configs of a single file's family, with the UNet's input channels read from
    its first convolution: an inpainting checkpoint's takes 9 (latents, mask, masked image).
    For SD 2.x, "epsilon" picks the 512-base configs over the 768-v ones; without a
    ``prediction_type`` the weights decide, as ComfyUI decides. An inpainting file is taken as
    epsilon unless told otherwise: every published one is (SD 1.5's, SD 2's 512 one,
    SDXL's)."""
    from .convert_ldm import UNET_PREFIX, family_configs
    if family == "sd2" and prediction_type is None and "v_pred" not in source:
        # ComfyUI's test: a v-prediction SD 2.x's last attention block has spread-out norm
        # biases (std > 0.09), an epsilon one's stay near 0 (without the key: 768-v)
        bias = f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
        if bias in source and float(source[bias]().float().std(unbiased=False)) <= 0.09:
            prediction_type = "epsilon"
    configs = family_configs(family, prediction_type)
    key = f"{UNET_PREFIX}input_blocks.0.0.weight"
    in_channels = source[key]().shape[1] if key in source else None
    if in_channels == 2 * configs["vae"]["latent_channels"] + 1:
        if prediction_type is None:
            configs = family_configs(family, "epsilon")
        configs["unet"]["in_channels"] = in_channels
    if not _edm_configs(configs, source, prediction_type):
        _v_prediction_marker(configs, source, prediction_type)
    return configs


def _edm_configs(configs, source, prediction_type):
    """An EDM-trained checkpoint says so by marker tensors, as ComfyUI reads them:
    ``edm_mean``/``edm_std`` (Playground v2.5: its EDM scheduler, the latents standardised by
    those per-channel statistics at scaling factor 0.5) or ``edm_vpred.sigma_max`` (and
    ``edm_vpred.sigma_min``: EDM v-prediction, CosXL's kind, sigma_data 1). Without them the
    file would run as the plain family, a picture of noise. Whether it was marked."""
    from .configs import PLAYGROUND_SCHEDULER
    if "edm_mean" in source and "edm_std" in source:
        mean, std = (source[k]().float().flatten().tolist() for k in ("edm_mean", "edm_std"))
        configs["vae"].update(scaling_factor=0.5, latents_mean=mean, latents_std=std)
        configs["scheduler"] = dict(PLAYGROUND_SCHEDULER)
    elif "edm_vpred.sigma_max" in source:
        sigma_min = (float(source["edm_vpred.sigma_min"]()) if "edm_vpred.sigma_min" in source
                     else 0.002)
        configs["scheduler"] = {"_class_name": "EDMEulerScheduler", "sigma_data": 1.0,
                                "prediction_type": "v_prediction", "sigma_min": sigma_min,
                                "sigma_max": float(source["edm_vpred.sigma_max"]())}
    else:
        return False
    if prediction_type is not None:
        configs["scheduler"]["prediction_type"] = prediction_type
    return True


def _v_prediction_marker(configs, source, prediction_type):
    """A v-prediction fine-tune of a family trained on noise says so by a marker tensor, as
    ComfyUI (and A1111) read it: ``v_pred`` (NoobAI-XL V-Pred's kind), and beside it
    ``ztsnr`` for a zero-terminal-SNR schedule (diffusers' ``rescale_betas_zero_snr``, with
    trailing timesteps so that the first step starts from pure noise, as ComfyUI's zsnr
    sigmas do). An explicit ``prediction_type`` other than v-prediction drops the marker."""
    if "v_pred" not in source or prediction_type not in (None, "v_prediction"):
        return
    configs["scheduler"]["prediction_type"] = "v_prediction"
    if "ztsnr" in source:
        configs["scheduler"].update(ZERO_SNR)


def load_single_file(path, device, dtype, config=None, prediction_type=None, limits=None):
    """An original LDM/CompVis (SD 1.x/2.x) or SGM (SDXL base and refiner) checkpoint in one
    ``.safetensors`` file.

    The configs come from ``config`` (a diffusers folder, for non-standard sizes) or from the
    real configs of the family that the checkpoint's keys point to.
    """
    from .convert_ldm import detect_family, ldm_to_diffusers
    with SafetensorsFiles([path]) as f:
        keys = list(f.source)
        family = families.get(detect_family(keys))
        components = ("unet", "vae", *family.text_encoders)
        if config is not None:
            _check_folder(config)
            configs = {c: read_json(os.path.join(config, c, "config.json"), f"{c} config")
                       for c in components}
            configs["scheduler"] = read_json(
                os.path.join(config, "scheduler", "scheduler_config.json"), "scheduler config")
            configs["model_index"] = read_json(os.path.join(config, "model_index.json"),
                                               "model index")
            if prediction_type is not None:
                configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
            _v_prediction_marker(configs, f.source, prediction_type)  # (the file's own word)
        else:
            configs = single_file_configs(family.name, prediction_type, f.source)
        checked = parse_configs({c: configs[c] for c in components}, device, dtype,
                                lambda c: f"{path} ({c} config)" if c else path, limits, family)
        plan = ldm_to_diffusers(keys, family.name, {c: configs[c] for c in components})
        get = lambda key: f.source[key]()
        modules = {}
        for component in components:
            source = {dkey: (lambda r=recipe: r.load(get)) for dkey, recipe in
                      plan[component].items()}
            modules[component] = load_component(component, checked[component], source, device,
                                                 dtype, f"{path} ({component})")
    tokenizers = family_tokenizers(config, family)
    return _components(modules, tokenizers, configs["scheduler"], path, family,
                       configs.get("model_index", {}))


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


# The parameter names a VAE has in its own file: diffusers' layout and the original LDM one
# (a single-file checkpoint's VAE without its ``first_stage_model.`` prefix).
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae_file(path, vae):
    """A VAE on its own, as A1111's and ComfyUI's users download one
    (``vae-ft-mse-840000-ema-pruned.safetensors``, ``sdxl_vae.safetensors``): a
    ``.safetensors`` file in the original LDM layout (``decoder.up.0.block.0.conv1.weight``)
    or diffusers' (``decoder.up_blocks.0.resnets.0.conv1.weight``), or a diffusers VAE folder.
    Its weights replace those of ``vae`` (the model's, whose architecture it must have), in
    place, so that built static plans decode with them; nothing is replaced unless every
    weight is there with its shape. ``SdrtError`` naming the file otherwise."""
    import dataclasses

    from .convert_ldm import VAE_PREFIX, vae_plan
    path = os.fspath(path)
    file = os.path.join(path, "diffusion_pytorch_model.safetensors") if os.path.isdir(path) \
        else path
    refuse_pickle(file)
    if not file.endswith(".safetensors") or not os.path.isfile(file):
        raise SdrtError(f"VAE {path}: expected a .safetensors file or a diffusers VAE folder "
                        f"(its diffusion_pytorch_model.safetensors)")
    expected = vae.state_dict()
    with SafetensorsFiles([file]) as f:
        keys = [k for k in f.source if k.startswith(_VAE_ROOTS)]
        if not keys and any(k.startswith(VAE_PREFIX) for k in f.source):  # a whole checkpoint
            keys = [k for k in f.source if k.startswith(VAE_PREFIX)]
        if any(k.removeprefix(VAE_PREFIX).startswith(("encoder.down.", "decoder.up.",
                                                      "encoder.mid.", "decoder.mid."))
               for k in keys):
            stored = {VAE_PREFIX + k.removeprefix(VAE_PREFIX): k for k in keys}
            plan = vae_plan(list(stored), dataclasses.asdict(vae.config))
            source = {name: (lambda r=recipe: r.load(lambda key: f.source[stored[key]]()))
                      for name, recipe in plan.items()}
        else:
            source = {k: f.source[k] for k in keys}
        missing, unexpected = expected.keys() - source.keys(), source.keys() - expected.keys()
        if missing or unexpected:
            raise SdrtError(f"VAE {path} does not fit the model's VAE: "
                            f"{len(missing)} weights missing ({_few(missing)}), "
                            f"{len(unexpected)} unexpected ({_few(unexpected)})")
        tensors = {}
        for name, read in source.items():
            t = read()
            if tuple(t.shape) != tuple(expected[name].shape):
                raise SdrtError(f"VAE {path}: {name} has shape {tuple(t.shape)}, the model's "
                                f"VAE {tuple(expected[name].shape)} (another architecture)")
            tensors[name] = t
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t.to(expected[name].dtype))


def _few(names, limit=3):
    names = sorted(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") if names else "none"
