"""Static shapes and CUDA graphs over a whole request.

``Pipeline.compile(height, width, ...)`` builds a ``StaticPlan`` for one shape: every buffer
is allocated once, the schedule lives on the device, and on a GPU three CUDA graphs are
captured (text encoder, the whole denoising loop with CFG and the sampler's updates, VAE
decode). A request then copies its inputs (token ids, initial noise, guidance scale) into the
static buffers and replays; nothing in between allocates or waits on the host. A plan is
built from a ``ModelSpec`` (the family and its networks), never from the pipeline. On a CPU the
same plan runs eagerly over the same buffers, which is how its logic is tested without a GPU.

Built plans are kept in a small LRU cache keyed by ``StaticShape``. A request whose shape was
not built is built on the spot (logged), or refused with ``SdrtError`` in strict mode.
"""
import dataclasses
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .conditioning import Conditioning, TextInputs, encode_text
from .control import scale_count
from .errors import SdrtError
from .families import Family
from .ip_adapter import cross_attentions
from .layers import level_grids
from .prompt_syntax import WeightedIds
from .samplers import make_schedule, sample
from .schedules import with_eta
from .stages import (Control, blank_inpaint_conditioning, guidance_rescaler, guided,
                     inpainting_unet, keep_unmasked, starts_from_noise, to_unit_images, vae_decode)

log = logging.getLogger("sdrt")


@dataclass(frozen=True)
class StaticShape:
    """Everything a captured request depends on; prompts, seeds and guidance scale are not."""
    height: int
    width: int
    batch_size: int  # images per request (prompts × images per prompt)
    num_inference_steps: int
    sampler: str
    guidance: bool  # whether the request batches an unconditional pass (CFG)
    num_chunks: int = 1  # 77-token text chunks per prompt (A1111 syntax: BREAK, > 75 tokens)
    # Image to image: the strength (which of the schedule's steps run); None: text to image.
    strength: float = None
    masked: bool = False  # inpainting: the request carries a mask
    controls: tuple = ()  # the names of the ControlNets it runs, in order
    guess_mode: bool = False  # ControlNets on the conditional half only
    # IP-Adapters: (name, image tokens) of each one the request runs, in order.
    image_prompts: tuple = ()
    # A1111's prompt editing: how many distinct sets of texts the calls read (1: no editing).
    text_variants: int = 1
    # Regional IP-Adapters: per adapter of image_prompts, its masks (0: none); () for none.
    image_regions: tuple = ()
    # Per ControlNet of controls, whether it has a region mask; () for none.
    control_masks: tuple = ()
    # ComfyUI's prompt weights (relative to the empty prompt's states, which are encoded too)
    comfy_weights: bool = False
    freeu: object = None  # the UNet's freeu.FreeU when the plan was built (its factors baked in)
    vae_tiling: bool = False  # whether the VAE runs in tiles (pipe.enable_vae_tiling)
    pag_scale: float = 0.0  # perturbed-attention guidance's scale (0: off)
    rescale: tuple = ()  # the guidance's rescale (factor, style), () for none
    seamless: bool = False  # circular padding (pipe.enable_seamless_tiling)
    eta: float = 0.0  # DDIM's eta (its share of fresh noise a step, drawn beforehand); else 0

    def describe(self):
        chunks = f", {self.num_chunks} text chunks" if self.num_chunks > 1 else ""
        image = ("" if self.strength is None else
                 f", {'inpainting' if self.masked else 'image to image'} at strength "
                 f"{self.strength:g}")
        control = (f", ControlNet {' + '.join(self.controls)}"
                   f"{' with region masks' if any(self.control_masks) else ''}"
                   f"{' in guess mode' if self.guess_mode else ''}" if self.controls else "")
        ip = (f", IP-Adapter {' + '.join(f'{n} ({k} tokens)' for n, k in self.image_prompts)}"
              if self.image_prompts else "")
        ip += (f" with masks {'/'.join(map(str, self.image_regions))}" if self.image_regions
               else "")
        ip += (f", prompt editing over {self.text_variants} texts" if self.text_variants > 1
               else "")
        ip += f", PAG {self.pag_scale:g}" if self.pag_scale else ""
        ip += (f", guidance rescaled by {self.rescale[0]:g} ({self.rescale[1]}'s)"
               if self.rescale else "")
        ip += ", seamless" if self.seamless else ""
        ip += f", eta {self.eta:g}" if self.eta else ""
        return (f"{self.width}x{self.height}, batch {self.batch_size}, "
                f"{self.num_inference_steps} steps of {self.sampler}, "
                f"{'with' if self.guidance else 'without'} CFG{chunks}{image}{control}{ip}")


@dataclass(frozen=True)
class ModelSpec:
    """What a static plan runs, given explicitly: the family (how prompts become conditioning),
    its networks, and the device and dtype they run in."""
    family: Family
    text_encoders: dict  # component name -> module, the family's text encoders
    unet: torch.nn.Module
    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    text_length: int = 77  # tokens per chunk
    vae_dtype: torch.dtype = None  # the VAE's, where it differs (an upcast SDXL VAE)
    controlnets: dict = None  # name -> ControlNetModel: those a shape's ``controls`` name


class StaticPlan:
    """Static buffers, a device-side schedule and (on CUDA) the captured graphs of one shape."""

    def __init__(self, model: ModelSpec, scheduler_config, shape: StaticShape):
        start = time.perf_counter()
        self.model, self.shape = model, shape
        self.scheduler_config = scheduler_config  # a new one means a new schedule
        dev, dtype = model.device, model.dtype
        unet, family = model.unet, model.family
        f = model.vae.config.scale_factor
        self.latent_shape = (shape.batch_size, unet.config.out_channels,
                             shape.height // f, shape.width // f)
        rows = shape.batch_size * (2 if shape.guidance else 1)
        self.rows = rows
        self.schedule = with_eta(make_schedule(
            scheduler_config, shape.sampler, shape.num_inference_steps,
            strength=1.0 if shape.strength is None else shape.strength, device=dev,
            align_your_steps=model.family.align_your_steps), shape.eta)
        # Inputs, written before each replay: token ids and weights (V·rows·n, 77) per
        # tokenizer, V the distinct sets of texts of an edited prompt (else 1),
        n, length, v = shape.num_chunks, model.text_length, shape.text_variants
        self.ids = {t: torch.zeros(v * rows * n, length, dtype=torch.long, device=dev)
                    for t in family.tokenizers}
        self.weights = {t: torch.ones(v * rows * n, length, dtype=torch.float32, device=dev)
                        for t in family.tokenizers}
        # ComfyUI's weights: the empty prompt's chunk (77,) per tokenizer; else None
        self.empty = ({t: torch.zeros(length, dtype=torch.long, device=dev)
                       for t in family.tokenizers} if shape.comfy_weights else None)
        # 0 on the rows whose conditioning is zeros (SDXL's empty negative prompt), else 1,
        self.keep = torch.ones(rows, dtype=torch.float32, device=dev)
        self.noise = torch.zeros(self.latent_shape, dtype=dtype, device=dev)
        # Inpainting with a UNet that sees no mask: the mask at the latents' size (1 where
        # repainted). Image to image: the init image's latents (encoded before the replay),
        # unless inpainting starts from pure noise (full strength) and keeps nothing.
        self.mask = (torch.zeros(shape.batch_size, 1, *self.latent_shape[2:], device=dev)
                     if shape.masked and not inpainting_unet(unet) else None)
        self.pure_noise = starts_from_noise(shape.strength, shape.masked)
        self.x0 = (torch.zeros(self.latent_shape, dtype=dtype, device=dev)
                   if shape.strength is not None and (not self.pure_noise or self.mask is not None)
                   else None)
        self.guidance_scale = torch.ones(shape.batch_size, 1, 1, 1, dtype=torch.float32,
                                         device=dev)  # one scale per image
        # The unit noise a stochastic sampler (euler_a, lcm) draws as it goes, drawn beforehand.
        draws = self.schedule.noise_draws
        self.step_noise = (torch.zeros((draws, *self.latent_shape), dtype=torch.float32,
                                       device=dev) if draws else None)
        # A guidance-distilled UNet's guidance-scale embedding (stages.guidance_embedding).
        cond_dim = unet.config.time_cond_proj_dim
        self.timestep_cond = (torch.zeros(shape.batch_size, cond_dim, dtype=dtype, device=dev)
                              if cond_dim is not None else None)
        # The conditioning: the text stage writes states (and pooled embeddings); the time ids
        # (SDXL's micro-conditioning) and the IP-Adapters' image tokens and scales are inputs.
        width = sum(e.config.hidden_size for e in model.text_encoders.values())
        pooled = (model.text_encoders[family.pooled].config.projection_dim
                  if family.pooled else None)
        self.cond = Conditioning(
            torch.zeros(rows, n * length, width, dtype=dtype, device=dev),
            torch.zeros(rows, pooled, dtype=dtype, device=dev) if pooled else None,
            torch.zeros(rows, family.num_time_ids, dtype=dtype, device=dev)
            if family.time_ids else None,
            tuple(torch.zeros(rows, k, unet.config.cross_attention_dim, dtype=dtype, device=dev)
                  for _, k in shape.image_prompts) or None,
            torch.zeros(rows, len(self.schedule.timesteps), len(cross_attentions(unet)),
                        len(shape.image_prompts), dtype=dtype, device=dev)
            if shape.image_prompts else None,
            tuple(torch.zeros(rows, k, sum(h * w for h, w in level_grids(
                *self.latent_shape[2:], len(unet.config.block_out_channels))),
                dtype=dtype, device=dev) for k in shape.image_regions) or None)
        # Prompt editing: each set of texts' states and pooled embeddings (V, rows, ...), and
        # which set each UNet call reads (gathered on the device, so a new prompt's edits
        # need no new capture).
        self.variants = self.variant_of_call = None
        if v > 1:
            self.variants = Conditioning(
                torch.zeros(v, *self.cond.states.shape, dtype=dtype, device=dev),
                None if pooled is None else torch.zeros(v, rows, pooled, dtype=dtype,
                                                        device=dev))
            self.variant_of_call = torch.zeros(len(self.schedule.timesteps), dtype=torch.long,
                                               device=dev)
        # An inpainting UNet's mask and masked-image latents: a request's own when it has a
        # mask; otherwise everything masked over a blank image (A1111's way), the same for
        # every request of the shape.
        self.image_cond = None
        if inpainting_unet(unet) and shape.masked:
            self.image_cond = torch.zeros(shape.batch_size, unet.config.in_channels
                                          - unet.config.out_channels, *self.latent_shape[2:],
                                          dtype=dtype, device=dev)
        elif inpainting_unet(unet):
            with torch.no_grad():
                self.image_cond = blank_inpaint_conditioning(
                    model.vae, model.vae_dtype or dtype, dev, shape.batch_size, shape.height,
                    shape.width, dtype)
        # ControlNets: each one's control images (B, 3, H, W) and the per-call factors of
        # their residuals (stages.Control).
        self.control = None
        if shape.controls:
            nets = [model.controlnets[name] for name in shape.controls]
            grids = level_grids(*self.latent_shape[2:], len(unet.config.block_out_channels))
            size = sum(h * w for h, w in grids)
            self.control = Control(
                nets, [torch.zeros(shape.batch_size, 3, shape.height, shape.width, dtype=dtype,
                                   device=dev) for _ in nets],
                torch.zeros(len(self.schedule.timesteps), len(nets), 2,
                            max(scale_count(n) for n in nets), device=dev), shape.guess_mode,
                tuple(torch.zeros(1, size, dtype=dtype, device=dev) if masked else None
                      for masked in shape.control_masks), grids)
        # Outputs.
        self.latents = torch.zeros(self.latent_shape, dtype=dtype, device=dev)
        self.image = torch.zeros(shape.batch_size, shape.height, shape.width, 3,
                                 dtype=torch.float32, device=dev)
        self.finite = torch.ones((), dtype=torch.bool, device=dev)
        self.graphs = None
        if dev.type == "cuda":
            self._capture()
        self.build_seconds = time.perf_counter() - start

    # -- the three stages, each free of host synchronisation -----------------------------------

    def _encode(self):
        # (V·rows, 77·n, D), weighted (A1111 emphasis; no host sync), joined per prompt
        n, length, v = self.shape.num_chunks, self.model.text_length, self.shape.text_variants
        inputs = TextInputs({t: WeightedIds(self.ids[t].view(v * self.rows, n, length),
                                            self.weights[t].view(v * self.rows, n, length),
                                            None if self.empty is None else self.empty[t])
                             for t in self.ids})
        states, pooled = encode_text(self.model.family, self.model.text_encoders, inputs)
        keep = self.keep.repeat(v)
        out = self.cond if v == 1 else self.variants.map(lambda t: t.flatten(0, 1))
        out.states.copy_(states * keep.to(states.dtype)[:, None, None])
        if pooled is not None:
            out.text_embeds.copy_(pooled * keep.to(pooled.dtype)[:, None])

    def _cond_of_call(self, call):
        """Prompt editing: the conditioning UNet call ``call`` reads (its set of texts
        gathered by a device index: no host sync)."""
        if call >= self.variant_of_call.shape[0]:
            raise SdrtError(f"prompt editing covers {self.variant_of_call.shape[0]} UNet calls; "
                            f"the sampler made more")
        which = self.variant_of_call[call:call + 1]
        pick = lambda t: None if t is None else t.index_select(0, which)[0]
        return dataclasses.replace(self.cond, states=pick(self.variants.states),
                                   text_embeds=pick(self.variants.text_embeds))

    def _denoise(self, step_end=None):
        cond = self.cond if self.variants is None else self._cond_of_call
        model = guided(self.model.unet, cond, self.guidance_scale, self.shape.guidance,
                       self.model.dtype, self.timestep_cond, self.image_cond, self.control,
                       pag_scale=self.shape.pag_scale,
                       rescale=guidance_rescaler(self.schedule, *self.shape.rescale or (0,)))
        if self.pure_noise:
            x = self.schedule.noise_latents(self.noise)
        else:
            x = self.schedule.noise_image(self.x0, self.noise)
        if self.mask is not None:
            step_end = keep_unmasked(self.schedule, self.x0, self.noise, self.mask, step_end)
        x = sample(self.shape.sampler, model, x, self.schedule, noise=self.step_noise,
                   step_end=step_end)
        self.latents.copy_(x)

    def _decode(self):
        image = vae_decode(self.model.vae, self.latents.to(self.model.vae_dtype or
                                                          self.model.dtype))
        self.finite.copy_(torch.isfinite(image).all())
        self.image.copy_(to_unit_images(image))

    def decode_finite(self):
        """Whether the last decode stayed finite (read once per request, after the replay)."""
        return bool(self.finite)

    def _stages(self):
        return (self._encode, self._denoise, self._decode)

    def _capture(self):
        """Warm up on a side stream (cuDNN/Triton autotuning, lazy allocations), then capture
        each stage into a graph sharing one memory pool."""
        device = self.model.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                for stage in self._stages():
                    stage()
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        with torch.no_grad():
            for stage in self._stages():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    stage()
                self.graphs.append(graph)

    # -- a request -----------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, inputs: TextInputs, noise, guidance_scale, step_noise=None,
            clock=time.perf_counter, step_end=None, timestep_cond=None, keep=None,
            time_ids=None, x0=None, mask=None, image_cond=None, control_images=None,
            control_scales=None, image_tokens=None, image_scales=None, variant_of_call=None,
            image_regions=None, control_regions=None, states=None, text_embeds=None):
        """Copy the request's inputs in, run (replay) the three stages.

        ``inputs``: token ids and weights (rows, n, 77) per tokenizer, one row per image and
        CFG half; ``keep`` (rows,): 0 where a row's text conditioning is zeros (default: all
        1); ``time_ids`` (rows, K): the micro-conditioning numbers of a family that has them.
        ``step_noise`` (``schedule.noise_draws`` unit-noise tensors, stacked) is the noise of
        a sampler that draws as it goes; ``timestep_cond`` (B, time_cond_proj_dim) the
        guidance embedding of a guidance-distilled UNet. Image to image: ``x0`` the init
        image's latents (B, C, h, w); inpainting: ``mask`` (B, 1, h, w), 1 where repainted, for
        a UNet that sees no mask, or ``image_cond`` (the mask and the masked image's latents)
        for one that does. ControlNets: ``control_images``, one (B, 3, H, W) batch per net,
        and ``control_scales``, their factors per UNet call (``stages.Control``), and
        ``control_regions`` their region masks' weights (per net, (1, Σ h·w) or None).
        IP-Adapters: ``image_tokens`` (per adapter (rows, n, D)) and ``image_scales`` (rows,
        UNet calls, cross-attention layers, adapters), the adapters attached to the UNet
        (``ip_adapter.attach``); regional ones' ``image_regions`` (per adapter (rows, masks,
        Σ h·w), ``ImagePromptRequest.regions``).
        Prompt editing: ``inputs`` hold the V sets of texts one after another, and
        ``variant_of_call`` (calls,) says which set each UNet call reads.
        Text states given (diffusers' ``prompt_embeds``): ``states`` (rows, 77·n, D) and, for
        a family that pools, ``text_embeds`` (rows, P), zeros and all, copied where the text
        stage writes; then the text stage does not run (``inputs`` empty).

        Returns the seconds each stage took, read with ``clock`` between stages. The results
        stay in the plan's buffers: ``latents`` and ``image`` (float32 (B, H, W, 3) in [0, 1]).
        ``step_end(step_index, timestep, latents)`` is called after each denoising step (see
        ``samplers.sample``). A replayed graph cannot call back into Python, so with
        ``step_end`` the denoising stage runs eagerly over the plan's buffers, between the
        replays of the text-encoder and decoder graphs.
        """
        for t, batch in inputs.items():
            self.ids[t].copy_(batch.ids.reshape(self.ids[t].shape))
            self.weights[t].copy_(batch.weights.reshape(self.weights[t].shape))
            if (batch.empty is None) != (self.empty is None):
                raise SdrtError("the prompts' weights are ComfyUI's where the plan's are not, or "
                                "the other way round: build the plan with the request's "
                                "prompt_syntax")
            if self.empty is not None:
                self.empty[t].copy_(batch.empty)
        if keep is None:
            self.keep.fill_(1.0)
        else:
            self.keep.copy_(keep)
        if self.cond.time_ids is not None:
            self.cond.time_ids.copy_(time_ids)
        self.noise.copy_(noise)
        self.guidance_scale.copy_(guidance_scale)
        if self.step_noise is not None:
            self.step_noise.copy_(step_noise)
        if self.timestep_cond is not None:
            self.timestep_cond.copy_(timestep_cond)
        # (A plan without a mask keeps its blank image_cond: it is not a request's.)
        given = {"x0": (self.x0, x0), "mask": (self.mask, mask),
                 "image_cond": (self.image_cond if self.shape.masked else None, image_cond)}
        if self.cond.image_tokens is not None:
            given["image_scales"] = (self.cond.image_scales, image_scales)
            for k, tokens in enumerate(self.cond.image_tokens):
                given[f"image_tokens[{k}]"] = (tokens, None if image_tokens is None
                                               else image_tokens[k])
            for k, weights in enumerate(self.cond.image_regions or ()):
                given[f"image_regions[{k}]"] = (weights, None if image_regions is None
                                                else image_regions[k])
        if self.variant_of_call is not None:
            given["variant_of_call"] = (self.variant_of_call, variant_of_call)
        if self.control is not None:
            given["control_scales"] = (self.control.scales, control_scales)
            for k, image in enumerate(self.control.images):
                given[f"control_images[{k}]"] = (image, None if control_images is None
                                                 else control_images[k])
            for k, weights in enumerate(self.control.regions):
                given[f"control_regions[{k}]"] = (weights, None if control_regions is None
                                                  else control_regions[k])
        for name, (buffer, value) in given.items():
            if buffer is not None:
                if value is None:
                    raise SdrtError(f"a plan for {self.shape.describe()} needs {name}")
                buffer.copy_(value)
        runs = [g.replay for g in self.graphs] if self.graphs else list(self._stages())
        if states is not None:
            if self.variants is not None:
                raise SdrtError("a plan for prompt editing encodes its own texts")
            self.cond.states.copy_(states)
            if self.cond.text_embeds is not None:
                self.cond.text_embeds.copy_(text_embeds)
            runs[0] = lambda: None
        if step_end is not None:
            runs[1] = lambda: self._denoise(step_end)
        marks = [clock()]
        for run in runs:
            run()
            marks.append(clock())
        return dict(zip(("text", "denoise", "decode"), (b - a for a, b in zip(marks, marks[1:]))))


class StaticRuntime:
    """An LRU cache of built ``StaticPlan``s for one model."""

    def __init__(self, model: ModelSpec, max_shapes=4, strict=False):
        self.model = model
        self.plans = OrderedDict()
        self.configure(max_shapes, strict)

    def configure(self, max_shapes, strict):
        """Change the cache's size and strictness, keeping the plans that still fit."""
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise SdrtError(f"max_shapes must be at least 1, got {max_shapes}")
        self.max_shapes, self.strict = max_shapes, strict
        self._trim()

    def _trim(self):
        while len(self.plans) > self.max_shapes:
            evicted, _ = self.plans.popitem(last=False)
            log.info("sdrt: dropped the static plan for %s", evicted.describe())

    def _cached(self, shape, scheduler_config):
        """The built plan of ``shape``, now the most recently used; None if there is none or
        it was built for another scheduler config."""
        plan = self.plans.get(shape)
        if plan is not None and plan.scheduler_config != scheduler_config:
            del self.plans[shape]
            plan = None
        if plan is not None:
            self.plans.move_to_end(shape)
        return plan

    def build(self, shape: StaticShape, scheduler_config) -> StaticPlan:
        plan = self._cached(shape, scheduler_config)
        if plan is None:
            plan = self.plans[shape] = StaticPlan(self.model, scheduler_config, shape)
            self._trim()
            log.info("sdrt: built a static plan for %s in %.2f s", shape.describe(),
                     plan.build_seconds)
        return plan

    def drop(self, which):
        """Drop the plans whose shape ``which(shape)`` picks (their networks changed)."""
        for shape in [s for s in self.plans if which(s)]:
            del self.plans[shape]
            log.info("sdrt: dropped the static plan for %s", shape.describe())

    def plan_for(self, shape: StaticShape, scheduler_config) -> StaticPlan:
        """The plan of a request's shape: built before, built now (with a warning saying what
        it cost), or, in strict mode, refused."""
        plan = self._cached(shape, scheduler_config)
        if plan is not None:
            return plan
        if self.strict:
            built = "; ".join(s.describe() for s in self.plans) or "none"
            raise SdrtError(f"no static plan for {shape.describe()} (strict mode; built: {built})")
        plan = self.build(shape, scheduler_config)
        warnings.warn(f"built a static plan for {shape.describe()} on demand in "
                      f"{plan.build_seconds:.2f} s; Pipeline.compile builds it ahead of time",
                      stacklevel=3)
        return plan
