"""Text-to-image and image-to-image Stable Diffusion, in plain PyTorch over sdrt's modules.

Semantics follow diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: the same
``latents`` (or the same seed on a CPU generator) give the same image.
"""
import copy
import random
import time
import warnings

import numpy as np
import torch

from .errors import SdrtError
from .layers import use_conv_chooser
from .loading import Components, load
from .runtime import StaticRuntime, StaticShape
from .samplers import SAMPLERS, SchedulerConfig, default_sampler, make_schedule, sample

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SIDE = 4096


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


def _decode(vae, latents):
    shift = vae.config.shift_factor or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift)


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
        self._vae_fp32 = None  # made on the first fp16 decode that overflows
        if device.type == "cuda":
            # Time the fused GroupNorm+SiLU conv against group_norm + cuDNN once per shape and
            # keep the faster, so no shape gets slower than the unfused path.
            from sdrt.kernels.conv_autotune import ConvPathChooser
            self.conv_chooser = ConvPathChooser()
            for model in (self.unet, self.vae):
                use_conv_chooser(model, self.conv_chooser)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, variant=None, config=None,
                        prediction_type=None):
        """Load a diffusers folder or a single-file LDM ``.safetensors`` checkpoint.

        ``variant="fp16"`` prefers ``*.fp16.safetensors`` files. For a single file, ``config``
        may name a diffusers folder whose configs (and tokenizer) to use. ``prediction_type``
        overrides the scheduler's (e.g. ``"epsilon"`` for an SD 2.x 512-base single file).
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
        dh, dw = self.default_size()
        height = dh if height is None else height
        width = dw if width is None else width
        self._check_size(height, width)
        sampler = sampler or default_sampler(self.scheduler_config)
        if sampler not in SAMPLERS:
            raise SdrtError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SdrtError(f"batch_size must be a positive integer, got {batch_size}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise SdrtError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if self.runtime is None or (self.runtime.strict, self.runtime.max_shapes) != \
                (strict, max_shapes):
            self.runtime = StaticRuntime(self, max_shapes=max_shapes, strict=strict)
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

    def _check_size(self, height, width):
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v % f or not f <= v <= MAX_SIDE:
                raise SdrtError(f"{name} must be a multiple of {f} between {f} and {MAX_SIDE}, "
                                f"got {v}")

    def _randn(self, shape, generator):
        # Drawn on the CPU generator, as diffusers does with a CPU generator: the same seed gives
        # the same noise on every device.
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def _preprocess(self, image, height, width):
        """PIL image(s), float array(s) (H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [0, 1]
        → tensor (B, 3, H, W) in [-1, 1]."""
        from PIL import Image
        images = image if isinstance(image, list) else [image]
        if all(isinstance(i, Image.Image) for i in images):
            w0, h0 = images[0].size
            f = self.vae_scale_factor
            size = (width or w0 - w0 % f, height or h0 - h0 % f)
            arrays = [np.asarray(i.convert("RGB").resize(size, Image.LANCZOS)
                                 if i.size != size else i.convert("RGB"), dtype=np.float32) / 255
                      for i in images]
            t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        elif isinstance(image, np.ndarray):
            a = image[None] if image.ndim == 3 else image
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            t = (image[None] if image.dim() == 3 else image).float()
        else:
            raise SdrtError("image must be a PIL image, a float array in [0, 1] or a tensor")
        if t.dim() != 4 or t.shape[1] != 3:
            raise SdrtError(f"image must have 3 channels, got shape {tuple(t.shape)}")
        return (t * 2 - 1).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, image, generator):
        """Image (B, 3, H, W) in [-1, 1] → scaled latents, sampled from the VAE's Gaussian."""
        mean, std = self.vae.encode(image)
        z = mean + std * self._randn(mean.shape, generator)
        shift = self.vae.config.shift_factor or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled latents → float32 images (B, H, W, 3) in [0, 1] on the CPU.

        A low-precision decode that overflows (inf/NaN: the known fp16 VAE failure) is done
        again in float32, so no request returns a black or NaN image.
        """
        image = _decode(self.vae, latents)
        if not torch.isfinite(image).all() and self.dtype != torch.float32:
            warnings.warn(f"VAE decode overflowed in {self.dtype}; decoding again in float32")
            if self._vae_fp32 is None:
                self._vae_fp32 = copy.deepcopy(self.vae).float()
            image = _decode(self._vae_fp32, latents.float())
        return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- the request --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height=None, width=None,
                 num_inference_steps=50, guidance_scale=7.5, sampler=None, seed=None,
                 latents=None, image=None, strength=0.8, num_images_per_prompt=1,
                 output_type="pil", generator=None, clip_skip=0, callback=None):
        """Generate images; see the README for each argument.

        Returns a list of PIL images (``"pil"``), a float32 array (B, H, W, 3) in [0, 1]
        (``"np"``), or the final latents (``"latent"``). ``generator`` (a CPU
        ``torch.Generator``) may replace ``seed``; ``callback(step, steps)`` runs after each step.
        """
        prompts = _as_list(prompt, "prompt")
        sampler = sampler or default_sampler(self.scheduler_config)
        if sampler not in SAMPLERS:
            raise SdrtError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if output_type not in OUTPUT_TYPES:
            raise SdrtError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise SdrtError("num_images_per_prompt must be a positive integer")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise SdrtError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if image is not None and not 0 < strength <= 1:
            raise SdrtError(f"strength must be in (0, 1], got {strength}")
        cfg = guidance_scale > 1.0
        negatives = None
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
        dh, dw = self.default_size()
        height = dh if height is None else height
        width = dw if width is None else width
        self._check_size(height, width)

        if generator is None:
            if seed is None:
                seed = random.randrange(2 ** 32)
            generator = torch.Generator("cpu").manual_seed(int(seed))
        self.last_seed = seed
        schedule = make_schedule(self.scheduler_config, sampler, num_inference_steps,
                                 strength=strength if image is not None else 1.0,
                                 device=self.device)

        batch = len(prompts) * num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        # Static plans cover text-to-image with the final text layer; the rest runs eagerly.
        if self.runtime is not None and init is None and clip_skip == 0:
            images = self._run_static(
                StaticShape(height, width, batch, num_inference_steps, sampler, cfg),
                (negatives or []) + prompts, num_images_per_prompt,
                self._noise(latents, shape, generator), guidance_scale, generator, output_type)
            return images if output_type == "latent" else self._format(images, output_type)

        t0 = self._clock()
        # One text-encoder call for both halves: [negative..., positive...] as diffusers orders.
        states = self.encode_prompt((negatives or []) + prompts, clip_skip)
        states = states.repeat_interleave(num_images_per_prompt, dim=0)
        t1 = self._clock()

        if init is not None:
            x0 = self.encode_image(init, generator)
            if batch % x0.shape[0]:
                raise SdrtError(f"{x0.shape[0]} init images do not divide a batch of {batch}")
            x0 = x0.repeat_interleave(batch // x0.shape[0], dim=0)
            noise = self._noise(latents, shape, generator)
            x = schedule.noise_image(x0, noise)
        else:
            x = schedule.noise_latents(self._noise(latents, shape, generator))

        def model(x_in, t):
            if not cfg:
                return self.unet(x_in.to(self.dtype), t, states)
            uncond, cond = self.unet(torch.cat([x_in, x_in]).to(self.dtype), t, states).chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        x = sample(sampler, model, x, schedule, generator=generator, callback=callback)
        t2 = self._clock()
        if output_type == "latent":
            self.timings = {"text": t1 - t0, "denoise": t2 - t1, "decode": 0.0}
            return x
        images = self.decode_latents(x.to(self.dtype))
        self.timings = {"text": t1 - t0, "denoise": t2 - t1, "decode": self._clock() - t2}
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
            step_noise = torch.stack([torch.randn(plan.latent_shape, generator=generator)
                                      for _ in range(plan.step_noise.shape[0])])
        self.timings = plan.run(ids, noise, guidance_scale, step_noise, clock=self._clock)
        if output_type == "latent":
            return plan.latents.clone()
        images = plan.image.to("cpu", copy=True).numpy()  # the plan's buffer is reused
        # The graph decoded in the pipeline's dtype; on overflow, decode again eagerly
        # (clamping would have turned inf into white and NaN into black).
        return images if plan.decode_finite() else self.decode_latents(plan.latents)

    def _noise(self, latents, shape, generator):
        if latents is None:
            return self._randn(shape, generator)
        if tuple(latents.shape) != shape:
            raise SdrtError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(self.device, self.dtype)
