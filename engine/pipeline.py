"""Text-to-image and image-to-image Stable Diffusion, in plain PyTorch over sdrt's modules.

Semantics follow diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: the same
``latents`` (or the same seed on a CPU generator) give the same image. One deliberate
difference: with several init images and several images per prompt, each init image serves
its own prompt's images (diffusers' deprecated path cycles the images instead).
"""
import copy
import random
import time
import warnings

import numpy as np
import torch
from torch import nn

from .errors import SdrtError
from .layers import use_conv_chooser
from .loading import Components, load
from .runtime import StaticRuntime, StaticShape
from .samplers import SAMPLERS, SchedulerConfig, default_sampler, make_schedule, sample
from .stages import cpu_randn, guided, to_unit_images, vae_decode

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SIDE = 4096
MAX_SEED = 2 ** 64


def resolve_device(device=None, dtype=None):
    """(device, dtype): CUDA and fp16 when a GPU is there, else CPU and fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdrtError("device cuda was asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise SdrtError(f"unsupported device {device}")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise SdrtError(f"unknown dtype {dtype}: use fp32, fp16 or bf16")
        dtype = names[dtype]
    return device, dtype


def _as_list(x, what):
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, str) for p in x):
        return list(x)
    raise SdrtError(f"{what} must be a string or a non-empty list of strings")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SdrtError(f"{name} must be at least 1, got {value}")


class Pipeline:
    """``Pipeline.from_pretrained(path)(prompt)`` → images."""

    def __init__(self, components: Components, device, dtype):
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.scheduler_config = SchedulerConfig.from_dict(components.scheduler_config)
        self.source = components.source
        self.device, self.dtype = device, dtype
        self.vae_scale_factor = self.vae.config.scale_factor
        self.timings = {}
        self.last_seed = None
        self.runtime = None  # set by compile()
        self._vae_fp32 = None  # made on the first low-precision decode that overflows
        if device.type == "cuda":
            # Time the fused GroupNorm+SiLU conv against group_norm + cuDNN once per shape and
            # keep the faster, so no shape gets slower than the unfused path. (Networks run by
            # another runtime, such as onnxruntime, are not sdrt modules and have no convs.)
            from sdrt.kernels.conv_autotune import ConvPathChooser
            self.conv_chooser = ConvPathChooser()
            for model in (self.unet, self.vae):
                if isinstance(model, nn.Module):
                    use_conv_chooser(model, self.conv_chooser)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, variant=None, config=None,
                        prediction_type=None):
        """Load a diffusers folder or a single-file LDM ``.safetensors`` checkpoint.

        ``variant="fp16"`` prefers ``*.fp16.safetensors`` files. For a single file, ``config``
        may name a diffusers folder whose configs (and tokenizer) to use. ``prediction_type``
        overrides the scheduler's (for an SD 2.x single file, ``"epsilon"`` also selects the
        512-base configs).
        """
        device, dtype = resolve_device(device, dtype)
        return cls(load(path, device, dtype, variant, config, prediction_type), device, dtype)

    def compile(self, height=None, width=None, batch_size=1, num_inference_steps=50,
                sampler=None, guidance=True, strict=False, max_shapes=4):
        """Build the static plan (buffers, schedule, CUDA graphs on a GPU) for one shape.

        From then on, text-to-image calls run through static plans: a call of a shape that
        was built replays it; any other shape is built on the spot and cached (at most
        ``max_shapes``, least recently used dropped), or, with ``strict=True``, refused with
        ``SdrtError``. Returns the plan (its ``build_seconds`` says what the build cost).
        """
        height, width, sampler = self._resolve(height, width, sampler)
        _positive_int(batch_size, "batch_size")
        _positive_int(num_inference_steps, "num_inference_steps")
        if self.runtime is None:
            self.runtime = StaticRuntime(self, max_shapes=max_shapes, strict=strict)
        else:
            self.runtime.configure(max_shapes=max_shapes, strict=strict)
        return self.runtime.build(StaticShape(height, width, batch_size, num_inference_steps,
                                              sampler, bool(guidance)))

    # -- pieces -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts, clip_skip=0):
        """Prompts → text states (B, 77, D) in the pipeline's dtype."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip).to(self.dtype)

    def default_size(self):
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def _resolve(self, height, width, sampler):
        """Defaults filled in and checked: (height, width, sampler)."""
        dh, dw = self.default_size()
        height = dh if height is None else height
        width = dw if width is None else width
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v % f or not f <= v <= MAX_SIDE:
                raise SdrtError(f"{name} must be a multiple of {f} between {f} and {MAX_SIDE}, "
                                f"got {v}")
        sampler = sampler or default_sampler(self.scheduler_config)
        if sampler not in SAMPLERS:
            raise SdrtError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        return height, width, sampler

    def _preprocess(self, image, height, width):
        """PIL image(s), float array(s) (H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [0, 1]
        → tensor (B, 3, H, W) in [-1, 1]."""
        from PIL import Image
        images = image if isinstance(image, list) else [image]
        f = self.vae_scale_factor
        if all(isinstance(i, Image.Image) for i in images):
            w0, h0 = images[0].size
            size = (width or w0 - w0 % f, height or h0 - h0 % f)
            if min(size) < f:
                raise SdrtError(f"init image of {w0}x{h0} is smaller than {f} pixels")
            arrays = [np.asarray(i.convert("RGB").resize(size, Image.LANCZOS)
                                 if i.size != size else i.convert("RGB"), dtype=np.float32) / 255
                      for i in images]
            t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        elif all(isinstance(i, np.ndarray) for i in images):
            arrays = [a[None] if a.ndim == 3 else a for a in images]
            if any(a.ndim != 4 for a in arrays):
                raise SdrtError("an image array must be (H, W, 3) or (B, H, W, 3)")
            t = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32))
            t = t.permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            t = (image[None] if image.dim() == 3 else image).float()
        else:
            raise SdrtError("image must be PIL image(s), float array(s) in [0, 1] or a tensor")
        if t.dim() != 4 or t.shape[1] != 3:
            raise SdrtError(f"image must have 3 channels, got shape {tuple(t.shape)}")
        return (t * 2 - 1).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, image, generator):
        """Image (B, 3, H, W) in [-1, 1] → scaled latents, sampled from the VAE's Gaussian."""
        mean, std = self.vae.encode(image)
        z = mean + std * cpu_randn(mean.shape, generator, self.dtype).to(self.device)
        shift = self.vae.config.shift_factor or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled latents → float32 images (B, H, W, 3) in [0, 1] on the CPU.

        A low-precision decode that overflows (inf/NaN: the known fp16 VAE failure) is done
        again in float32, so no request returns a black or NaN image.
        """
        image = vae_decode(self.vae, latents)
        if not torch.isfinite(image).all() and self.dtype != torch.float32:
            return self._decode_fp32(latents)
        return to_unit_images(image).cpu().numpy()

    def _decode_fp32(self, latents):
        if not isinstance(self.vae, nn.Module):
            raise SdrtError(f"the VAE decode overflowed in {self.dtype}; use a float32 VAE "
                            "(for ONNX, export with --dtype fp32)")
        warnings.warn(f"VAE decode overflowed in {self.dtype}; decoding again in float32")
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).float()
        return to_unit_images(vae_decode(self._vae_fp32, latents.float())).cpu().numpy()

    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _noise(self, latents, shape, generator):
        if latents is None:
            return cpu_randn(shape, generator, self.dtype).to(self.device)
        if tuple(latents.shape) != shape:
            raise SdrtError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(self.device, self.dtype)

    # -- the request --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height=None, width=None,
                 num_inference_steps=50, guidance_scale=7.5, sampler=None, seed=None,
                 latents=None, image=None, strength=0.8, num_images_per_prompt=1,
                 output_type="pil", generator=None, clip_skip=0, callback=None):
        """Generate images; see the README for each argument.

        Returns a list of PIL images (``"pil"``), a float32 array (B, H, W, 3) in [0, 1]
        (``"np"``), or the final latents (``"latent"``). ``generator`` (a CPU
        ``torch.Generator``) may replace ``seed``. ``callback(step, steps)`` runs after each
        eager step; a replayed static plan has no steps to report.
        """
        prompts = _as_list(prompt, "prompt")
        if output_type not in OUTPUT_TYPES:
            raise SdrtError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}")
        _positive_int(num_images_per_prompt, "num_images_per_prompt")
        _positive_int(num_inference_steps, "num_inference_steps")
        if image is not None and not 0 < strength <= 1:
            raise SdrtError(f"strength must be in (0, 1], got {strength}")
        layers = getattr(getattr(self.text_encoder, "config", None), "num_hidden_layers", None)
        if not isinstance(clip_skip, int) or clip_skip < 0 or \
                (layers is not None and clip_skip >= layers):
            raise SdrtError(f"clip_skip must be from 0 to {layers - 1 if layers else 'n'}, "
                            f"got {clip_skip}")
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
            raise SdrtError(f"seed must be an integer from 0 to 2**64 - 1, got {seed}")
        cfg = guidance_scale > 1.0
        negatives = []
        if cfg:
            negatives = [""] * len(prompts) if negative_prompt is None else \
                _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise SdrtError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

        init = None
        if image is not None:
            init = self._preprocess(image, height, width)
            height, width = init.shape[2], init.shape[3]
        height, width, sampler = self._resolve(height, width, sampler)
        if generator is None:
            if seed is None:
                seed = random.randrange(MAX_SEED)
            generator = torch.Generator("cpu").manual_seed(seed)
        self.last_seed = seed

        batch = len(prompts) * num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        # Static plans cover text-to-image with the final text layer; the rest runs eagerly.
        if self.runtime is not None and init is None and clip_skip == 0:
            return self._run_static(
                StaticShape(height, width, batch, num_inference_steps, sampler, cfg),
                negatives + prompts, num_images_per_prompt,
                self._noise(latents, shape, generator), guidance_scale, generator, output_type)

        schedule = make_schedule(self.scheduler_config, sampler, num_inference_steps,
                                 strength=strength if image is not None else 1.0,
                                 device=self.device)
        t0 = self._clock()
        # One text-encoder call for both halves: [negative..., positive...] as diffusers orders.
        states = self.encode_prompt(negatives + prompts, clip_skip)
        states = states.repeat_interleave(num_images_per_prompt, dim=0)
        t1 = self._clock()

        if init is not None:
            x0 = self.encode_image(init, generator)
            if batch % x0.shape[0]:
                raise SdrtError(f"{x0.shape[0]} init images do not divide a batch of {batch}")
            x0 = x0.repeat_interleave(batch // x0.shape[0], dim=0)
            x = schedule.noise_image(x0, self._noise(latents, shape, generator))
        else:
            x = schedule.noise_latents(self._noise(latents, shape, generator))

        model = guided(self.unet, states, guidance_scale, cfg, self.dtype)
        x = sample(sampler, model, x, schedule, generator=generator, callback=callback)
        t2 = self._clock()
        self.timings = {"text": t1 - t0, "denoise": t2 - t1, "decode": 0.0,
                        "unet_calls": len(schedule.timesteps)}
        if output_type == "latent":
            return x
        images = self.decode_latents(x.to(self.dtype))
        self.timings["decode"] = self._clock() - t2
        return self._format(images, output_type)

    @staticmethod
    def _format(images, output_type):
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray((i * 255).round().astype(np.uint8)) for i in images]

    def _run_static(self, shape, texts, per_prompt, noise, guidance_scale, generator,
                    output_type):
        """One text-to-image request through the static plan of its shape."""
        plan = self.runtime.plan_for(shape)
        ids = self.tokenizer(texts).repeat_interleave(per_prompt, dim=0)
        step_noise = None
        if plan.step_noise is not None:
            # The same CPU draws, in the same order, as the eager euler_a loop makes.
            step_noise = torch.stack([cpu_randn(plan.latent_shape, generator)
                                      for _ in range(plan.step_noise.shape[0])])
        self.timings = plan.run(ids, noise, guidance_scale, step_noise, clock=self._clock)
        self.timings["unet_calls"] = len(plan.schedule.timesteps)
        if output_type == "latent":
            return plan.latents.clone()
        if not plan.decode_finite():
            # The graph decoded in the pipeline's dtype and overflowed (clamping would have
            # turned inf into white and NaN into black): decode again in float32.
            return self._format(self._decode_fp32(plan.latents), output_type)
        images = plan.image.to("cpu", copy=True).numpy()  # the plan's buffer is reused
        return self._format(images, output_type)
