"""The bounded queue and the one worker thread that runs batches on the pipeline.

A request becomes a ``Job``: its rows (one per image: prompt, negative prompt, guidance scale,
seed, init image) and a ``BatchKey`` (what must be equal for rows to share one pipeline call:
size, steps, sampler, guidance on/off, image-to-image and its strength, clip skip). The worker
takes the oldest job, waits up to the batch window for compatible jobs, and runs as many of
them as fit in ``max_batch`` images as one call. Each row keeps its own seed (one CPU
generator per image) and guidance scale, so an image is the same whatever it is batched with.

Limits: at most ``max_queue`` jobs wait (``submit`` raises ``QueueFull`` past that); a job
still waiting at its deadline is failed with ``DeadlineExceeded`` instead of run; a cancelled
job (its client went away) leaves the queue at once. A batch that raises is run again one job
at a time, so one bad request fails alone; the worker itself never stops on an error.
"""
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("sdrt.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; the client should retry later (HTTP 429)."""


class DeadlineExceeded(Exception):
    """The job waited past its deadline (HTTP 503)."""


class NotAccepting(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclass(frozen=True)
class BatchKey:
    """What rows must share to run in one pipeline call."""
    height: int
    width: int
    steps: int
    sampler: str
    guidance: bool      # classifier-free guidance on (scale > 1) or off
    strength: float     # image-to-image strength; None for text-to-image
    clip_skip: int
    # 77-token text chunks of the prompts (A1111 syntax): a batch pads every prompt to its
    # longest, which would change a shorter prompt's image, so only equal counts batch.
    chunks: int = 1
    inpaint: bool = False  # whether the rows carry masks
    hires: object = None  # a text-to-image request's hires fix (engine.hires.Hires)
    masked_content: str = "original"  # inpainting: the pipeline's masked_content
    # A1111's resize mode 3: the init images' (width, height), encoded at that size and their
    # latents resized (the pipeline's latent_resize); None when they come at the key's size.
    latent_resize_from: tuple = None
    loras: tuple = ()  # ((name, scale), ...) the rows' LoRAs (Runner.lora_path names them)
    # ((name, weight, start, end, control mode, hires passes, region mask), ...): the rows'
    # ControlNets (Runner.controlnet_path names them), their scales, shares of the schedule,
    # control modes, parts in a hires fix (hires.pass_controls) and effective_region_masks
    # (a1111_controlnet.RegionMask, or None); each row brings its control images.
    controls: tuple = ()
    vae: str = None  # the VAE the rows decode with (Runner.vae_path names it); None: the model's
    # SDXL's micro-conditioning: (original_size, crops_coords_top_left, target_size), each
    # (h, w) / (top, left) or None for the default, then the negative's three (None: the
    # positive's)
    micro: tuple = (None,) * 6
    # ((name, weight, start, end, image encoder path, reference digest, region mask), ...):
    # the rows' IP-Adapters (Runner.controlnet_path names them), rows sharing their reference
    # images, and their effective_region_masks (a1111_controlnet.RegionMask, or None).
    image_prompts: tuple = ()
    prompt_syntax: str = "a1111"  # how the rows' prompts are read (ComfyUI's API: "comfy")
    freeu: tuple = None  # (b1, b2, s1, s2, style) of the UNet's FreeU (a workflow's), or None
    subseed_strength: float = 0.0  # A1111's variation strength (each row brings its subseed)
    pag_scale: float = 0.0  # perturbed-attention guidance (a workflow's), 0: off
    rescale: tuple = ()  # (factor, style) of the guidance's rescale (a workflow's), () for none
    # ((field, value), ...) replacing the model's scheduler config's (a workflow's
    # ModelSamplingDiscrete), () for none
    scheduler: tuple = ()
    # --refiner finishing the rows: (where it takes over, a fraction of the noise schedule,
    # its aesthetic score and negative one (None: the defaults)); None: the model alone
    refiner: tuple = None
    eta: float = 0.0  # A1111's eta where the rows run DDIM (its share of fresh noise)
    tiling: bool = False  # A1111's tiling: seamless images (pipe.enable_seamless_tiling)
    # A1111's seed resize: (height, width) whose noise is centred in the rows' (the pipeline's
    # seed_resize_from), None for none
    seed_resize_from: tuple = None
    noise_multiplier: float = 1.0  # image to image: A1111's initial_noise_multiplier
    zero_out_negative: bool = False  # the negative conditioning zeros (ConditioningZeroOut)


@dataclass(frozen=True)
class Row:
    """One image to make."""
    prompt: str
    negative_prompt: str
    guidance_scale: float
    seed: int
    init_image: object = None  # a PIL image, for image-to-image
    mask: object = None  # inpainting: a float array (H, W) in [0, 1], 1 where repainted
    mask_blur: int = None  # the blur that mask had, for the PNG info
    masked_padding: int = None  # inpainting only the masked area: its padding, for the same
    masked_content: str = None  # "fill" where the masked part was filled first, for the same
    control_images: tuple = ()  # one PIL image per ControlNet of the key, at the key's size
    control_info: tuple = ()  # (("ControlNet 0", text), ...) for the PNG info
    # with a hires fix: the control images framed at its second pass's size (A1111's units)
    hires_control_images: tuple = ()
    ip_images: tuple = ()  # one PIL reference image per IP-Adapter of the key
    # SDXL: the second text encoder's prompts (None: the prompts), as ComfyUI's
    # CLIPTextEncodeSDXL gives them
    prompt_2: str = None
    negative_prompt_2: str = None
    subseed: int = None  # A1111's variation seed, where the key's subseed_strength is above 0


class Job:
    """One request: its rows, its key, its deadline and the future its images arrive on."""

    def __init__(self, key: BatchKey, rows, timeout_s):
        self.key, self.rows = key, list(rows)
        self.enqueued = time.monotonic()
        self.deadline = self.enqueued + timeout_s
        self.future = concurrent.futures.Future()
        self.started = None  # when the worker took it

    def __len__(self):
        return len(self.rows)


class Scheduler:
    """``submit(job)`` and ``cancel(job)`` from any thread; one worker thread calls
    ``run_batch(key, rows)`` -> one result per row. ``planned_sizes(key)`` names the batch
    sizes with a static plan."""

    def __init__(self, run_batch, max_batch, max_queue, window_s, planned_sizes=None,
                 metrics=None):
        self.run_batch, self.max_batch, self.max_queue = run_batch, max_batch, max_queue
        self.window_s = window_s
        self.planned_sizes = planned_sizes or (lambda key: ())
        self.metrics = metrics
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._closing = False
        self._running = 0  # jobs taken by the worker and not yet answered
        self._thread = threading.Thread(target=self._work, name="sdrt-worker", daemon=True)

    # -- the callers' side --------------------------------------------------------------------

    def start(self):
        self._thread.start()

    def submit(self, job: Job):
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(job)
            self._depth_changed()
            if self.metrics is not None:
                self.metrics.accepted.inc()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job):
        """Drop a job that is still waiting (its client went away); a running one finishes."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._depth_changed()
            self._cond.notify_all()  # the worker may be waiting on this job's batch window
        job.future.cancel()
        return True

    def depth(self):
        with self._cond:
            return len(self._queue)

    def running(self):
        """Jobs the worker has taken and not yet answered."""
        return self._running

    def close(self, timeout=None):
        """Stop accepting, finish every job already accepted, stop the worker."""
        with self._cond:
            self._accepting = False
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------

    def _depth_changed(self):
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _work(self):
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
            self._run(batch)
            self._running = 0

    def _next_batch(self):
        """Under the lock: the next jobs to run together, or None when closing and empty."""
        while True:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            self._fail_expired()
            if not self._queue:
                continue
            first = self._queue[0]
            # Wait for batch mates: until the window closes or a full batch is there.
            until = first.enqueued + self.window_s
            while self.max_batch > 1 and not self._closing and self._queue \
                    and self._queue[0] is first and time.monotonic() < until \
                    and self._rows_like(first.key) < self.max_batch:
                self._cond.wait(until - time.monotonic())
            if not self._queue or self._queue[0] is not first:
                continue  # the first job was cancelled while we waited
            jobs = self._pick(first)
            for job in jobs:
                self._queue.remove(job)
                job.started = time.monotonic()
            self._depth_changed()
            self._running = len(jobs)
            return jobs

    def _fail_expired(self):
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            if self.metrics is not None:
                self.metrics.errors.labels("deadline").inc()
            job.future.set_exception(DeadlineExceeded(
                f"the request waited {now - job.enqueued:.1f} s in the queue, past its "
                f"deadline"))
        self._depth_changed()

    def _rows_like(self, key):
        return sum(len(j) for j in self._queue if j.key == key)

    def _pick(self, first):
        """The oldest job and, in arrival order, the compatible jobs that fit with it. When
        static plans exist for some batch sizes of this key, the batch is cut back to the
        largest such size it can reach by dropping later jobs (a plan replays; another size
        would build one)."""
        jobs, rows = [first], len(first)
        for job in self._queue:
            if job is not first and job.key == first.key and rows + len(job) <= self.max_batch:
                jobs.append(job)
                rows += len(job)
        planned = sorted(self.planned_sizes(first.key), reverse=True)
        if planned and rows not in planned:
            counts = [sum(len(j) for j in jobs[:i + 1]) for i in range(len(jobs))]
            for size in planned:
                if size in counts:
                    return jobs[:counts.index(size) + 1]
        return jobs

    def _run(self, jobs):
        try:
            if len(jobs) > 1:
                self._run_together(jobs)
            else:
                self._run_job(jobs[0])
        except BaseException as e:  # never let the worker die with jobs unanswered
            log.exception("sdrt serve: worker error")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)

    def _call(self, key, rows):
        results = self.run_batch(key, rows)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        return results

    def _fell_back(self):
        if self.metrics is not None:
            self.metrics.batch_fallbacks.inc()

    def _run_together(self, jobs):
        """Several jobs, ``max_batch`` rows at most, as one call; if it fails, each job alone."""
        try:
            results = self._call(jobs[0].key, [r for j in jobs for r in j.rows])
        except Exception as e:
            log.warning("sdrt serve: a batch of %d requests failed (%s); running them one by "
                        "one", len(jobs), e)
            self._fell_back()
            for job in jobs:
                self._run_job(job)
            return
        i = 0
        for job in jobs:
            job.future.set_result(results[i:i + len(job)])
            i += len(job)

    def _run_job(self, job):
        """One job, in calls of ``max_batch`` rows; a call that fails is run again one row at
        a time, and the job fails with the first row that fails alone."""
        results = []
        try:
            for i in range(0, len(job), self.max_batch):
                chunk = job.rows[i:i + self.max_batch]
                try:
                    results.extend(self._call(job.key, chunk))
                except Exception:
                    if len(chunk) == 1:
                        raise
                    self._fell_back()
                    for row in chunk:
                        results.extend(self._call(job.key, [row]))
        except Exception as e:
            job.future.set_exception(e)
            return
        job.future.set_result(results)
