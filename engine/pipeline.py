"""Text-to-image, image-to-image and inpainting Stable Diffusion, in plain PyTorch over sdrt's
modules.

Semantics follow diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline /
StableDiffusionInpaintPipeline: the same ``latents`` (or the same seed on a CPU generator)
give the same image. One deliberate difference: with several init images and several images
per prompt, each init image serves its own prompt's images (diffusers' deprecated path cycles
the images instead).
"""
import copy
import dataclasses
import functools
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from . import comfy_prompt
from .conditioning import Conditioning, TextInputs, encode_text
from .control import ControlRequest, control_batch, control_scales, select
from .errors import SdrtError
from .given_states import given_states
from .output import ImageArray, ImageList
from .image_prompt import ImagePromptRequest
from .infotext import file_stem
from .ip_adapter import layer_scales
from .layers import set_seamless, use_conv_chooser
from .loading import Components, check_compatible, load
from .memory import check_request_fits, fused_attention, request_bytes
from .prompt_schedule import composable_parts, edited, editing_steps, text_at
from .prompt_schedule import schedule as schedule_prompt
from .prompt_syntax import WeightedIds, tokenize_prompts
from .request import (MAX_SEED, MICRO_CONDITIONING, GenerationRequest, Limits,
                      sampler_family, short_repr)
from .runtime import ModelSpec, StaticRuntime, StaticShape
from .samplers import (SchedulerConfig, brownian_noise, default_sampler, make_schedule,
                       sample)
from .schedules import with_eta
from .stages import (Control, blank_inpaint_conditioning, centred_noise, check_fused,
                     copy_generator, cpu_randn, guidance_embedding, guidance_rescaler, guided,
                     inpaint_conditioning, inpainting_unet, keep_unmasked, row_scales,
                     scale_latents, starts_from_noise, to_unit_images, vae_decode, vary_noise)

# What the masked latents start from when inpainting (A1111's "masked content" in latent
# space): the init image's, unit noise, or zeros.
MASKED_CONTENT = ("original", "latent_noise", "latent_nothing")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEVICES = "'cpu', 'cuda' or 'cuda:N'"
_SEAMLESS_WITH_VAE_TILES = ("seamless tiling cannot be combined with VAE tiling yet (each VAE "
                            "tile would wrap around itself, not the picture)")


def default_vae_dtype(family, dtype, force_upcast):
    """diffusers' choice of the dtype a VAE runs in: float32 for an fp16 pipeline of a family
    with pooled text (SDXL) whose VAE config sets ``force_upcast`` (SDXL's VAE overflows in
    fp16; a fixed VAE sets it false), else the pipeline's dtype."""
    upcast = family.pooled is not None and dtype == torch.float16 and force_upcast
    return torch.float32 if upcast else dtype


def _vae_dtype(value):
    """A ``vae_dtype`` ("fp32", "fp16", "bf16" or the torch dtype) as a torch dtype; None for
    None or "auto" (``default_vae_dtype``)."""
    if value is None or value == "auto":
        return None
    dtype = DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SdrtError(f"vae_dtype must be auto, fp32, fp16 or bf16 (or torch.float32, "
                        f"torch.float16, torch.bfloat16), got {short_repr(value)}")
    return dtype


def resolve_device(device=None, dtype=None):
    """(device, dtype): CUDA and fp16 when a GPU is there, else CPU and fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise SdrtError(f"device must be {_DEVICES}, got {short_repr(device)}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise SdrtError(f"device must be {_DEVICES}, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise SdrtError(f"device must be {_DEVICES}, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SdrtError("device cuda was asked for, but no CUDA GPU is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SdrtError(f"device must be a CUDA device from cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}, got {device!r}")
    if dtype is None:
        dtype = torch.float16 if parsed.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SdrtError(f"dtype must be fp32, fp16 or bf16 (or torch.float32, torch.float16, "
                        f"torch.bfloat16), got {short_repr(dtype)}")
    return parsed, dtype


# The largest magnitude given latents (unit noise) may hold: far past any Gaussian draw, far
# below what overflows once scaled by the first sigma (fp16's 65504).
MAX_LATENT = 1e3


def _conv_cache_file():
    """Where the conv chooser keeps its per-shape decisions between processes (keyed inside by
    GPU, versions and shape): ``$SDRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdrt``, else
    ``~/.cache/sdrt``."""
    root = os.environ.get("SDRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdrt")
    return os.path.join(root, "conv_paths.json")


def _image_tensor(item, field="image"):
    """One init (or control) image, or a batch → float32 (B, 3, H, W) in [0, 1] on the CPU."""
    from PIL import Image

    from .images import pil_to_float
    # Contiguous (B, 3, H, W), whatever the source's layout: a channels-last view would
    # run the VAE's convolutions in another order and round differently.
    if isinstance(item, Image.Image):
        return torch.from_numpy(pil_to_float(item)).permute(2, 0, 1)[None].contiguous()
    if isinstance(item, np.ndarray):
        what, layout, floating = "array", "(H, W, 3) or (B, H, W, 3)", \
            np.issubdtype(item.dtype, np.floating)
        shape_ok = item.ndim in (3, 4) and item.shape[-1] == 3
    elif isinstance(item, torch.Tensor):
        what, layout, floating = "tensor", "(3, H, W) or (B, 3, H, W)", \
            item.is_floating_point()
        shape_ok = item.dim() in (3, 4) and item.shape[-3] == 3
    else:
        raise SdrtError(f"{field} must be a PIL image, a float array (H, W, 3) or a float "
                        f"tensor (B, 3, H, W) in [0, 1], or a list of them, got "
                        f"{type(item).__name__}")
    _check_layout(item, f"{'an image' if field == 'image' else field} {what}", layout, shape_ok,
                  floating)
    if what == "array":
        t = torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
        t = t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2)
    else:
        t = item.detach().to("cpu", torch.float32)
        t = t.reshape(-1, *t.shape[-3:])
    return _unit_range(t, field).contiguous()


def _check_layout(item, what, layout, shape_ok, floating):
    """An array or tensor input is of an allowed ``layout``, not empty, and holds floats (in
    memory: not a meta tensor)."""
    if not shape_ok:
        raise SdrtError(f"{what} must be {layout}, got shape {tuple(item.shape)}")
    if 0 in item.shape:
        raise SdrtError(f"{what} must have no empty side, got shape {tuple(item.shape)}")
    if isinstance(item, torch.Tensor) and item.is_meta:
        raise SdrtError(f"{what} must hold its values (a tensor on a device), got a meta "
                        f"tensor")
    if not floating:
        raise SdrtError(f"{what} must hold floats in [0, 1], got dtype {item.dtype} (divide "
                        f"by 255, or pass a PIL image)")


def _unit_range(t, field):
    """``t``, checked to hold finite values in [0, 1]."""
    if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
        finite = t[torch.isfinite(t)]
        span = (f"values from {finite.min().item():.4g} to {finite.max().item():.4g}"
                if finite.numel() else "no finite value")
        bad = t.numel() - finite.numel()
        raise SdrtError(f"{field} values must be finite and in [0, 1], got {span}"
                        f"{f' and {bad} inf/NaN' if bad else ''}")
    return t


def _mask_tensor(item, field="mask_image"):
    """One inpainting mask (or batch; or another mask, ``field``) → float32 (B, 1, H, W) in
    [0, 1] on the CPU: a PIL image (made greyscale, as diffusers does), a float array (H, W)
    or (B, H, W), or channels-last with one channel or three (RGB, made greyscale), or a
    float tensor (H, W), (1, H, W) or (B, 1, H, W)."""
    from PIL import Image
    if isinstance(item, Image.Image):
        t = torch.from_numpy(np.asarray(item.convert("L"), dtype=np.float32) / 255.0)
        return t[None, None].contiguous()
    if isinstance(item, np.ndarray):
        what, floating = "array", np.issubdtype(item.dtype, np.floating)
        shape_ok = item.ndim in (2, 3, 4) and (item.ndim < 4 or item.shape[-1] in (1, 3))
        layout = "(H, W), (B, H, W), or (H, W, C) or (B, H, W, C) with C 1 or 3"
        if shape_ok and floating and item.ndim > 2 and item.shape[-1] in (1, 3):
            # Channels last: grey, or RGB weighted as PIL makes an image greyscale.
            item = (item[..., 0] if item.shape[-1] == 1 else
                    item.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    elif isinstance(item, torch.Tensor):
        what, floating = "tensor", item.is_floating_point()
        shape_ok = item.dim() == 2 or (item.dim() in (3, 4) and item.shape[-3] == 1)
        layout = "(H, W), (1, H, W) or (B, 1, H, W)"
    else:
        raise SdrtError(f"{field} must be a PIL image, a float array (H, W) or a float "
                        f"tensor (B, 1, H, W) in [0, 1], or a list of them, got "
                        f"{type(item).__name__}")
    _check_layout(item, f"a {field} {what}", layout, shape_ok, floating)
    t = (torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32)) if what == "array"
         else item.detach().to("cpu", torch.float32))
    return _unit_range(t.reshape(-1, 1, *t.shape[-2:]), field).contiguous()


@dataclasses.dataclass
class _Start:
    """Where a request's denoising starts (``Pipeline._start``)."""
    x0: torch.Tensor  # image to image: the init image's scaled latents (batch rows); or None
    noise: torch.Tensor
    mask: torch.Tensor  # inpainting with a UNet that sees no mask: (B, 1, h, w); or None
    image_cond: torch.Tensor  # an inpainting UNet's mask and masked-image latents; or None
    pure_noise: bool  # text to image, or inpainting at full strength

    @property
    def masked(self):
        return self.mask is not None or self.image_cond is not None


class Pipeline:
    """``Pipeline.from_pretrained(path)(prompt)`` → images.

    ``pipe.limits`` (a ``Limits``; default ``Limits.from_env()``) bounds what a call may ask
    for, and ``pipe.last_seed`` / ``pipe.num_timesteps`` describe the last call.
    """

    def __init__(self, components: Components, device, dtype, limits: Limits = None,
                 vae_dtype=None):
        device, dtype = resolve_device(device, dtype)
        self.vae_dtype = _vae_dtype(vae_dtype)
        self.family = components.family
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.unet = components.unet
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.scheduler_config = SchedulerConfig.from_dict(components.scheduler_config)
        self.source = components.source
        self.model_index = dict(components.model_index)
        check_compatible({c: m.config for c, m in components.networks().items()}, self.source,
                         {c: getattr(self, t) for c, t in zip(self.family.text_encoders,
                                                              self.family.tokenizers)},
                         self.family)
        # diffusers' SDXL pipelines: an absent negative prompt is zeros, not the empty prompt's
        # states (unless the model's index says otherwise, as the refiner's does).
        self.force_zeros_for_empty_prompt = bool(self.model_index.get(
            "force_zeros_for_empty_prompt", self.family.pooled is not None))
        self.device, self.dtype = device, dtype
        self.limits = Limits.from_env() if limits is None else limits
        self.vae_scale_factor = self.vae.config.scale_factor
        self.timings = {}
        self.last_seed = None
        self.last_subseed = None  # a variation seed's (subseed_strength > 0), else None
        self.num_timesteps = None  # denoising steps of the current (or last) call
        self.runtime = None  # set by compile()
        # Copies of the VAE in other dtypes (dtype → module), made when first needed: float32
        # for an upcast SDXL VAE or after a low-precision decode that overflows, and the
        # ``vae_dtype`` asked for.
        self._vae_copies = {}
        self._loras = None  # a LoraManager, made by the first LoRA call
        self._embeddings = {}  # token -> {text encoder: (n, D) float32 CPU}, load_textual_inversion
        self._controlnets = {}  # name -> ControlNetModel, load_controlnet (in load order)
        # name -> (IPAdapter, its image encoder's path), load_ip_adapter (in load order), and
        # the image encoders by path (one module for every adapter that reads it).
        self._ip_adapters = {}
        self._image_encoders = {}
        if device.type == "cuda":
            # Time the fused GroupNorm+SiLU conv against group_norm + cuDNN once per shape and
            # keep the faster, so no shape gets slower than the unfused path. (Networks run by
            # another runtime, such as onnxruntime, are not sdrt modules and have no convs.)
            from sdrt.kernels.conv_autotune import ConvPathChooser
            self.conv_chooser = ConvPathChooser(cache_file=_conv_cache_file())
            for model in (self.unet, self.vae):
                if isinstance(model, nn.Module):
                    use_conv_chooser(model, self.conv_chooser)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, variant=None, config=None,
                        prediction_type=None, limits: Limits = None, vae_dtype=None,
                        torch_dtype=None):
        """Load a diffusers folder or a single-file ``.safetensors`` checkpoint (LDM layout for
        SD 1.x/2.x, SGM layout for SDXL base and refiner).

        ``variant="fp16"`` prefers ``*.fp16.safetensors`` files. For a single file, ``config``
        may name a diffusers folder whose configs (and tokenizer) to use. ``prediction_type``
        overrides the scheduler's (for an SD 2.x single file, ``"epsilon"`` also selects the
        512-base configs). Every config value is checked, and the model's size (counted from
        the configs) is checked against ``limits.max_parameters`` and the device's memory,
        before anything is built.

        ``vae_dtype`` ("fp32", "fp16", "bf16" or a torch dtype; None or "auto": diffusers'
        choice) is the dtype the VAE encodes and decodes in. diffusers' choice is float32 for
        an fp16 SDXL pipeline whose VAE sets ``force_upcast`` (SDXL's VAE overflows in fp16),
        else the pipeline's dtype; bf16 has float32's range at half its bytes.

        ``torch_dtype`` is diffusers' name for ``dtype``.
        """
        if torch_dtype is not None:
            if dtype is not None:
                raise SdrtError("dtype and torch_dtype cannot both be given (the same "
                                "argument, sdrt's and diffusers' names)")
            dtype = torch_dtype
        device, dtype = resolve_device(device, dtype)
        vae_dtype = _vae_dtype(vae_dtype)  # refused before anything is loaded
        limits = Limits.from_env() if limits is None else limits
        return cls(load(path, device, dtype, variant, config, prediction_type, limits), device,
                   dtype, limits, vae_dtype)

    def compile(self, height=None, width=None, batch_size=1, num_inference_steps=50,
                sampler=None, guidance=True, strict=False, max_shapes=4, num_chunks=1,
                strength=None, masked=False, controlnet=None, guess_mode=False,
                control_masks=False, ip_adapter=None, ip_adapter_images=1,
                ip_adapter_masks=False, prompt_syntax="a1111", pag_scale=0.0,
                guidance_rescale=0.0, guidance_rescale_style="diffusers", eta=0.0):
        """Build the static plan (buffers, schedule, CUDA graphs on a GPU) for one shape.

        ``num_chunks``: the prompts' number of 77-token chunks (A1111 syntax: a prompt past
        75 tokens, or with ``BREAK``, takes more than one). ``strength``: a plan for image to
        image at that strength (the init image is encoded before the replay); with
        ``masked=True``, for inpainting. ``controlnet`` and ``guess_mode``: the ControlNets
        it runs, with region masks where ``control_masks`` (one bool, or one per net) is
        True (``control_mask``); ``ip_adapter``: the IP-Adapters it runs (a loaded one's
        name or a list), with ``ip_adapter_images`` reference images each (one number, or one
        per adapter), regional where ``ip_adapter_masks`` (one bool, or one per adapter) is
        True (a mask per image: ``ip_adapter_mask``). ``prompt_syntax``: the calls' (ComfyUI's,
        "comfy", weighs the text states its own way, in a plan of its own); ``pag_scale``: the
        calls' perturbed-attention guidance (a plan per scale); ``guidance_rescale`` and
        ``guidance_rescale_style``: their rescale of the guidance (a plan per pair);
        ``eta``: DDIM's (a plan per value; the step noise is drawn before the replay).

        From then on, calls run through static plans (all but ``clip_skip`` and a refiner's
        part of the schedule): a call of a shape that was built replays it; any other shape
        is built on the spot and cached (at most ``max_shapes``, least recently used
        dropped), or, with ``strict=True``, refused with ``SdrtError``. Returns the plan (its
        ``build_seconds`` says what the build cost).
        """
        if not isinstance(masked, bool) or (masked and strength is None):
            raise SdrtError(f"masked must be True (with a strength) or False, got {masked!r}")
        request = GenerationRequest(
            prompt="", height=height, width=width, num_inference_steps=num_inference_steps,
            sampler=sampler, num_images_per_prompt=batch_size,
            guidance_scale=7.5 if guidance else 1.0, has_image=strength is not None,
            strength=0.8 if strength is None else strength, prompt_syntax=prompt_syntax,
            pag_scale=pag_scale, guidance_rescale=guidance_rescale,
            guidance_rescale_style=guidance_rescale_style,
        ).check(names={"num_images_per_prompt": "batch_size"}, limits=self.limits)
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or \
                not 1 <= num_chunks <= 64:
            raise SdrtError(f"num_chunks must be an integer from 1 to 64, got {num_chunks!r}")
        controls = () if controlnet is None else select(self._controlnets, controlnet)
        if not isinstance(guess_mode, bool) or (guess_mode and not controls):
            raise SdrtError(f"guess_mode must be False, or True with controlnet (the "
                            f"ControlNets the plan runs), got {short_repr(guess_mode)}")
        request = self.check(request, names={"num_images_per_prompt": "batch_size"},
                             num_chunks=num_chunks, controlled=bool(controls))
        _check_eta(eta, request.sampler)
        if control_masks is not False and not controls:
            raise SdrtError("control_masks was given without controlnet (the ControlNets the "
                            "plan runs)")
        flags = (control_masks if isinstance(control_masks, (list, tuple))
                 else [control_masks] * len(controls))
        if len(flags) != len(controls) or not all(isinstance(f, bool) for f in flags):
            raise SdrtError(f"control_masks must be True, False or a list of {len(controls)} of "
                            f"them, got {short_repr(control_masks)}")
        images, regions = self._compiled_image_prompts(ip_adapter, ip_adapter_images,
                                                       ip_adapter_masks)
        if self.runtime is None:
            self.runtime = StaticRuntime(self.model_spec(), max_shapes=max_shapes, strict=strict)
        else:
            self.runtime.configure(max_shapes=max_shapes, strict=strict)
        return self.runtime.build(self._shape(request, num_chunks, masked, controls, guess_mode,
                                              images, image_regions=regions,
                                              control_masks=tuple(flags) if any(flags) else (),
                                              eta=eta),
                                  self.scheduler_config)

    def _compiled_image_prompts(self, names, counts, masked):
        """``StaticShape.image_prompts`` and ``image_regions`` of ``compile``'s IP-Adapters,
        attached to the UNet (the plan captures their weights); ((), ()) without."""
        from .image_prompt import MAX_IMAGES
        from .ip_adapter import attach, tokens_per_image
        if names is None:
            if masked is not False:
                raise SdrtError("ip_adapter_masks was given without ip_adapter (the "
                                "IP-Adapters the plan runs)")
            return (), ()
        names = select(self._ip_adapters, names, "ip_adapter", "IP-Adapter")
        given = counts
        counts = counts if isinstance(counts, (list, tuple)) else [counts] * len(names)
        if len(counts) != len(names) or not all(
                type(c) is int and 1 <= c <= MAX_IMAGES for c in counts):
            raise SdrtError(f"ip_adapter_images must be an integer from 1 to {MAX_IMAGES} or a "
                            f"list of {len(names)}, got {short_repr(given)}")
        flags = masked if isinstance(masked, (list, tuple)) else [masked] * len(names)
        if len(flags) != len(names) or not all(isinstance(f, bool) for f in flags):
            raise SdrtError(f"ip_adapter_masks must be True, False or a list of {len(names)} "
                            f"of them, got {short_repr(masked)}")
        adapters = [self._ip_adapters[n][0] for n in names]
        attach(self.unet, adapters)
        images = tuple((n, c * tokens_per_image(a.config, self._image_encoders[
            self._ip_adapters[n][1]].config)) for n, a, c in zip(names, adapters, counts))
        return images, (tuple(c if f else 0 for c, f in zip(counts, flags)) if any(flags)
                        else ())

    def model_spec(self) -> ModelSpec:
        """The family and networks a static plan runs (the plan holds no pipeline)."""
        vae_dtype = self.vae_run_dtype()
        return ModelSpec(self.family, self.text_encoders, self.unet, self._vae_in(vae_dtype),
                         self.device, self.dtype,
                         self.tokenizers[self.family.tokenizers[0]].max_length, vae_dtype,
                         self._controlnets)

    @property
    def text_encoders(self) -> dict:
        """The family's text encoders by component name, in concatenation order."""
        return {c: getattr(self, c) for c in self.family.text_encoders}

    @property
    def tokenizers(self) -> dict:
        return {t: getattr(self, t) for t in self.family.tokenizers}

    # -- textual inversion ---------------------------------------------------------------------

    @property
    def embeddings(self) -> dict:
        """``{token: number of vectors}`` of the loaded textual-inversion embeddings."""
        return {token: len(next(iter(rows.values()))) for token, rows in self._embeddings.items()}

    def load_textual_inversion(self, path_or_state_dict, token=None):
        """Load a textual-inversion embedding: for SD 1.x/2.x an A1111 ``.safetensors`` with
        ``emb_params`` or ``string_to_param``, a diffusers ``learned_embeds.safetensors``, or
        such a state dict; for SDXL an A1111/civitai file with ``clip_l`` and ``clip_g``
        vectors (see ``sdrt.engine.embeddings``). Its token (``token``; by default the file's stem, a
        diffusers file's own token) then stands for its vectors in prompts of both syntaxes,
        as in diffusers' ``load_textual_inversion`` (an n-vector embedding adds ``token``,
        ``token_1``, ... ``token_{n-1}``; a prompt writes ``token``). SDXL: every tokenizer gets
        the same new tokens and ids, and each text encoder its own rows (``clip_l`` for
        text_encoder, ``clip_g`` for text_encoder_2), as diffusers' ``load_textual_inversion``
        called once per text encoder. Loading the same token again is a no-op with the same
        vectors, refused with others. The vocabulary grows, so the text encoders' token tables
        are new tensors and the built static plans are dropped (``compile`` again). Returns
        the token."""
        from .embeddings import add_embedding
        encoders = self.text_encoders
        if not all(isinstance(m, nn.Module) for m in encoders.values()):
            raise SdrtError("textual inversion extends sdrt's own text encoders; these run in "
                            "another runtime (export the model with --embedding instead)")
        tokenizers = {t: getattr(self, t) for t in self.family.tokenizers}
        token = add_embedding(tokenizers, encoders, self.family, path_or_state_dict, token,
                              self._embeddings)
        # A static plan captured the old token table's storage (and its CUDA graph its address).
        self.runtime = None
        return token

    # -- FreeU --------------------------------------------------------------------------------

    def enable_freeu(self, s1, s2, b1, b2, style="diffusers"):
        """FreeU on the UNet's up path (``engine/freeu.py``): backbone factors ``b1``, ``b2``
        and skip factors ``s1``, ``s2`` (0 to 10), where ``style`` says: "diffusers" (as
        diffusers' ``enable_freeu``, the same argument order), "comfy" (ComfyUI's FreeU node) or
        "comfy_v2" (its FreeU_V2). Static plans are built per setting."""
        from .freeu import FreeU
        if not isinstance(self.unet, nn.Module):
            raise SdrtError("FreeU changes sdrt's own UNet; this one runs in another runtime")
        self.unet.freeu = FreeU(b1, b2, s1, s2, style)

    def disable_freeu(self):
        if isinstance(self.unet, nn.Module):
            self.unet.freeu = None

    def to(self, device=None, dtype=None, torch_dtype=None):
        """diffusers' ``pipe.to("cuda")``: the pipeline itself where it already is on that
        device (and dtype). sdrt loads weights straight onto their device and dtype (a copy
        elsewhere would hold every network twice on the way), so another is refused, naming
        ``from_pretrained``'s arguments."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        dtype = torch_dtype if dtype is None else dtype
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        try:
            want = torch.device(device) if device is not None else self.device
        except (RuntimeError, ValueError, TypeError):
            raise SdrtError(f"Pipeline.to: device must be {_DEVICES}, got "
                            f"{short_repr(device)}") from None
        same = want.type == self.device.type and want.index in (None, self.device.index)
        if not same or (dtype is not None and dtype != self.dtype):
            raise SdrtError(f"Pipeline.to: this pipeline was loaded on {self.device} in "
                            f"{self.dtype}; sdrt loads weights straight where they run: "
                            f"load it with from_pretrained(..., device={str(want)!r}, "
                            f"dtype={dtype or self.dtype})")
        return self

    # -- the scheduler config -------------------------------------------------------------------

    def set_scheduler_config(self, **fields):
        """Replace fields of the model's scheduler config, as diffusers'
        ``XScheduler.from_config(pipe.scheduler.config, **fields)`` does: e.g.
        ``prediction_type="v_prediction"``, or a zero-terminal-SNR schedule with
        ``rescale_betas_zero_snr=True, timestep_spacing="trailing"``. Checked as a
        ``scheduler_config.json`` is; a static plan of the old config is rebuilt when next
        used."""
        current = {f.name: getattr(self.scheduler_config, f.name)
                   for f in dataclasses.fields(self.scheduler_config)}
        unknown = sorted(set(fields) - set(current) - {"class_name"})
        if unknown:
            raise SdrtError(f"set_scheduler_config: {unknown[0]} is not a scheduler config "
                            f"field sdrt reads")
        current["_class_name"] = current.pop("class_name")
        if "class_name" in fields:
            fields["_class_name"] = fields.pop("class_name")
        self.scheduler_config = SchedulerConfig.from_dict({**current, **fields})

    # -- VAE tiling ---------------------------------------------------------------------------

    def enable_vae_tiling(self):
        """Encode and decode pictures past the VAE config's ``sample_size`` in overlapping
        tiles, blended as diffusers' ``enable_vae_tiling`` blends them (``vae.tiled``): less
        memory for large pictures, the same picture as diffusers' tiled one. Static plans are
        built per setting."""
        if not isinstance(self.vae, nn.Module):
            raise SdrtError("VAE tiling runs sdrt's own VAE; this one runs in another runtime")
        if self.seamless_tiling:
            raise SdrtError(_SEAMLESS_WITH_VAE_TILES)
        for vae in (self.vae, *self._vae_copies.values()):  # (a copy made later copies it)
            vae.tiling = True

    def disable_vae_tiling(self):
        for vae in (self.vae, *self._vae_copies.values()):
            if isinstance(vae, nn.Module):
                vae.tiling = False

    @property
    def vae_tiling(self):
        """Whether the VAE runs in tiles (``enable_vae_tiling``)."""
        return getattr(self.vae, "tiling", False)

    # -- seamless tiling ----------------------------------------------------------------------

    def enable_seamless_tiling(self):
        """A1111's "Tiling": every padded convolution of the UNet and the VAE wraps around,
        reading past a border from the opposite one (``padding_mode="circular"``, as A1111
        sets it), so that the images tile without seams, left to right and top to bottom. A
        ControlNet's or T2I-Adapter's convolutions keep zero padding, as A1111's do. Static
        plans are built per setting."""
        if not (isinstance(self.unet, nn.Module) and isinstance(self.vae, nn.Module)):
            raise SdrtError("seamless tiling changes sdrt's own UNet and VAE; these run in "
                            "another runtime")
        if self.vae_tiling:
            raise SdrtError(_SEAMLESS_WITH_VAE_TILES)
        self._set_seamless(True)

    def disable_seamless_tiling(self):
        if isinstance(self.unet, nn.Module) and isinstance(self.vae, nn.Module):
            self._set_seamless(False)

    def _set_seamless(self, on):
        for model in (self.unet, self.vae, *self._vae_copies.values()):
            set_seamless(model, on)

    @property
    def seamless_tiling(self):
        """Whether the images tile without seams (``enable_seamless_tiling``)."""
        return getattr(self.unet, "conv_in", None) is not None and \
            self.unet.conv_in.padding_mode == "circular"

    # -- ControlNet ----------------------------------------------------------------------------

    @property
    def controlnets(self) -> dict:
        """``{name: ControlNetModel}`` of the loaded ControlNets, in load order."""
        return dict(self._controlnets)

    def load_vae(self, path):
        """Decode and encode with the VAE in ``path`` instead of the model's own, as A1111's
        "SD VAE" setting does: a ``.safetensors`` file in the original or diffusers layout, or
        a diffusers VAE folder, of the model's VAE architecture (``loading.load_vae_file``); or
        a state dict of the VAE's own names (the model's own weights, kept to go back to).
        Its weights replace the VAE's in place: built static plans keep working."""
        from .loading import load_vae_file
        if isinstance(path, dict):
            self.vae.load_state_dict(path)
        else:
            load_vae_file(path, self.vae)
        for vae in self._vae_copies.values():  # (the copies run in other dtypes, in place too)
            vae.load_state_dict(self.vae.state_dict())

    def load_controlnet(self, path, name=None, variant=None):
        """Load a ControlNet for this model: a diffusers folder, or a ``.safetensors`` file in
        diffusers' names or the original ControlNet layout (A1111's and ComfyUI's files,
        built in this UNet's architecture); or a T2I-Adapter (``engine.adapter``) in the
        same forms, which calls then use as a ControlNet (as A1111 and ComfyUI load both).
        ``name`` (default: the file or folder name) is what calls pass as ``controlnet``;
        loading under a loaded name replaces that one. Returns the name.

        A UNet exported with ControlNets (``sdrt export onnx --controlnet``) runs those only:
        ``name``, else the stem of ``path`` (which need not exist), picks one of them."""
        from .control import load_control_net
        if not isinstance(path, (str, os.PathLike)):
            raise SdrtError(f"controlnet path must be a folder or a .safetensors file, got "
                            f"{short_repr(path)}")
        if name is None:
            name = file_stem(path)
        if not isinstance(name, str) or not name.strip():
            raise SdrtError(f"controlnet name must be a non-empty string, got {short_repr(name)}")
        if not isinstance(self.unet, nn.Module):
            net = self._fused_controlnet(path, name)
        else:
            net = load_control_net(path, self.unet.config, self.vae_scale_factor, self.device,
                                   self.dtype, variant)
        if self.device.type == "cuda" and isinstance(net, nn.Module):
            use_conv_chooser(net, self.conv_chooser)
        self._forget_controlnet(name)
        self._controlnets[name] = net
        return name

    def _fused_controlnet(self, path, name):
        """The ControlNet of a UNet run elsewhere (an ONNX export's) that ``name`` (else the
        stem of ``path``) names: such a UNet runs only the ControlNets it was exported with."""
        fused = getattr(self.unet, "controlnets", None)
        if not fused:
            raise SdrtError("ControlNets feed sdrt's own UNet; this one runs in another "
                            "runtime and was exported without ControlNets (export it with "
                            "--controlnet)")
        net = fused.get(name) or fused.get(file_stem(path))
        if net is None:
            raise SdrtError(f"controlnet {name!r} is not one the exported UNet runs (it runs "
                            f"{', '.join(fused)})")
        return net

    def unload_controlnet(self, name=None):
        """Remove ControlNet ``name`` (all when None)."""
        names = list(self._controlnets) if name is None else [name]
        for n in names:
            if n not in self._controlnets:
                raise SdrtError(f"controlnet {n!r} is not loaded (loaded: "
                                f"{', '.join(self._controlnets) or 'none'})")
            self._forget_controlnet(n)

    def _forget_controlnet(self, name):
        """Drop ControlNet ``name`` and the static plans that ran it."""
        self._controlnets.pop(name, None)
        if self.runtime is not None:
            self.runtime.drop(lambda shape: name in shape.controls)

    # -- IP-Adapter ----------------------------------------------------------------------------

    @property
    def ip_adapters(self) -> dict:
        """``{name: IPAdapter}`` of the loaded IP-Adapters, in load order."""
        return {name: adapter for name, (adapter, _) in self._ip_adapters.items()}

    def image_encoder(self, name):
        """The CLIP image encoder IP-Adapter ``name`` reads."""
        if name not in self._ip_adapters:
            raise SdrtError(f"ip_adapter {name!r} is not loaded (loaded: "
                            f"{', '.join(self._ip_adapters) or 'none'})")
        return self._image_encoders[self._ip_adapters[name][1]]

    def load_ip_adapter(self, path, image_encoder=None, name=None):
        """Load an IP-Adapter for this model: a ``.safetensors`` file in h94/IP-Adapter's
        layout (plain, plus, plus-face, full-face; ``engine.ip_adapter``) and the CLIP image
        encoder it reads: ``image_encoder``, a transformers folder or one ``.safetensors``
        file (ComfyUI's ``clip_vision``), by default the ``image_encoder`` folder beside the
        adapter (h94's layout, as diffusers' ``load_ip_adapter`` looks). ``name`` (default:
        the file name) is what calls pass as ``ip_adapter``; loading under a loaded name
        replaces that one. Returns the name."""
        from .clip_vision import load_image_encoder
        from .ip_adapter import check_encoder, check_fits, load_ip_adapter
        if not isinstance(self.unet, nn.Module):
            raise SdrtError("IP-Adapters feed sdrt's own UNet; this one runs in another runtime")
        for field, value in (("ip_adapter path", path), ("image_encoder", image_encoder)):
            if not isinstance(value, (str, os.PathLike)) and \
                    (value is not None or field == "ip_adapter path"):
                raise SdrtError(f"{field} must be a path, got {short_repr(value)}")
        path = os.fspath(path)
        name = file_stem(path) if name is None else name
        if not isinstance(name, str) or not name.strip():
            raise SdrtError(f"ip_adapter name must be a non-empty string, got {short_repr(name)}")
        adapter = load_ip_adapter(path, self.device, self.dtype)
        check_fits(adapter, self.unet, path)
        if image_encoder is None:
            image_encoder = os.path.join(os.path.dirname(os.path.abspath(path)), "image_encoder")
            if not os.path.isdir(image_encoder):
                raise SdrtError(f"{path}: no image_encoder folder beside it; pass image_encoder "
                                f"(the CLIP vision model it reads: a transformers folder or "
                                f"a .safetensors file)")
        key = os.path.realpath(os.fspath(image_encoder))
        encoder = self._image_encoders.get(key)
        if encoder is None:
            encoder = load_image_encoder(key, self.device, self.dtype)
        check_encoder(adapter, encoder, path)
        self._forget_ip_adapter(name)
        self._image_encoders[key] = encoder
        self._ip_adapters[name] = (adapter, key)
        return name

    def unload_ip_adapter(self, name=None):
        """Remove IP-Adapter ``name`` (all when None), and image encoders no longer read."""
        names = list(self._ip_adapters) if name is None else [name]
        for n in names:
            if n not in self._ip_adapters:
                raise SdrtError(f"ip_adapter {n!r} is not loaded (loaded: "
                                f"{', '.join(self._ip_adapters) or 'none'})")
            self._forget_ip_adapter(n)

    def _forget_ip_adapter(self, name):
        """Drop IP-Adapter ``name``, its encoder if no other reads it, the static plans that
        ran it, and every adapter's attention weights from the UNet (a request attaches its
        own)."""
        from .ip_adapter import attach
        self._ip_adapters.pop(name, None)
        used = {key for _, key in self._ip_adapters.values()}
        for key in [k for k in self._image_encoders if k not in used]:
            del self._image_encoders[key]
        attach(self.unet, [])
        if self.runtime is not None:
            self.runtime.drop(lambda shape: name in dict(shape.image_prompts))

    def _image_tokens(self, prompt, batch, cfg):
        """The image tokens of a request's IP-Adapters (``ImagePromptRequest``), in the
        pipeline's dtype, with the adapters' attention weights attached to the UNet."""
        from .image_prompt import image_tokens
        from .ip_adapter import attach
        adapters = [self._ip_adapters[n][0] for n in prompt.names]
        attach(self.unet, adapters)
        encoders = [self._image_encoders[self._ip_adapters[n][1]] for n in prompt.names]
        tokens = image_tokens(adapters, encoders, prompt, batch, cfg, self.device)
        return tuple(t.to(self.dtype) for t in tokens)

    def _image_scales(self, prompt, rows, calls):
        return prompt.scale_table(rows, calls).to(self.device, self.dtype)

    def _image_regions(self, prompt, request, rows):
        """The regional IP-Adapters' mask weights at the UNet's levels (``image_regions``), or
        None when no adapter has masks."""
        regions = prompt.regions((request.height, request.width), self._grids(request), rows)
        return tuple(r.to(self.device, self.dtype) for r in regions) or None

    # -- LoRA ----------------------------------------------------------------------------------

    @property
    def loras(self) -> dict:
        """``{name: scale}`` of the loaded LoRA adapters, in load order."""
        return {} if self._loras is None else self._loras.adapters

    def load_lora(self, path_or_state_dict, scale=1.0, name=None, replace=None):
        """Patch a LoRA (kohya/A1111 or diffusers/PEFT ``.safetensors``, or a state dict; for
        SDXL too) into the UNet and text-encoder weights in place, so static plans and their
        CUDA graphs stay valid with no rebuild. ``scale``: one number, or (the UNet's, the text
        encoders'). ``replace`` names a loaded LoRA to swap out in the same pass. Returns the
        adapter's name."""
        return self._lora_manager().load(path_or_state_dict, scale, name, replace)

    def set_lora_scale(self, name, scale):
        self._lora_manager().set_scale(name, scale)

    def unload_lora(self, name=None):
        """Remove LoRA ``name`` (all when None); the original weights come back bit for bit."""
        self._lora_manager().unload(name)

    def _lora_manager(self):
        if self._loras is None:
            modules = {"unet": self.unet, **self.text_encoders}
            if not all(isinstance(m, nn.Module) for m in modules.values()):
                raise SdrtError("LoRAs patch sdrt's own networks; these run in another runtime "
                                "(merge the LoRA at export instead: sdrt export onnx --lora)")
            from .lora import LoraManager
            self._loras = LoraManager(modules, family=self.family.name)
        return self._loras

    def check(self, request: GenerationRequest, names=None, num_chunks=1, controlled=False):
        """The checks of a request (already through ``GenerationRequest.check``) that depend on
        the model: sizes (default: the UNet's ``sample_size``) against the VAE's scale factor,
        ``clip_skip`` against the text encoder's depth, and the request's estimated peak memory
        against the device's (unless a static plan of its shape is built already; with
        ``controlled``, ControlNets' residuals counted in). Returns the request with height,
        width and sampler filled in."""
        names = names or {}
        f = self.vae_scale_factor
        sizes = {}
        for field in ("height", "width"):
            value = getattr(request, field)
            if value is None:
                value = self.unet.config.sample_size * f
                if value > self.limits.max_side:
                    raise SdrtError(f"{names.get(field, field)} was not given, and the UNet "
                                    f"config's sample_size {self.unet.config.sample_size} makes "
                                    f"it {value}, past the limit of {self.limits.max_side} "
                                    f"(SDRT_MAX_SIDE); pass {names.get(field, field)}")
            self._check_side(field, value, names)
            sizes[field] = value
        # SDXL already reads the penultimate layer: clip_skip k reads k more from the end.
        layers = min(e.config.num_hidden_layers for e in self.text_encoders.values())
        most = layers - 1 - int(self.family.penultimate)
        if request.clip_skip > most:
            raise SdrtError(f"{names.get('clip_skip', 'clip_skip')} must be from 0 to "
                            f"{most} (the text encoder has {layers} layers), got "
                            f"{request.clip_skip}")
        self._check_family_arguments(request, names)
        self._check_seeded(request, None, names)
        request = dataclasses.replace(request, sampler=request.sampler or
                                      default_sampler(self.scheduler_config), **sizes)
        if request.cfg_pp and self._guidance_distilled():
            raise SdrtError(f"{names.get('sampler', 'sampler')} {request.sampler} (CFG++) needs "
                            f"the unconditional pass, which this guidance-distilled UNet "
                            f"(time_cond_proj_dim) does not run; pick another sampler")
        if self._static(request) and self._shape(request, num_chunks) in self.runtime.plans:
            return request  # a built plan: its buffers and graphs are already allocated
        need, what = request_bytes(
            self.unet.config, self.vae.config,
            [e.config for e in self.text_encoders.values()], request.height,
            request.width, request.batch_size, self._cfg(request), self.dtype,
            fused_attention(self.unet, self.device, self.dtype), request.has_image, num_chunks,
            self.vae_run_dtype(), controlled,
            self.vae.tile_latent if self.vae_tiling else None, bool(request.pag_scale))
        images = request.batch_size
        check_request_fits(need, what, f"a request for {images} image{'s' * (images > 1)} of "
                           f"{request.width}x{request.height}"
                           f"{' with guidance' if self._cfg(request) else ''}",
                           self.device, self.limits)
        return request

    def _check_family_arguments(self, request, names):
        """Refuse the arguments this model's family has no use for (a second prompt for a model
        with one text encoder, micro-conditioning its UNet does not take), so that none is
        silently ignored."""
        family = self.family
        allowed = set(family.time_ids) | {"negative_" + n for n in family.time_ids}
        given = [f for f in MICRO_CONDITIONING if getattr(request, f) is not None]
        if len(family.text_encoders) < 2:
            given += [f for f in ("prompt_2", "negative_prompt_2")
                      if getattr(request, f) is not None]
        for field in given:
            if field not in allowed:
                takes = (f"; it takes {', '.join(family.time_ids)}" if family.time_ids else "")
                raise SdrtError(f"{names.get(field, field)} is not used by {family.label} models "
                                f"({os.path.basename(self.source.rstrip(os.sep)) or self.source})"
                                f"{takes}")

    def _check_seeded(self, request, latents, names):
        """A1111's noise settings need noise the pipeline draws (not ``latents``), and a seed
        resize a size of at least one latent pixel."""
        name = lambda field: names.get(field, field)
        for field in ("subseed_strength", "seed_resize_from"):
            if getattr(request, field) and latents is not None:
                raise SdrtError(f"{name(field)} changes the noise the seed draws; it cannot be "
                                f"combined with latents (noise given)")
        f = self.vae_scale_factor
        if request.seed_resize_from is not None and min(request.seed_resize_from) < f:
            raise SdrtError(f"{name('seed_resize_from')} must be at least {f} pixels (the VAE's "
                            f"scale factor) wide and high, got "
                            f"{request.seed_resize_from[1]}x{request.seed_resize_from[0]}")

    def _check_side(self, field, value, names):
        f = self.vae_scale_factor
        if value % f or value < f:
            raise SdrtError(f"{names.get(field, field)} must be a multiple of {f} (the VAE's "
                            f"scale factor), got {value}")

    def _shape(self, request, num_chunks=1, masked=False, controls=(), guess_mode=False,
               image_prompts=(), text_variants=1, image_regions=(), control_masks=(), eta=0.0):
        return StaticShape(request.height, request.width, request.batch_size,
                           request.num_inference_steps, request.sampler, self._cfg(request),
                           num_chunks, request.strength if request.has_image else None, masked,
                           controls, guess_mode, image_prompts, text_variants, image_regions,
                           control_masks, request.prompt_syntax == "comfy",
                           getattr(self.unet, "freeu", None), self.vae_tiling,
                           request.pag_scale, self._rescale(request), self.seamless_tiling,
                           float(eta) if sampler_family(request.sampler) == "ddim" else 0.0)

    def _rescale(self, request):
        """(factor, style) of the request's guidance rescale; () where it has none (no
        classifier-free guidance, or a factor of 0)."""
        if not (request.guidance_rescale and self._cfg(request)):
            return ()
        return request.guidance_rescale, request.guidance_rescale_style

    def _guidance_distilled(self):
        """Whether the UNet takes its guidance scale as an input (an LCM-distilled UNet, config
        ``time_cond_proj_dim``) rather than through classifier-free guidance."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    def _cfg(self, request):
        """Whether the request batches an unconditional pass: as diffusers'
        ``do_classifier_free_guidance``, never for a guidance-distilled UNet."""
        return request.guidance and not self._guidance_distilled()

    def _texts(self, request):
        """The text encoders' inputs (first, second): ``request.texts()`` and
        ``request.texts_2()``, without the negatives when the request runs no classifier-free
        guidance."""
        if self._cfg(request):
            return request.texts(), request.texts_2()
        return list(request.prompt), request.texts_2()[-len(request.prompt):]

    def _static(self, request):
        """Whether a request runs through the static plans, once ``compile`` has made a
        runtime: text to image, image to image and inpainting with the final text layer,
        not a part of the schedule (a refiner's hand-off)."""
        return (self.runtime is not None and request.clip_skip == 0
                and request.denoising_end is None and request.denoising_start is None)

    def _keep(self, request):
        """(rows,) float32: 0 on the rows whose text conditioning is zeros (the negative half
        with ``zero_out_negative``, or SDXL's absent negative prompt,
        ``force_zeros_for_empty_prompt``), else 1; None when there are none."""
        zeros = request.zero_out_negative or (self.force_zeros_for_empty_prompt
                                              and request.negative_prompt is None)
        if not (self._cfg(request) and zeros):
            return None
        n = request.batch_size
        return torch.cat([torch.zeros(n), torch.ones(n)])

    def _time_ids(self, request):
        """(rows, K) micro-conditioning numbers, negatives first with CFG: each size defaults
        to the image's, the crop to (0, 0), the aesthetic scores to diffusers' 6 and 2.5, and
        each negative one to its positive one. None for families without them."""
        family = self.family
        if not family.time_ids:
            return None
        size = (request.height, request.width)
        positive = {"original_size": request.original_size or size,
                    "crops_coords_top_left": request.crops_coords_top_left or (0, 0),
                    "target_size": request.target_size or size,
                    "aesthetic_score": 6.0 if request.aesthetic_score is None
                    else request.aesthetic_score}
        negative = {name: getattr(request, "negative_" + name) for name in positive}
        negative = {name: positive[name] if value is None else value
                    for name, value in negative.items()}
        if request.negative_aesthetic_score is None:
            negative["aesthetic_score"] = 2.5
        rows = [family.time_ids_of(positive)] * request.batch_size
        if self._cfg(request):
            rows = [family.time_ids_of(negative)] * request.batch_size + rows
        return torch.tensor(rows, dtype=torch.float32)

    def _timestep_cond(self, request):
        """A guidance-distilled UNet's (B, time_cond_proj_dim) guidance embedding of each
        image's scale, as given (no CFG clamping); None for other UNets."""
        if not self._guidance_distilled():
            return None
        scales = [g for g in request.scales() for _ in range(request.num_images_per_prompt)]
        return guidance_embedding(scales, self.unet.config.time_cond_proj_dim).to(
            self.device, self.dtype)

    # -- pieces -------------------------------------------------------------------------------

    def text_inputs(self, prompts, prompt_syntax="a1111", prompts_2=None,
                    num_chunks=None) -> TextInputs:
        """Prompts → token ids and weights (B, n, 77) on the CPU, for each of the family's
        tokenizers: the first reads ``prompts``, the second ``prompts_2`` (default: the same
        prompts). ``"a1111"`` reads A1111's syntax (weights, ``BREAK``, 75-token chunks past
        77 tokens; every tokenizer gets as many chunks as the longest needs); ``"plain"`` is
        one chunk, cut at 77 tokens with a warning, every weight 1; ``"comfy"`` reads ComfyUI's
        (``comfy_prompt``: its weights, chunks, and the rows' chunks repeated to one count).
        ``num_chunks``: A1111's chunks, at least as many as the prompts need."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts_2, str):
            prompts_2 = [prompts_2] * len(prompts)
        texts = [prompts, prompts_2 or prompts]
        names = self.family.tokenizers
        if prompt_syntax == "comfy":
            return TextInputs(dict(zip(names, comfy_prompt.tokenize_prompts(
                [self.tokenizers[name] for name in names], texts[:len(names)]))))

        def tokenize(i, num_chunks=None):
            tokenizer = self.tokenizers[names[i]]
            if prompt_syntax == "a1111":
                return tokenize_prompts(tokenizer, texts[i], num_chunks)
            ids = tokenizer(texts[i])[:, None]
            return WeightedIds(ids, torch.ones(ids.shape, dtype=torch.float32))
        batches = [tokenize(i, num_chunks) for i in range(len(names))]
        most = max(b.num_chunks for b in batches)
        batches = [b if b.num_chunks == most else tokenize(i, most)
                   for i, b in enumerate(batches)]
        return TextInputs(dict(zip(names, batches)))

    @torch.no_grad()
    def encode_prompt(self, prompts, prompt_2=None, clip_skip=0,
                      prompt_syntax="a1111") -> Conditioning:
        """Prompts → their ``Conditioning`` in the pipeline's dtype: text states
        (B, 77·n, D) and, for SDXL, the pooled text embeddings (B, P); no time ids."""
        inputs = self.text_inputs(prompts, prompt_syntax, prompt_2).to(self.device)
        states, pooled = encode_text(self.family, self.text_encoders, inputs, clip_skip)
        return Conditioning(states, pooled).to(dtype=self.dtype)

    def conditioning(self, request, inputs: TextInputs, clip_skip=0) -> Conditioning:
        """The request's conditioning, one row per image and CFG half: text states (zeros for
        an absent SDXL negative prompt), pooled embeddings and time ids."""
        # One text-encoder call for both CFG halves and every chunk, then a row per image.
        states, pooled = encode_text(self.family, self.text_encoders, inputs.to(self.device),
                                     clip_skip)
        return self._conditioning_rows(request, states, pooled, self._keep(request))

    def _conditioning_rows(self, request, states, pooled, keep):
        """``conditioning``'s from the states and pooled embeddings of each prompt's halves
        (negatives first with CFG): a row per image, ``keep``'s rows zeroed, the time ids."""
        k = request.num_images_per_prompt
        states, pooled = (None if t is None else t.repeat_interleave(k, dim=0)
                          for t in (states, pooled))
        if keep is not None:
            keep = keep.to(self.device)
            states = states * keep.to(states.dtype)[:, None, None]
            if pooled is not None:
                pooled = pooled * keep.to(pooled.dtype)[:, None]
        time_ids = self._time_ids(request)
        return Conditioning(states, pooled,
                            None if time_ids is None else time_ids.to(self.device)
                            ).to(dtype=self.dtype)

    def default_size(self):
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def _preprocess(self, image, height, width):
        """PIL image(s), float array(s) (H, W, 3) or (B, H, W, 3) in [0, 1], or a float tensor
        (3, H, W) or (B, 3, H, W) in [0, 1] → tensor (B, 3, H, W) in [-1, 1].

        Every image is resized to (height, width), by default the first image's size cut down
        to a multiple of the VAE's scale factor; a resize is reported with one warning.
        """
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise SdrtError("image must be a PIL image, a float array or tensor, or a non-empty "
                            "list of them, got an empty list")
        limit = self.limits.max_side
        self._bound_pixels(items, "image")
        tensors = [_image_tensor(item) for item in items]
        h0, w0 = tensors[0].shape[2:]
        f = self.vae_scale_factor
        size = (height or h0 - h0 % f, width or w0 - w0 % f)
        for field, given, side in (("height", height, size[0]), ("width", width, size[1])):
            if side < f:
                raise SdrtError(f"image must be at least {f} pixels high and wide (the VAE's "
                                f"scale factor), got {w0}x{h0}")
            if given is None and side > limit:
                raise SdrtError(f"image {field} must be at most {limit} pixels (SDRT_MAX_SIDE), "
                                f"got {w0}x{h0}: pass height and width to resize it")
        batch = self._resize_all(tensors, size, height is None and width is None)
        return (batch * 2 - 1).to(self.device, self.dtype)

    def _bound_pixels(self, items, field):
        """Each image (or mask) of ``items`` is at most (2 × SDRT_MAX_SIDE)² pixels, checked
        before any conversion (a float copy takes 12 bytes a pixel)."""
        from PIL import Image
        limit = (2 * self.limits.max_side) ** 2
        for item in items:
            if isinstance(item, Image.Image):
                w0, h0 = item.size
            elif isinstance(item, torch.Tensor) and item.ndim >= 2:
                h0, w0 = item.shape[-2:]
            elif isinstance(item, np.ndarray) and item.ndim >= 2:
                channels_last = item.ndim >= 3 and item.shape[-1] in (1, 3)
                h0, w0 = item.shape[-3:-1] if channels_last else item.shape[-2:]
            else:
                continue  # refused later, with the type or shape
            if h0 * w0 > limit:
                raise SdrtError(f"{field} must be at most {limit} pixels "
                                f"((2 × SDRT_MAX_SIDE)²), got {w0}x{h0}")

    def _resize_all(self, tensors, size, to_multiple, field="image", warn=True):
        """The images of ``field``, each resized to ``size`` where it differs (init images: one
        warning for all, when ``warn``), as one float32 batch in [0, 1] on the CPU."""
        out, changed = [], []
        for t in tensors:
            if tuple(t.shape[2:]) != size:
                changed.append(f"{t.shape[3]}x{t.shape[2]}")
                t = torch.nn.functional.interpolate(t, size=size, mode="bicubic",
                                                    antialias=True).clamp_(0, 1)
            out.append(t)
        if changed and warn:
            why = (f"a multiple of the VAE's scale factor {self.vae_scale_factor}" if to_multiple
                   else "the height and width asked for")
            warnings.warn(f"init image resized from {', '.join(sorted(set(changed)))} to "
                          f"{size[1]}x{size[0]} ({why})", stacklevel=5)
        batch = torch.cat(out)
        if batch.shape[0] == 0:
            raise SdrtError(f"{field} must hold at least one image, got a batch of 0")
        return batch

    @torch.no_grad()
    def encode_image(self, image, generator, batch=None):
        """Image (B, 3, H, W) in [-1, 1] → scaled latents, sampled from the VAE's Gaussian, each
        image repeated to ``batch`` rows. With a list of generators (one per row), row i's
        sample is drawn from generator i. The sample is drawn in the VAE's dtype (float32 for
        an upcast SDXL VAE) and then cast to the pipeline's, as diffusers does."""
        vae_dtype = self.vae_run_dtype()
        mean, std = self._vae_in(vae_dtype).encode(image.to(vae_dtype))
        batch = batch or mean.shape[0]
        if isinstance(generator, list):
            mean, std = (m.repeat_interleave(batch // m.shape[0], dim=0) for m in (mean, std))
        z = mean + std * cpu_randn(mean.shape, generator, mean.dtype).to(self.device)
        return scale_latents(self.vae, z.to(self.dtype).repeat_interleave(batch // z.shape[0],
                                                                          dim=0))

    @staticmethod
    def _check_latent_resize(latent_resize, image, mask_image, denoising_start):
        if not isinstance(latent_resize, bool):
            raise SdrtError(f"latent_resize must be True or False, got "
                            f"{short_repr(latent_resize)}")
        if not latent_resize:
            return
        for bad, why in (
                (image is None, "needs image, the init image whose latents are resized"),
                (mask_image is not None, "cannot be combined with mask_image (the mask is "
                 "drawn at the size asked for, the image at its own)"),
                (denoising_start is not None, "cannot be combined with denoising_start (a "
                 "refiner's hand-off takes the latents as they are)")):
            if bad:
                raise SdrtError(f"latent_resize=True {why}")

    def _check_mask_request(self, image, denoising_start):
        if image is None:
            raise SdrtError("mask_image needs image, the init image to inpaint")
        if self._image_latents(image) is not None:
            raise SdrtError("mask_image needs image as pixels (a PIL image, array or tensor "
                            "of RGB values), got latents")
        if denoising_start is not None:
            raise SdrtError(f"mask_image cannot be combined with denoising_start (a refiner's "
                            f"hand-off), got denoising_start={denoising_start}")

    def _mask(self, mask_image, size, rows):
        """The mask as diffusers binarizes it: float32 (1 or ``rows``, 1, H, W) on the device,
        1 where the image is repainted (values ≥ 0.5), each mask resized to ``size``."""
        items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
        if not items:
            raise SdrtError("mask_image must be a PIL image, a float array or tensor, or a "
                            "non-empty list of them, got an empty list")
        self._bound_pixels(items, "mask_image")
        masks = []
        for t in map(_mask_tensor, items):
            if tuple(t.shape[2:]) != size:
                t = torch.nn.functional.interpolate(t, size=size, mode="bilinear",
                                                    antialias=True)
            masks.append(t)
        mask = torch.cat(masks)
        if mask.shape[0] not in (1, rows):
            raise SdrtError(f"mask_image must hold one mask or one per init image ({rows}), "
                            f"got {mask.shape[0]}")
        return (mask >= 0.5).float().to(self.device)

    def _blank_image_cond(self, batch, height, width):
        vae_dtype = self.vae_run_dtype()
        return blank_inpaint_conditioning(self._vae_in(vae_dtype), vae_dtype, self.device,
                                          batch, height, width, self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled latents → float32 images (B, H, W, 3) in [0, 1] on the CPU.

        A low-precision decode that overflows (inf/NaN: the known fp16 VAE failure) is done
        again in float32, so no request returns a black or NaN image.
        """
        vae_dtype = self.vae_run_dtype()
        image = vae_decode(self._vae_in(vae_dtype), latents.to(vae_dtype))
        if not torch.isfinite(image).all() and vae_dtype != torch.float32:
            return self._decode_fp32(latents, vae_dtype)
        return to_unit_images(image).cpu().numpy()

    def vae_run_dtype(self):
        """The dtype the VAE encodes and decodes in: ``vae_dtype`` when one was given, else
        diffusers' choice (``default_vae_dtype``)."""
        if not isinstance(self.vae, nn.Module):  # onnxruntime runs the export's own dtype
            return self.dtype
        if self.vae_dtype is not None:
            return self.vae_dtype
        return default_vae_dtype(self.family, self.dtype, self.vae.config.force_upcast)

    def _vae_in(self, dtype):
        """The VAE in ``dtype`` (one ``vae_run_dtype`` gives, or float32 for an sdrt VAE): the
        pipeline's own, or a copy made once."""
        if dtype == self.dtype:
            return self.vae
        if dtype not in self._vae_copies:
            self._vae_copies[dtype] = copy.deepcopy(self.vae).to(dtype)
        return self._vae_copies[dtype]

    def _decode_fp32(self, latents, dtype):
        if not isinstance(self.vae, nn.Module):
            raise SdrtError(f"the VAE decode overflowed in {dtype}; use a float32 VAE "
                            "(for ONNX, export with --dtype fp32)")
        warnings.warn(f"VAE decode overflowed in {dtype}; decoding again in float32")
        return to_unit_images(vae_decode(self._vae_in(torch.float32),
                                         latents.float())).cpu().numpy()

    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _noise(self, latents, shape, generator):
        """The given latents (checked), or noise drawn from ``generator``."""
        if latents is None:
            return cpu_randn(shape, generator, self.dtype).to(self.device)
        if not isinstance(latents, torch.Tensor):
            raise SdrtError(f"latents must be a torch.Tensor of shape {shape}, got "
                            f"{type(latents).__module__}.{type(latents).__name__}")
        if tuple(latents.shape) != shape:
            raise SdrtError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        if latents.is_meta:
            raise SdrtError("latents must hold their values (a tensor on a device), got a "
                            "meta tensor")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise SdrtError(f"latents must be finite floats, got {latents.dtype} values "
                            f"{'with inf or NaN' if latents.is_floating_point() else ''}".strip())
        if latents.abs().max() > MAX_LATENT:
            raise SdrtError(f"latents must be noise of unit scale (as diffusers takes them), "
                            f"values within ±{MAX_LATENT:g}, got {latents.abs().max().item():.3g}")
        return latents.to(self.device, self.dtype)

    def _seeded_noise(self, request, shape, generator):
        """The noise of A1111's variation seed and seed resize, drawn from the generator: with
        ``seed_resize_from``, what the generator would draw at that size (in latents) centred
        in what it draws at this one (``centred_noise``; the generator then stands where the
        plain draw leaves it); with a ``subseed_strength``, image i's noise at the size it is
        drawn at (the resized one's, as A1111 slerps it) slerped towards subseed + i's (or the
        list's i-th) by that strength (``vary_noise``), which sets ``last_subseed``."""
        small = None
        if request.seed_resize_from is not None:
            h, w = request.seed_resize_from
            f = self.vae_scale_factor
            small = cpu_randn((*shape[:2], h // f, w // f), copy_generator(generator))
        noise = cpu_randn(shape, generator)
        if request.subseed_strength:
            subseed = self.last_subseed = request.draw_subseed()
            subseeds = (subseed if isinstance(subseed, list) else
                        [(subseed + i) % (MAX_SEED + 1) for i in range(shape[0])])
            if len(subseeds) != shape[0]:
                raise SdrtError(f"subseed must be one integer or a list of {shape[0]} (one per "
                                f"image), got a list of {len(subseeds)}")
            if small is None:
                noise = vary_noise(noise, subseeds, request.subseed_strength)
            else:
                small = vary_noise(small, subseeds, request.subseed_strength)
        if small is not None:
            noise = centred_noise(noise, small)
        return noise.to(self.device, self.dtype)

    def _generator(self, generator, request):
        """The CPU generator (or list of them, one per image) that draws the request's noise;
        sets ``last_seed``."""
        self.last_subseed = None
        if generator is None:
            self.last_seed = request.draw_seed()
            return torch.Generator("cpu").manual_seed(self.last_seed)
        generators = generator if isinstance(generator, list) else [generator]
        if isinstance(generator, list) and len(generator) != request.batch_size:
            raise SdrtError(f"generator must be one CPU torch.Generator or a list of "
                            f"{request.batch_size} (one per image), got a list of "
                            f"{len(generator)}")
        for g in generators:
            if not isinstance(g, torch.Generator) or g.device.type != "cpu":
                raise SdrtError(f"generator must be a CPU torch.Generator or a list of them, "
                                f"one per image (noise is drawn on the CPU so that a seed "
                                f"gives the same image on every device), got {short_repr(g)}")
        if request.seed is not None:
            raise SdrtError(f"seed must be None when a generator is given, got {request.seed}")
        self.last_seed = None  # the generator's state is the caller's
        return generator

    def _step_end(self, callback):
        """The sampler's per-step hook that calls ``callback`` as diffusers calls
        ``callback_on_step_end``, and takes the latents it may return."""
        if callback is None:
            return None

        def step_end(i, t, x):
            out = callback(self, i, t, {"latents": x})
            if out is None:
                return None
            if not isinstance(out, dict):
                raise SdrtError(f"callback must return None or a dict, got "
                                f"{type(out).__name__}")
            latents = out.get("latents")
            if latents is None:
                return None
            if not isinstance(latents, torch.Tensor) or latents.shape != x.shape:
                raise SdrtError(f"callback must return latents of shape {tuple(x.shape)}, got "
                                f"{short_repr(getattr(latents, 'shape', latents))}")
            return latents.to(x.device, x.dtype)
        return step_end

    # -- the request --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height=None, width=None,
                 num_inference_steps=50, guidance_scale=7.5, sampler=None, seed=None,
                 latents=None, image=None, strength=0.8, num_images_per_prompt=1,
                 output_type="pil", generator=None, clip_skip=0, callback=None,
                 prompt_syntax="a1111", prompt_2=None, negative_prompt_2=None,
                 original_size=None, crops_coords_top_left=None, target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=None,
                 negative_target_size=None, aesthetic_score=None,
                 negative_aesthetic_score=None, denoising_start=None, denoising_end=None,
                 mask_image=None, masked_content="original", latent_resize=False,
                 control_image=None, controlnet=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False,
                 control_mode="balanced", control_mask=None, ip_adapter_image=None,
                 ip_adapter=None, ip_adapter_scale=1.0, ip_adapter_guidance_start=0.0,
                 ip_adapter_guidance_end=1.0, ip_adapter_mask=None,
                 ip_adapter_mask_style="diffusers", prompt_edit_steps=None, subseed=None,
                 subseed_strength=0.0, pag_scale=0.0, guidance_rescale=0.0,
                 guidance_rescale_style="diffusers", prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, eta=0.0,
                 seed_resize_from=None, initial_noise_multiplier=1.0, zero_out_negative=False):
        """Generate images; see the README for each argument.

        Returns a list of PIL images (``"pil"``), a float32 array (B, H, W, 3) in [0, 1]
        (``"np"``), the same as a float32 tensor (B, 3, H, W) (``"pt"``, as diffusers'), or
        the final latents (``"latent"``); the first two are also diffusers'
        output (``.images``), and ``return_dict=False`` gives diffusers' tuple (images,
        None). ``callback_on_step_end`` is diffusers' name for ``callback``; ``eta`` is
        diffusers' DDIM noise (the other samplers do not read it). ``seed=-1`` (or
        None) draws a random seed; ``pipe.last_seed`` records the seed used. ``generator`` (a
        CPU ``torch.Generator``) may replace ``seed``.

        SDXL models take diffusers' SDXL arguments: ``prompt_2`` and ``negative_prompt_2``
        (the second text encoder's prompts, by default the first's), the micro-conditioning
        (``original_size``, ``crops_coords_top_left``, ``target_size`` and their
        ``negative_`` forms; the refiner's ``aesthetic_score`` and
        ``negative_aesthetic_score``, default 6 and 2.5), and the base/refiner hand-off: the
        base with ``denoising_end=0.8, output_type="latent"`` stops at that fraction of the
        noise schedule, and the refiner with ``image=those latents, denoising_start=0.8``
        takes over from there (the latents are used as they are: not encoded, not noised).

        Inpainting, as diffusers' inpainting pipeline: ``mask_image`` (a PIL image, made
        greyscale, or floats in [0, 1]: one mask, or one per init image, each resized to the
        init image's size) is 1 (white) where ``image`` is repainted and 0 where it is kept;
        values ≥ 0.5 count as 1. An inpainting UNet (9 input channels: the latents, the mask
        and the masked image's latents) sees the mask on every call, and at ``strength=1`` it
        starts from pure noise. Any other UNet keeps the unmasked latents: after each step
        they are reset to the init image's, noised to the next step's level (the last step
        to the clean ones). An inpainting UNet given no mask (text to image, or image to
        image) runs with everything masked and a blank masked image, as A1111 runs it.
        ``masked_content`` (A1111's "masked content" in latent space) sets what the masked
        init latents hold before they are noised: ``"original"`` (the init image's),
        ``"latent_noise"`` (unit noise, drawn after the masked image's sample) or
        ``"latent_nothing"`` (zeros); it matters below full strength.

        ``latent_resize=True`` is A1111's "Just resize (latent upscale)": the init images are
        encoded at the first one's size (cut down to a multiple of the VAE's scale factor)
        and their latents are resized bilinearly to ``height`` × ``width`` (by default that
        size, a no-op); without it each image is resized to that size in pixels first.

        Every argument is checked before any work (``SdrtError``, a ``ValueError``, naming the
        argument, its value and what is allowed), including the request's estimated peak
        memory against the device's; ``pipe.limits`` sets the bounds. An argument this
        model's family does not use is refused, not ignored.

        ControlNet, as diffusers' ControlNet pipelines (text to image, image to image and
        inpainting): ``control_image`` (an image, or a list of images: one, or one per
        prompt) is what the ControlNet loaded with ``load_controlnet`` follows, resized to
        the output size (which it sets when neither an init image nor height and width do).
        With several loaded, ``controlnet`` names those to run (default: all, in load order)
        and ``control_image`` is a list with one entry per ControlNet; their residuals add
        up. ``controlnet_conditioning_scale`` scales a ControlNet's residuals, and it runs on
        the UNet calls within [``control_guidance_start``, ``control_guidance_end``] of the
        schedule (each one value, or a list with one per ControlNet). ``guess_mode`` runs
        the ControlNets on the conditional half only, their residuals ramped from 0.1× at
        the first skip to 1× at the mid block. ``control_mode`` (one, or one per ControlNet)
        is A1111's ControlNet extension's: "balanced"; "prompt" ("My prompt is more
        important") ramps the residuals from 0.825^12× at the first skip to 1× at the mid
        block; "controlnet" ("ControlNet is more important") does too and keeps them from the
        unconditional half, so CFG pushes towards the ControlNet. A mode is data in the
        plan's table: it needs no plan of its own. ``control_mask`` (a mask, or one or None
        per net) confines a net to a region: its residuals times the mask (soft, as given)
        bilinear at their size, the A1111 extension's ``effective_region_mask``.

        IP-Adapter, as diffusers' ``ip_adapter_image``: with adapters loaded by
        ``load_ip_adapter``, ``ip_adapter_image`` (an image or a list of images, whose tokens
        are joined; with several adapters a list with one such entry per adapter) prompts every
        image of the call; ``ip_adapter`` names the adapters to run (default: all, in load
        order) and ``ip_adapter_scale`` (one value, or one per adapter; default 1) weighs
        each one's attention: a number, or diffusers' per-block dict (``set_ip_adapter_scale``,
        InstantStyle's ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``: what it leaves out is 0;
        ``ip_adapter.layer_scales``), on the UNet calls within [``ip_adapter_guidance_start``,
        ``ip_adapter_guidance_end``] of the schedule (each one number or one per adapter; a
        ControlNet's rule), as A1111's ControlNet units and ComfyUI's IPAdapter nodes run
        them. ``ip_adapter_mask`` (diffusers' ``ip_adapter_masks``; per adapter None, a mask
        or one per image, or diffusers' (1, images, H, W) tensor) confines each image of an
        adapter to its region: the image's tokens get an attention of their own, weighed at
        each query by the mask at that layer's grid, read as ``ip_adapter_mask_style`` says
        (``image_prompt.MASK_STYLES``: diffusers' binarized bicubic, or the A1111 ControlNet
        extension's soft bilinear ``effective_region_mask``); a masked adapter's scale may be
        a list with one per image.

        Prompts in A1111 syntax may edit and alternate (``[a:b:0.5]``, ``[a|b]``;
        ``engine.prompt_schedule``): each UNet call gets its texts' conditioning. The editing
        steps are the request's (twice them for a second-order sampler);
        ``prompt_edit_steps`` = (steps, the first pass's steps) reads them as a hires fix's
        second pass does (``engine.hires`` passes it).

        ``callback(pipe, step_index, timestep, callback_kwargs)`` is called after each
        denoising step, as diffusers calls ``callback_on_step_end``: ``callback_kwargs`` is
        ``{"latents": x}`` (float32), and a returned dict with ``"latents"`` replaces them.
        ``pipe.num_timesteps``, the number of steps of this call, is set before the first.
        Under a static plan the callback is called too: on the CPU the plan runs eagerly
        anyway; on CUDA its denoising stage runs eagerly (not replayed) for a call with a
        callback, while the text encoder and VAE graphs are replayed.
        """
        if callback is not None and not callable(callback):
            raise SdrtError(f"callback must be callable or None, got {short_repr(callback)}")
        if prompt_edit_steps is not None and not (
                isinstance(prompt_edit_steps, tuple) and len(prompt_edit_steps) == 2 and
                all(type(v) is int and v >= 1 for v in prompt_edit_steps)):
            raise SdrtError(f"prompt_edit_steps must be None or (steps, the first pass's "
                            f"steps), two positive integers, got {short_repr(prompt_edit_steps)}")
        callback = _diffusers_callback(callback, callback_on_step_end,
                                       callback_on_step_end_tensor_inputs)
        if not isinstance(return_dict, bool):
            raise SdrtError(f"return_dict must be True or False, got {short_repr(return_dict)}")
        given = given_states(self, prompt, prompt_2, negative_prompt, negative_prompt_2,
                             prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                             negative_pooled_prompt_embeds)
        if given is not None and given.states is not None:
            prompt = [""] * given.prompts  # (the batch's rows; the states replace their text)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            sampler=sampler, seed=seed, strength=strength,
            num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
            output_type=output_type, has_image=image is not None,
            prompt_syntax=prompt_syntax, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, denoising_start=denoising_start,
            denoising_end=denoising_end, subseed=subseed,
            subseed_strength=subseed_strength, pag_scale=pag_scale,
            guidance_rescale=guidance_rescale, guidance_rescale_style=guidance_rescale_style,
            seed_resize_from=seed_resize_from,
            initial_noise_multiplier=initial_noise_multiplier,
            zero_out_negative=zero_out_negative).check(limits=self.limits)
        for field in ("height", "width"):
            if getattr(request, field) is not None:
                self._check_side(field, getattr(request, field), {})
        self._check_seeded(request, latents, {})
        init = init_latents = mask = None
        if masked_content not in MASKED_CONTENT:
            raise SdrtError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}, got "
                            f"{short_repr(masked_content)}")
        if masked_content != "original" and mask_image is None:
            raise SdrtError(f"masked_content={masked_content!r} needs mask_image (it sets what "
                            f"the masked latents start from)")
        if mask_image is not None:
            self._check_mask_request(image, denoising_start)
        self._check_latent_resize(latent_resize, image, mask_image, denoising_start)
        control = ControlRequest.parse(list(self._controlnets), control_image, controlnet,
                                       controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, control_mode,
                                       control_mask, self._control_mask)
        if control is not None:
            check_fused([self._controlnets[n] for n in control.names], control.guess_mode,
                        control.modes, control.masks)
        hints = self._control_tensors(control)
        image_prompt = ImagePromptRequest.parse(
            list(self._ip_adapters), ip_adapter_image, ip_adapter, ip_adapter_scale,
            ip_adapter_guidance_start, ip_adapter_guidance_end, self._prompt_images,
            functools.partial(layer_scales, self.unet), ip_adapter_mask,
            ip_adapter_mask_style, self._prompt_masks)
        if hints and image is None and request.height is None and request.width is None:
            # diffusers' ControlNet pipelines: the control image sets the size.
            f, (h0, w0) = self.vae_scale_factor, hints[0][0].shape[2:]
            request = dataclasses.replace(request, height=h0 - h0 % f, width=w0 - w0 % f)
        if image is not None:
            init_latents = self._image_latents(image)
            if init_latents is None:
                init = (self._preprocess(image, None, None) if latent_resize else
                        self._preprocess(image, request.height, request.width))
            rows, size = ((init.shape[0], init.shape[2:]) if init is not None else
                          (init_latents.shape[0],
                           [s * self.vae_scale_factor for s in init_latents.shape[2:]]))
            if request.batch_size % rows:
                raise SdrtError(f"image must hold one image or one per prompt (a count that "
                                f"divides the batch of {request.batch_size}), got {rows}")
            if latent_resize:  # the size asked for; the latents are resized to it (_start)
                size = (request.height or size[0], request.width or size[1])
            request = dataclasses.replace(request, height=int(size[0]), width=int(size[1]))
        if mask_image is not None:
            mask = self._mask(mask_image, tuple(init.shape[2:]), init.shape[0])
        # [negative..., positive...] as diffusers orders them, tokenised once; with A1111
        # syntax both halves (and both tokenizers) get the same number of chunks.
        texts, texts_2 = self._texts(request)
        parts = self._composable(request, control, image_prompt)
        if request.pag_scale:
            self._check_pag(request, control, parts)
        if parts is not None:  # the negatives, then every prompt's parts
            n, flat = len(request.prompt), [t for p in parts for t, _ in p]
            texts, texts_2 = texts[:n] + flat, texts_2[:n] + flat
        edits = request.prompt_syntax == "a1111" and any(map(edited, texts + texts_2))
        if given is None:
            inputs = self.text_inputs(texts, request.prompt_syntax, texts_2)
        else:
            self._check_given(request, given, parts is not None or edits)
            inputs = None
        request = self.check(request, num_chunks=given.num_chunks if given else
                             inputs.num_chunks, controlled=control is not None)
        _check_eta(eta, request.sampler)
        if control is not None:
            self._check_adapter_size(control, request)
        generator = self._generator(generator, request)
        batch, sampler = request.batch_size, request.sampler
        shape = (batch, self.unet.config.out_channels, request.height // self.vae_scale_factor,
                 request.width // self.vae_scale_factor)
        if latents is not None:
            latents = self._noise(latents, shape, None)  # checked before any work
        if control is not None:
            # Resized without a word, as diffusers' ControlNet pipelines resize them.
            hints = [control_batch(self._resize_all(t, (request.height, request.width), False,
                                                    "control_image", warn=False), batch,
                                   self.dtype, self.device) for t in hints]
        step_end = self._step_end(callback)
        t0 = self._clock()
        start = self._start(request, init, init_latents, mask, latents, shape, generator,
                            masked_content)
        if self._static(request) and parts is None and \
                (given is None or given.tokens % 77 == 0):
            edit = (texts, texts_2, prompt_edit_steps) if edits else None
            out = self._run_static(request, inputs, start, generator, step_end,
                                   self._clock() - t0, control, hints, image_prompt, edit,
                                   given, eta)
            return out if return_dict else (out, None)

        schedule = with_eta(make_schedule(
            self.scheduler_config, sampler, request.num_inference_steps,
            strength=request.strength if request.has_image else 1.0, device=self.device,
            denoising_start=request.denoising_start, denoising_end=request.denoising_end,
            align_your_steps=self.family.align_your_steps), eta)
        self.num_timesteps = len(schedule.timesteps)
        t1 = self._clock()
        calls = len(schedule.timesteps)

        def conditioning(texts, texts_2, tokenized=None):
            if given is not None:
                return self._given_conditioning(request, given)
            tokenized = tokenized or self.text_inputs(texts, request.prompt_syntax, texts_2)
            if parts is not None:
                return self._composable_conditioning(request, tokenized, parts)
            return self.conditioning(request, tokenized, request.clip_skip)
        if edits:  # a Conditioning per UNet call, one per text the prompts take
            cond = self._edited_conditioning(request, texts, texts_2, calls, conditioning,
                                             prompt_edit_steps)
        else:  # (tokenized once: a truncation warning is said once)
            cond = conditioning(texts, texts_2, inputs)
        if image_prompt is not None:
            tokens = self._image_tokens(image_prompt, batch, self._cfg(request))
            if parts is not None:  # the negatives' rows, then the image prompt on every part's
                per_part = self._combination(request, parts)[0]
                tokens = tuple(torch.cat([t[:batch], t[batch + per_part]]) for t in tokens)
            rows = tokens[0].shape[0]
            fields = dict(image_tokens=tokens,
                          image_scales=self._image_scales(image_prompt, rows, calls),
                          image_regions=self._image_regions(image_prompt, request, rows))
            cond = ([dataclasses.replace(c, **fields) for c in cond] if edits
                    else dataclasses.replace(cond, **fields))
        t2 = self._clock()
        if start.pure_noise:
            x = schedule.noise_latents(start.noise)
        elif request.denoising_start is not None:
            x = start.x0  # the base's partly denoised latents, as they are (diffusers' refiner)
        else:
            x = schedule.noise_image(start.x0, start.noise)
        if start.mask is not None:
            step_end = keep_unmasked(schedule, start.x0, start.noise, start.mask, step_end)
        image_cond = start.image_cond
        if image_cond is None and inpainting_unet(self.unet):
            image_cond = self._blank_image_cond(batch, request.height, request.width)
        model = guided(self.unet, cond, row_scales(request.row_scales(), self.device),
                       self._cfg(request), self.dtype, self._timestep_cond(request), image_cond,
                       self._control(control, hints, len(schedule.timesteps), request),
                       self._combination(request, parts), request.pag_scale,
                       guidance_rescaler(schedule, *self._rescale(request) or (0,)))
        x = sample(sampler, model, x, schedule, generator=generator, step_end=step_end)
        t3 = self._clock()
        # The init image's encoding counts as denoising.
        self.timings = {"text": t2 - t1, "denoise": t3 - t2 + t1 - t0, "decode": 0.0,
                        "unet_calls": len(schedule.timesteps)}
        if request.output_type == "latent":
            return x if return_dict else (x, None)
        images = self.decode_latents(x.to(self.dtype))
        self.timings["decode"] = self._clock() - t3
        out = self._format(images, request.output_type)
        return out if return_dict else (out, None)

    def _control_tensors(self, control):
        """Each ControlNet's control images as float32 (r, 3, H, W) lists on the CPU, checked
        (empty without ``control``)."""
        if control is None:
            return []
        out = []
        for entry in control.images:
            items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            self._bound_pixels(items, "control_image")
            out.append([_image_tensor(item, "control_image") for item in items])
        return out

    def _check_given(self, request, given, composed):
        """Given text states (``given_states``) against the rest of the request."""
        if composed:
            raise SdrtError("prompt: A1111's prompt editing, alternation and AND cannot be "
                            "combined with prompt_embeds or negative_prompt_embeds (the "
                            "states are the whole prompt)")
        if given.negative is not None and request.zero_out_negative:
            raise SdrtError("zero_out_negative zeros the negative half; it cannot be combined "
                            "with negative_prompt_embeds (give zeros there instead)")
        if given.states is None and len(request.prompt) != given.prompts:
            raise SdrtError(f"negative_prompt_embeds must have a row per prompt "
                            f"({len(request.prompt)}), got {given.prompts}")

    def _given_conditioning(self, request, given):
        """``conditioning``'s of a request with given text states: each CFG half its states,
        or its text encoded to as many tokens (``_encode_to``); an SDXL negative given as
        states is never zeroed."""
        n = len(request.prompt)
        texts, texts_2 = self._texts(request)
        halves = [("prompt", given.states, given.pooled, texts[-n:], texts_2[-n:])]
        if self._cfg(request):
            halves.insert(0, ("negative_prompt", given.negative, given.negative_pooled,
                              texts[:n], texts_2[:n]))
        rows = [(s, p) if s is not None else self._encode_to(request, t, t2, given.tokens, name)
                for name, s, p, t, t2 in halves]
        states = torch.cat([s for s, _ in rows])
        pooled = None if rows[0][1] is None else torch.cat([p for _, p in rows])
        return self._conditioning_rows(request, states, pooled,
                                       self._keep(request) if given.negative is None else None)

    def _encode_to(self, request, texts, texts_2, tokens, field):
        """(states, pooled) of one CFG half's texts with ``tokens`` tokens, those of the other
        half's given states: A1111 syntax pads a shorter prompt with empty chunks."""
        length = self.tokenizers[self.family.tokenizers[0]].max_length
        inputs = self.text_inputs(texts, request.prompt_syntax, texts_2)
        have = inputs.num_chunks * length
        if have != tokens:
            if request.prompt_syntax != "a1111" or tokens % length or have > tokens:
                other = "negative_prompt_embeds" if field == "prompt" else "prompt_embeds"
                raise SdrtError(f"{field} encodes to {have} tokens where {other} has "
                                f"{tokens}: give {field}_embeds of {tokens} tokens too")
            inputs = self.text_inputs(texts, "a1111", texts_2, num_chunks=tokens // length)
        states, pooled = encode_text(self.family, self.text_encoders, inputs.to(self.device),
                                     request.clip_skip)
        return states.to(self.dtype), None if pooled is None else pooled.to(self.dtype)

    def _composable(self, request, control, image_prompt):
        """A1111's composable diffusion: each prompt's parts [(text, weight), ...] where a
        prompt has AND or a trailing ":weight" (A1111 syntax), else None. Refused where the
        combination has no unconditional pass to build on, or beside what sdrt does not run
        with it yet."""
        if request.prompt_syntax != "a1111":
            return None
        parts = [composable_parts(p) for p in request.prompt]
        # (one part at weight 1 is the prompt itself: A1111 strips only its end's spaces)
        if all(len(p) == 1 and p[0][1] == 1.0 for p in parts):
            return None
        what = "prompt: A1111's AND and :weight (composable diffusion)"
        if not self._cfg(request):
            raise SdrtError(f"{what} need classifier-free guidance: guidance_scale above 1 and "
                            f"a UNet that is not guidance-distilled")
        if request.prompt_2 is not None:
            raise SdrtError(f"{what} cannot be combined with prompt_2 yet")
        return parts

    def _composable_conditioning(self, request, inputs: TextInputs, parts):
        """The rows of a composable request: the negatives, one per image, then each image's
        parts, from ``inputs`` (the negatives per prompt, then every prompt's parts)."""
        states, pooled = encode_text(self.family, self.text_encoders, inputs.to(self.device),
                                     request.clip_skip)
        n, k, b = len(request.prompt), request.num_images_per_prompt, request.batch_size
        first = np.cumsum([n] + [len(p) for p in parts])  # each prompt's first part's text
        rows = [j for j in range(n) for _ in range(k)] + [
            first[j] + q for j in range(n) for _ in range(k) for q in range(len(parts[j]))]
        rows = torch.tensor(rows, device=self.device)
        states = states[rows]
        pooled = None if pooled is None else pooled[rows]
        keep = self._keep(request)  # zeros: the negative's (zero_out_negative, or SDXL's absent)
        if keep is not None:
            states[:b] = 0
            if pooled is not None:
                pooled[:b] = 0
        time_ids = self._time_ids(request)
        if time_ids is not None:
            time_ids = torch.cat([time_ids[:b], time_ids[b:b + 1].expand(len(rows) - b, -1)])
            time_ids = time_ids.to(self.device)
        return Conditioning(states, pooled, time_ids).to(dtype=self.dtype)

    def _check_pag(self, request, control, parts):
        """Perturbed-attention guidance runs the conditional rows once more with the same
        inputs: refused beside what gives rows inputs of their own (not yet)."""
        cfg = self._cfg(request)
        why = ("a UNet that runs in another runtime (ONNX)" if not isinstance(self.unet, nn.Module)
               else "ControlNets or T2I-Adapters without classifier-free guidance"
               if control is not None and not cfg else
               "guess_mode" if control is not None and control.guess_mode else
               "A1111's AND (composable diffusion)" if parts is not None else
               "a guidance-distilled UNet (time_cond_proj_dim)" if self._guidance_distilled()
               else None)
        if why:
            raise SdrtError(f"pag_scale cannot be combined with {why} yet")

    def _combination(self, request, parts):
        """``guided``'s ``combine`` of a composable request: each part row's image and weight
        (None without parts)."""
        if parts is None:
            return None
        k = request.num_images_per_prompt
        image = [j * k + i for j, p in enumerate(parts) for i in range(k) for _ in p]
        weight = [w for p in parts for _ in range(k) for _, w in p]
        return (torch.tensor(image, device=self.device),
                torch.tensor(weight, dtype=torch.float32, device=self.device).view(-1, 1, 1, 1))

    def _edit_variants(self, request, texts, texts_2, steps=None):
        """A1111's prompt editing and alternation (``engine.prompt_schedule``): the distinct
        sets of (texts, texts_2) the UNet calls read, and a function from a call's index to
        its set's. ``steps``: (editing steps, the first pass's) of a hires fix's second pass;
        by default the request's steps (twice them for a second-order sampler), as a first
        pass."""
        if steps is None:
            steps = (editing_steps(request.sampler, request.num_inference_steps), None)
        schedules = [[schedule_prompt(t, *steps) for t in part] for part in (texts, texts_2)]

        def key(call):
            return tuple(tuple(text_at(s, call) for s in part) for part in schedules)
        # Past the editing steps every text is back on its first entry, call 0's set.
        variants = list(dict.fromkeys(key(call) for call in range(steps[0] + 1)))
        index = {k: i for i, k in enumerate(variants)}
        return variants, lambda call: index[key(call)]

    def _edited_conditioning(self, request, texts, texts_2, calls, conditioning, steps=None):
        """The Conditioning of each of ``calls`` UNet calls of an edited prompt, each set of
        texts encoded once by ``conditioning(texts, texts_2)``."""
        variants, at = self._edit_variants(request, texts, texts_2, steps)
        encoded = [conditioning(list(t), list(t2)) for t, t2 in variants]
        return [encoded[at(call)] for call in range(calls)]

    def _prompt_images(self, items):
        """IP-Adapter reference images, checked, each as float32 (B, 3, H, W) in [0, 1]."""
        self._bound_pixels(items, "ip_adapter_image")
        return [_image_tensor(item, "ip_adapter_image") for item in items]

    def _prompt_masks(self, items):
        """One IP-Adapter's masks, checked: float32 (images, 1, H, W) in [0, 1]."""
        self._bound_pixels(items, "ip_adapter_mask")
        masks = [_mask_tensor(item, "ip_adapter_mask") for item in items]
        if len({tuple(m.shape[2:]) for m in masks}) > 1:
            raise SdrtError(f"ip_adapter_mask: one IP-Adapter's masks must share one size, got "
                            f"{', '.join('x'.join(map(str, m.shape[:1:-1])) for m in masks)}")
        return torch.cat(masks)

    def _check_adapter_size(self, control, request):
        """The T2I-Adapters a request runs can unshuffle its size."""
        from .adapter import runs_as_adapter
        for name in control.names:
            net = self._controlnets[name]
            f = net.config.downscale_factor if runs_as_adapter(net) else None
            if f and (request.height % f or request.width % f):
                raise SdrtError(f"height and width must be multiples of {f} for T2I-Adapter "
                                f"{name!r} (it pixel-unshuffles the image by {f}), got "
                                f"{request.width}x{request.height}")

    def _control_table(self, control, calls):
        """``Control.scales`` of a request over ``calls`` UNet calls, on the CPU."""
        return control_scales([self._controlnets[n] for n in control.names], control.scales,
                              control.starts, control.ends, control.guess_mode, calls,
                              control.modes)

    def _control(self, control, hints, calls, request):
        """The eager ``Control`` stage of a request (None without ControlNets)."""
        if control is None:
            return None
        grids = self._grids(request)
        return Control([self._controlnets[n] for n in control.names], hints,
                       self._control_table(control, calls).to(self.device), control.guess_mode,
                       self._control_regions(control, grids) or (), grids)

    def _control_mask(self, item):
        """One ControlNet's region mask, checked: float32 (1, 1, H, W) in [0, 1]."""
        self._bound_pixels([item], "control_mask")
        mask = _mask_tensor(item, "control_mask")
        if mask.shape[0] != 1:
            raise SdrtError(f"control_mask must be one mask per ControlNet, got a batch of "
                            f"{mask.shape[0]}")
        return mask

    def _grids(self, request):
        """The (h, w) grid of each UNet level for the request's size (``layers.level_grids``)."""
        from .layers import level_grids
        f = self.vae_scale_factor
        return level_grids(request.height // f, request.width // f,
                           len(self.unet.config.block_out_channels))

    def _control_regions(self, control, grids):
        """Per ControlNet, its region mask's weights (1, Σ h·w) at the UNet's levels as the
        A1111 extension interpolates them (bilinear, as given), or None; None without masks."""
        from .layers import grid_weights
        if not control.masks:
            return None
        return tuple(None if m is None else
                     grid_weights(m, grids, "bilinear").to(self.device, self.dtype)
                     for m in control.masks)

    def _start(self, request, init, init_latents, mask, latents, shape, generator,
               masked_content="original"):
        """Where a request's denoising starts, drawn in diffusers' order: the init image's
        posterior sample, the noise, then (inpainting) the masked image's sample, then
        ``masked_content``'s noise. Inpainting at full strength starts from pure noise, and an
        inpainting UNet then encodes no init image."""
        batch = shape[0]
        pure_noise = starts_from_noise(request.strength if request.has_image else None,
                                       mask is not None)
        x0 = small = image_cond = None
        if init is not None and not (pure_noise and inpainting_unet(self.unet)):
            x0 = self.encode_image(init, generator, batch)
        elif init_latents is not None:
            x0 = init_latents.repeat_interleave(batch // init_latents.shape[0], dim=0)
        if x0 is not None and tuple(x0.shape[2:]) != tuple(shape[2:]):  # latent_resize
            x0 = torch.nn.functional.interpolate(x0, size=shape[2:], mode="bilinear")
        noise = (self._seeded_noise(request, shape, generator)
                 if request.subseed_strength or request.seed_resize_from else
                 self._noise(latents, shape, generator))
        if request.initial_noise_multiplier != 1:  # (A1111's, on image to image's noise)
            noise = noise * request.initial_noise_multiplier
        if mask is None:
            return _Start(x0, noise, None, None, pure_noise)
        small = torch.nn.functional.interpolate(mask, size=shape[2:])  # nearest: diffusers'
        small = small.repeat_interleave(batch // small.shape[0], dim=0)
        if inpainting_unet(self.unet):
            masked = self.encode_image(init * (mask < 0.5).to(init.dtype), generator, batch)
            image_cond = inpaint_conditioning(small, masked)
        else:
            # The draw diffusers' encode of the masked image makes, which this path does not
            # use: the sampler's later draws (euler_a) stay in step.
            rows = batch if isinstance(generator, list) else max(len(init), len(mask))
            cpu_randn((rows, *shape[1:]), generator)
        if masked_content != "original" and x0 is not None:
            fill = (cpu_randn(x0.shape, generator, x0.dtype).to(self.device)
                    if masked_content == "latent_noise" else torch.zeros_like(x0))
            x0 = torch.where(small.to(torch.bool), fill, x0)
        return _Start(x0, noise, None if image_cond is not None else small, image_cond,
                      pure_noise)

    def _image_latents(self, image):
        """``image`` when it is latents (a float tensor (B, C, h, w) with the UNet's C latent
        channels, the base's ``output_type="latent"``) on the pipeline's device and dtype;
        None when it is an image to encode."""
        channels = self.unet.config.out_channels
        if not (isinstance(image, torch.Tensor) and image.dim() == 4
                and image.shape[1] == channels and channels != 3):
            return None
        if not image.is_floating_point() or not torch.isfinite(image).all():
            raise SdrtError(f"image latents must be finite floats, got {image.dtype} values"
                            f"{' with inf or NaN' if image.is_floating_point() else ''}")
        return image.to(self.device, self.dtype)

    @staticmethod
    def _format(images, output_type):
        if output_type == "np":
            return images.view(ImageArray)
        if output_type == "pt":  # (diffusers' torch output: (B, 3, H, W) in [0, 1])
            return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        from PIL import Image
        return ImageList(Image.fromarray((i * 255).round().astype(np.uint8)) for i in images)

    def _run_static(self, request, inputs, start, generator, step_end, encode_seconds,
                    control=None, hints=None, image_prompt=None, edit=None, given=None,
                    eta=0.0):
        """One request through the static plan of its shape; ``start`` is where it starts
        (``_start``), drawn before the sampler's own draws; ``control`` and ``hints`` its
        ControlNets' settings and control images; ``image_prompt`` its IP-Adapters';
        ``edit`` (texts, texts_2, prompt_edit_steps) its prompt editing: the plan encodes
        every set of texts its calls read and picks one per call; ``given`` its text states
        (``given_states``, of 77·n tokens), copied in where the plan's text stage would
        write its own."""
        t0, images, prompt, variants = self._clock(), (), {}, None
        if given is not None:
            cond = self._given_conditioning(request, given)
            prompt.update(states=cond.states, text_embeds=cond.text_embeds)
            inputs, text_seconds = TextInputs({}), self._clock() - t0
            t0 = self._clock()
        if edit is not None:
            variants, at = self._edit_variants(request, *edit)
            inputs = self.text_inputs([t for v, _ in variants for t in v],
                                      request.prompt_syntax,
                                      [t for _, v in variants for t in v])
        regions = ()
        if image_prompt is not None:
            tokens = self._image_tokens(image_prompt, request.batch_size, self._cfg(request))
            images = tuple((name, t.shape[1]) for name, t in zip(image_prompt.names, tokens))
            regions = tuple(0 if m is None else m.shape[0] for m in image_prompt.masks)
        encode_seconds += self._clock() - t0
        controls = () if control is None else (control.names, control.guess_mode)
        control_masks = (() if control is None or not control.masks else
                         tuple(m is not None for m in control.masks))
        chunks = inputs.num_chunks if given is None else given.num_chunks
        plan = self.runtime.plan_for(self._shape(request, chunks, start.masked,
                                                 *controls, image_prompts=images,
                                                 text_variants=len(variants or [None]),
                                                 image_regions=regions,
                                                 control_masks=control_masks, eta=eta),
                                     self.scheduler_config)
        self.num_timesteps = len(plan.schedule.timesteps)
        if variants is not None:
            prompt["variant_of_call"] = torch.tensor([at(c) for c in range(self.num_timesteps)],
                                                     device=self.device)
        if image_prompt is not None:
            prompt.update(image_tokens=tokens, image_scales=self._image_scales(
                image_prompt, plan.rows, self.num_timesteps),
                image_regions=self._image_regions(image_prompt, request, plan.rows))
        inputs = inputs.repeat_interleave(request.num_images_per_prompt)
        step_noise = None
        if plan.step_noise is not None:
            # The same CPU draws, in the same order, as the eager sampler makes (euler_a, lcm:
            # unit noise; dpmpp_sde: Brownian-tree increments).
            step_noise = (brownian_noise(plan.schedule, plan.latent_shape, generator)
                          if plan.schedule.noise_points is not None else
                          torch.stack([cpu_randn(plan.latent_shape, generator)
                                       for _ in range(plan.step_noise.shape[0])]))
        keep, time_ids = ((self._keep(request), self._time_ids(request)) if given is None else
                          (None, cond.time_ids))  # (given: the keep is in the states)
        self.timings = plan.run(inputs, start.noise,
                                row_scales(request.row_scales(), self.device), step_noise,
                                clock=self._clock, step_end=step_end,
                                timestep_cond=self._timestep_cond(request), keep=keep,
                                time_ids=time_ids, x0=start.x0, mask=start.mask,
                                image_cond=start.image_cond, control_images=hints,
                                control_scales=None if control is None else
                                self._control_table(control, len(plan.schedule.timesteps)),
                                control_regions=None if control is None else
                                self._control_regions(control, self._grids(request)),
                                **prompt)
        self.timings["denoise"] += encode_seconds  # the init image's, as the eager path counts
        if given is not None:
            self.timings["text"] += text_seconds
        self.timings["unet_calls"] = len(plan.schedule.timesteps)
        if request.output_type == "latent":
            return plan.latents.clone()
        if not plan.decode_finite():
            # The graph decoded in the VAE's low precision and overflowed (clamping would have
            # turned inf into white and NaN into black): decode again in float32.
            return self._format(self._decode_fp32(plan.latents, self.vae_run_dtype()),
                                request.output_type)
        images = plan.image.to("cpu", copy=True).numpy()  # the plan's buffer is reused
        return self._format(images, request.output_type)


def refiner_for(base, path, vae_dtype=None, option="refiner", model="the model"):
    """The SDXL refiner at ``path`` loaded on ``base``'s device and dtype, checked to continue
    ``base``'s latents (an SDXL refiner for an SDXL base); ``option`` and ``model`` name the
    two in messages."""
    if base.family.name != "sdxl":
        raise SdrtError(f"{option} continues an SDXL base model's latents; {model} is "
                        f"{base.family.label}")
    refiner = Pipeline.from_pretrained(path, base.device, base.dtype, vae_dtype=vae_dtype)
    if refiner.unet.config.out_channels != base.unet.config.out_channels or \
            refiner.vae_scale_factor != base.vae_scale_factor:
        raise SdrtError(f"{option} {path} does not take {model}'s latents "
                        f"({refiner.unet.config.out_channels} latent channels against "
                        f"{base.unet.config.out_channels})")
    return refiner


def _check_eta(eta, sampler):
    """diffusers' ``eta``: DDIM's share of fresh noise, which only its DDIM reads (the other
    schedulers ignore it, and so does sdrt; ``schedules.with_eta``). DDIM CFG++ is A1111's
    at eta 0."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise SdrtError(f"eta must be a number from 0 to 1, got {short_repr(eta)}")
    if eta and sampler_family(sampler) == "cfgpp_ddim":
        raise SdrtError(f"eta above 0 is not supported with {sampler} (A1111's DDIM CFG++ runs "
                        f"at eta 0), got {eta:g}")


def _diffusers_callback(callback, on_step_end, tensor_inputs):
    """``callback``, or diffusers' ``callback_on_step_end`` (the same calls), whose
    ``callback_kwargs`` hold the latents only."""
    if callback is not None and on_step_end is not None:
        raise SdrtError("callback and callback_on_step_end cannot both be given (the same "
                        "hook, sdrt's and diffusers' names)")
    if tensor_inputs is not None and (not isinstance(tensor_inputs, (list, tuple)) or
                                      any(t != "latents" for t in tensor_inputs)):
        raise SdrtError(f"callback_on_step_end_tensor_inputs: sdrt passes the latents only "
                        f"(['latents']), got {short_repr(tensor_inputs)}")
    return callback if callback is not None else on_step_end
