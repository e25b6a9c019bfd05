"""Static shapes and CUDA graphs over a whole request.

``Pipeline.compile(height, width, ...)`` builds a ``StaticPlan`` for one shape: every buffer
is allocated once, the schedule lives on the device, and on a GPU three CUDA graphs are
captured (text encoder, the whole denoising loop with CFG and the sampler's updates, VAE
decode). A request then copies its inputs (token ids, initial noise, guidance scale) into the
static buffers and replays; nothing in between allocates or waits on the host. On a CPU the
same plan runs eagerly over the same buffers, which is how its logic is tested without a GPU.

Built plans are kept in a small LRU cache keyed by ``StaticShape``. A request whose shape was
not built is built on the spot (logged), or refused with ``SdrtError`` in strict mode.
"""
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .errors import SdrtError
from .samplers import make_schedule, sample
from .prompt_syntax import apply_weights
from .stages import guided, to_unit_images, vae_decode

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

    def describe(self):
        chunks = f", {self.num_chunks} text chunks" if self.num_chunks > 1 else ""
        return (f"{self.width}x{self.height}, batch {self.batch_size}, "
                f"{self.num_inference_steps} steps of {self.sampler}, "
                f"{'with' if self.guidance else 'without'} CFG{chunks}")


class StaticPlan:
    """Static buffers, a device-side schedule and (on CUDA) the captured graphs of one shape."""

    def __init__(self, pipe, shape: StaticShape):
        start = time.perf_counter()
        self.pipe, self.shape = pipe, shape
        self.scheduler_config = pipe.scheduler_config  # a new one means a new schedule
        dev, dtype = pipe.device, pipe.dtype
        f = pipe.vae_scale_factor
        self.latent_shape = (shape.batch_size, pipe.unet.config.in_channels,
                             shape.height // f, shape.width // f)
        rows = shape.batch_size * (2 if shape.guidance else 1)
        self.schedule = make_schedule(pipe.scheduler_config, shape.sampler,
                                      shape.num_inference_steps, device=dev)
        # Inputs, written before each replay.
        n, length = shape.num_chunks, pipe.tokenizer.max_length
        self.ids = torch.zeros(rows * n, length, dtype=torch.long, device=dev)
        self.weights = torch.ones(rows * n, length, dtype=torch.float32, device=dev)
        self.noise = torch.zeros(self.latent_shape, dtype=dtype, device=dev)
        self.guidance_scale = torch.ones(shape.batch_size, 1, 1, 1, dtype=torch.float32,
                                         device=dev)  # one scale per image
        # The unit noise a stochastic sampler (euler_a, lcm) draws as it goes, drawn beforehand.
        draws = self.schedule.noise_draws
        self.step_noise = (torch.zeros((draws, *self.latent_shape), dtype=torch.float32,
                                       device=dev) if draws else None)
        # A guidance-distilled UNet's guidance-scale embedding (stages.guidance_embedding).
        cond_dim = pipe.unet.config.time_cond_proj_dim
        self.timestep_cond = (torch.zeros(shape.batch_size, cond_dim, dtype=dtype, device=dev)
                              if cond_dim is not None else None)
        # Outputs of one stage, inputs of the next.
        self.states = torch.zeros(rows, n * length, pipe.text_encoder.config.hidden_size,
                                  dtype=dtype, device=dev)
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
        # (rows·n, 77, D), weighted (A1111 emphasis; no host sync), joined per prompt
        states = apply_weights(self.pipe.text_encoder(self.ids), self.weights)
        self.states.copy_(states.view(self.states.shape))

    def _denoise(self, step_end=None):
        model = guided(self.pipe.unet, self.states, self.guidance_scale, self.shape.guidance,
                       self.pipe.dtype, self.timestep_cond)
        x = self.schedule.noise_latents(self.noise)
        x = sample(self.shape.sampler, model, x, self.schedule, noise=self.step_noise,
                   step_end=step_end)
        self.latents.copy_(x)

    def _decode(self):
        image = vae_decode(self.pipe.vae, self.latents)
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
        side = torch.cuda.Stream(self.pipe.device)
        side.wait_stream(torch.cuda.current_stream(self.pipe.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                for stage in self._stages():
                    stage()
        torch.cuda.current_stream(self.pipe.device).wait_stream(side)
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
    def run(self, inputs, noise, guidance_scale, step_noise=None, clock=time.perf_counter,
            step_end=None, timestep_cond=None):
        """Copy the request's inputs in, run (replay) the three stages.

        ``step_noise`` (``schedule.noise_draws`` unit-noise tensors, stacked) is the noise of
        a sampler that draws as it goes; ``timestep_cond`` (B, time_cond_proj_dim) the
        guidance embedding of a guidance-distilled UNet.

        Returns the seconds each stage took, read with ``clock`` between stages. The results
        stay in the plan's buffers: ``latents`` and ``image`` (float32 (B, H, W, 3) in [0, 1]).
        ``step_end(step_index, timestep, latents)`` is called after each denoising step (see
        ``samplers.sample``). A replayed graph cannot call back into Python, so with
        ``step_end`` the denoising stage runs eagerly over the plan's buffers, between the
        replays of the text-encoder and decoder graphs.
        """
        # inputs: ids and weights (rows, n, 77), one row per image and CFG half
        self.ids.copy_(inputs.ids.reshape(self.ids.shape))
        self.weights.copy_(inputs.weights.reshape(self.weights.shape))
        self.noise.copy_(noise)
        self.guidance_scale.copy_(guidance_scale)
        if self.step_noise is not None:
            self.step_noise.copy_(step_noise)
        if self.timestep_cond is not None:
            self.timestep_cond.copy_(timestep_cond)
        runs = [g.replay for g in self.graphs] if self.graphs else list(self._stages())
        if step_end is not None:
            runs[1] = lambda: self._denoise(step_end)
        marks = [clock()]
        for run in runs:
            run()
            marks.append(clock())
        return dict(zip(("text", "denoise", "decode"), (b - a for a, b in zip(marks, marks[1:]))))


class StaticRuntime:
    """An LRU cache of built ``StaticPlan``s for one pipeline."""

    def __init__(self, pipe, max_shapes=4, strict=False):
        self.pipe = pipe
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

    def _cached(self, shape):
        """The built plan of ``shape``, now the most recently used; None if there is none or
        it was built for a scheduler config the pipeline no longer has."""
        plan = self.plans.get(shape)
        if plan is not None and plan.scheduler_config != self.pipe.scheduler_config:
            del self.plans[shape]
            plan = None
        if plan is not None:
            self.plans.move_to_end(shape)
        return plan

    def build(self, shape: StaticShape) -> StaticPlan:
        plan = self._cached(shape)
        if plan is None:
            plan = self.plans[shape] = StaticPlan(self.pipe, shape)
            self._trim()
            log.info("sdrt: built a static plan for %s in %.2f s", shape.describe(),
                     plan.build_seconds)
        return plan

    def plan_for(self, shape: StaticShape) -> StaticPlan:
        """The plan of a request's shape: built before, built now (with a warning saying what
        it cost), or, in strict mode, refused."""
        plan = self._cached(shape)
        if plan is not None:
            return plan
        if self.strict:
            built = "; ".join(s.describe() for s in self.plans) or "none"
            raise SdrtError(f"no static plan for {shape.describe()} (strict mode; built: {built})")
        plan = self.build(shape)
        warnings.warn(f"built a static plan for {shape.describe()} on demand in "
                      f"{plan.build_seconds:.2f} s; Pipeline.compile builds it ahead of time",
                      stacklevel=3)
        return plan
