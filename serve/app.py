"""The FastAPI app: OpenAI's Images API, A1111's ``/sdapi/v1``, ComfyUI's ``/prompt`` API
(``comfy_api.py``), ``/health`` and ``/metrics``.

``create_app(config)`` returns an app that holds no model yet: its lifespan starts a
``Server`` (model loading in a background thread, then the scheduler's worker), so the same
app object can be pickled into Ray Serve replicas, each of which loads its own model.

Every refusal is a JSON body in OpenAI's error shape, ``{"error": {"message", "type",
"param", "code"}, "detail"}``, with a one-line message naming the field: 400 for a value no
model can run, 422 for a body of the wrong shape or types, 401 without the API key, 413 for
a body past ``max_body_bytes``, 429 (with ``Retry-After``) when the queue is full, 503 while
loading, shutting down or past the request's deadline. Never a traceback.
"""
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.engine.errors import SdrtError
from sdrt.engine.hires import LATENT_UPSCALERS
from sdrt.engine.infotext import (SAMPLER_ALIASES, SAMPLER_LABELS, SCHEDULE_TYPES, Infotext,
                                  png_bytes, sampler_id, sampler_label, schedule_kind)
from sdrt.engine.request import (MAX_LORA_SCALE, MAX_SEED, SAMPLER_NAMES, GenerationRequest,
                                 Limits, sampler_choices, sampler_family, short_repr,
                                 split_sampler)

from . import a1111_sd_upscale, schemas
from .a1111_controlnet import parse as parse_controlnet
from .a1111_controlnet import script_args
from .a1111_extras import check_settings, model_titles
from .config import ServeConfig
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .runner import Runner
from .scheduler import BatchKey, DeadlineExceeded, Job, NotAccepting, QueueFull, Row, Scheduler

log = logging.getLogger("sdrt.serve")

# A1111's random seeds are below 2**32 - 2; so are ours, so any tool can type them back in.
_RANDOM_SEEDS = 4294967294
_OPENAI_NAMES = {"num_images_per_prompt": "n", "num_inference_steps": "steps",
                 "height": "size", "width": "size"}
_A1111_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale",
                "sampler": "sampler_name", "strength": "denoising_strength",
                "num_images_per_prompt": "batch_size",
                "clip_skip": "override_settings.CLIP_stop_at_last_layers"}
_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img",
              "/sdapi/v1/img2img", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes",
              "/sdapi/v1/options", "/sdapi/v1/samplers", "/sdapi/v1/schedulers",
              "/sdapi/v1/sd-models", "/sdapi/v1/loras", "/sdapi/v1/prompt-styles",
              "/sdapi/v1/png-info",
              "/sdapi/v1/progress", "/sdapi/v1/extra-single-image",
              "/sdapi/v1/extra-batch-images", "/prompt", "/view", "/queue", "/upload/image",
              "/object_info", "/system_stats", "/controlnet/model_list", "/health", "/metrics")
_OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")
# ComfyUI's routes, which its API also serves under /api/ (``_Guard`` maps them back)
_COMFY_ROUTES = ("prompt", "history", "view", "queue", "upload", "object_info",
                 "system_stats", "embeddings", "extensions", "models", "ws")
_POLL_S = 0.25  # how often a waiting request checks its client and its deadline


class ApiError(Exception):
    def __init__(self, status, message, kind, param=None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def _error_json(status, message, kind, param=None, headers=None):
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404:
             "invalid_request_error", 413:
             "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
    body = {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "param": param, "code": kind}, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(message):
    """The field an sdrt message names: its first word, without an index, unless that is a
    sampler's name (a message about what a sampler makes of the settings); else None."""
    word = message.split(" ", 1)[0].split("[", 1)[0]
    return word if word and split_sampler(word) is None else None


# -- the server: model, scheduler, metrics ---------------------------------------------------------

class Server:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.runner = Runner(config, self.metrics)
        self.scheduler = Scheduler(self._run_batch, config.max_batch, config.max_queue,
                                   config.batch_window_ms / 1000, self._planned_sizes,
                                   self.metrics)
        self.limits = Limits.from_env()
        self.options = {}  # A1111's settings set with POST /sdapi/v1/options
        self.styles = {}  # A1111's styles (--styles-file): {name: engine.styles.Style}
        if config.styles_file is not None:
            from sdrt.engine.styles import read_styles
            self.styles = read_styles(config.styles_file)
        self.status, self.failure = "loading", None
        self._loader = threading.Thread(target=self._load, name="sdrt-load", daemon=True)

    def start(self):
        self._loader.start()

    def _run_batch(self, key, rows):
        """The worker's call: a generation batch (``BatchKey``) runs on the runner's
        pipeline; any other key is work that runs itself with the runner in the same thread
        (``key.run(runner, rows)``: an Extras upscale, ``a1111_upscale.ExtrasJob``; a
        workflow's model upscale of its saved images, ``comfy_api._FinalUpscale``)."""
        if isinstance(key, BatchKey):
            return self.runner.run(key, rows)
        return key.run(self.runner, rows)

    def _planned_sizes(self, key):
        return self.runner.planned_sizes(key) if isinstance(key, BatchKey) else ()

    def _load(self):
        try:
            self.runner.load()
        except Exception as e:  # reported by /health; requests get 503
            log.exception("sdrt serve: loading the model failed")
            self.status, self.failure = "failed", f"{type(e).__name__}: {e}"
            return
        self.scheduler.start()
        self.status = "ok"
        self.metrics.ready.set(1)

    def close(self):
        """Stop accepting; finish what was accepted; stop the worker."""
        if self.status == "ok":
            self.status = "stopping"
        self.metrics.ready.set(0)
        self.scheduler.close()

    def text_layers(self):
        """How many layers the text encoders have (the shallowest's): clip skip's reach."""
        return min(e.config.num_hidden_layers for e in self.runner.pipe.text_encoders.values())

    def require_ready(self):
        if self.status != "ok":
            what = {"loading": "the model is still loading", "stopping": "the server is "
                    "shutting down", "failed": f"the model failed to load ({self.failure})"}
            raise ApiError(503, what[self.status], "not_ready", headers={"Retry-After": "5"})

    async def generate(self, request, key: BatchKey, rows):
        """Queue one job, wait for its images (watching the client, unless ``request`` is
        None for a job no client waits on, and the deadline)."""
        job = Job(key, rows, self.config.request_timeout_s)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", "queue_full", headers={"Retry-After": "1"})
        except NotAccepting as e:
            raise ApiError(503, str(e), "not_ready")
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=_POLL_S)
                if done:
                    break
                if request is not None and await request.is_disconnected():
                    self.scheduler.cancel(job)
                    raise ApiError(499, "the client disconnected", "disconnected")
                if time.monotonic() > job.deadline and self.scheduler.cancel(job):
                    raise ApiError(503, f"the request waited past its deadline of "
                                        f"{self.config.request_timeout_s:g} s", "deadline")
        except asyncio.CancelledError:  # Ray Serve cancels the handler of a client that left
            self.scheduler.cancel(job)
            raise
        try:
            images = waiter.result()
        except DeadlineExceeded as e:
            raise ApiError(503, str(e), "deadline")
        except SdrtError as e:
            raise ApiError(400, " ".join(str(e).split()), "bad_request", _param_of(str(e)))
        except Exception as e:
            log.error("sdrt serve: a request failed: %s: %s", type(e).__name__, e)
            raise ApiError(500, f"generation failed: {type(e).__name__}: "
                                f"{' '.join(str(e).split())}", "internal")
        self.metrics.stage_seconds.labels("queue").observe(
            (job.started or job.enqueued) - job.enqueued)
        return images

    def image_size(self, image, field, what=None):
        """(width, height) of an init image cut down to multiples of the VAE's scale factor:
        a request's size when it gives none, as the pipeline takes it; a 400 naming ``field``
        (``what``: the image, in the message) where that leaves nothing."""
        f = self.runner.pipe.vae_scale_factor
        if image.width < f or image.height < f:
            raise ApiError(400, f"{what or field} must be at least {f} pixels high and wide "
                                f"(the VAE's scale factor), got {image.width}x{image.height}",
                           "bad_request", field)
        return image.width - image.width % f, image.height - image.height % f

    def infotext(self, key, row, prompt=None, script=()):
        """A1111's PNG info of a row; ``prompt``: the prompt as given (with its LoRA tags),
        when it differs from the row's; ``script``: ((key, value), ...), a script's pairs."""
        return str(Infotext(
            prompt=row.prompt if prompt is None else prompt,
            negative_prompt=row.negative_prompt if key.guidance else "",
            lora_hashes=tuple((name, self.runner.lora_hash(name)) for name, _ in key.loras),
            steps=key.steps, sampler=key.sampler, cfg_scale=row.guidance_scale, seed=row.seed,
            width=key.width, height=key.height, model_name=self.runner.model_name,
            model_hash=self.runner.model_hash, denoising_strength=key.strength,
            clip_skip=key.clip_skip, mask_blur=row.mask_blur,
            masked_padding=row.masked_padding, masked_content=row.masked_content,
            # (A1111's extra generation params, in the order it adds them: the hires fix's,
            # a script's; Infotext writes both where A1111 writes that dict)
            hires=tuple(key.hires.params().items()) if key.hires else (), script=tuple(script),
            controlnets=row.control_info, vae_name=key.vae,
            vae_hash=self.runner.vae_hash(key.vae) if key.vae else None, subseed=row.subseed,
            subseed_strength=key.subseed_strength,
            refiner=self.runner.refiner_title() if key.refiner else None,
            eta_ddim=key.eta or None,
            tiling=key.tiling,
            seed_resize_from=key.seed_resize_from, noise_multiplier=key.noise_multiplier,
            refiner_switch_at=key.refiner[0] if key.refiner else None,
            ti_hashes=self.runner.embedding_hashes(
                (row.prompt, row.negative_prompt if key.guidance else "", row.prompt_2,
                 row.negative_prompt_2))))

    async def encode(self, images, texts):
        t0 = time.perf_counter()
        pngs = await run_in_threadpool(
            lambda: [base64.b64encode(png_bytes(im, t)).decode("ascii")
                     for im, t in zip(images, texts)])
        self.metrics.stage_seconds.labels("encode").observe(time.perf_counter() - t0)
        return pngs

    # -- turning API fields into a checked request ------------------------------------------------

    def check(self, names, **fields):
        """``GenerationRequest.check`` and the model's checks; returns the checked request.
        The memory check is for the largest pipeline call the request makes."""
        try:
            req = GenerationRequest(**fields).check(names=names, limits=self.limits)
            per_call = replace(req, num_images_per_prompt=min(req.num_images_per_prompt,
                                                              self.config.max_batch))
            checked = self.runner.check(per_call, names)
        except SdrtError as e:
            raise ApiError(400, " ".join(str(e).split()), "bad_request", _param_of(str(e)))
        return replace(checked, num_images_per_prompt=req.num_images_per_prompt)

    def check_second_pass(self, hires, req, names):
        """A hires fix's second pass checked as a request of its own (``check``: its size,
        steps and memory); ``names`` name the fields that set them."""
        width, height, _, _ = hires.target(req.width, req.height,
                                           self.runner.pipe.vae_scale_factor)
        steps, _ = hires.schedule_steps(req.num_inference_steps)
        self.check(names, prompt=hires.prompt or req.prompt, height=height, width=width,
                   num_inference_steps=steps, guidance_scale=req.guidance_scale,
                   num_images_per_prompt=req.num_images_per_prompt, strength=hires.strength,
                   has_image=True)

    def chunks(self, req):
        """The checked request's number of 77-token text chunks (part of its batch key); a
        prompt the syntax refuses (a weight that is not finite, an embedding not loaded) is a
        400 naming the prompt."""
        try:
            return self.runner.pipe.text_inputs(req.texts(), req.prompt_syntax).num_chunks
        except SdrtError as e:
            raise ApiError(400, " ".join(str(e).split()), "bad_request", "prompt")

    def seeds(self, seed, n, name):
        base = random.randrange(_RANDOM_SEEDS) if seed is None or seed == -1 else seed
        if base + n - 1 > MAX_SEED:
            raise ApiError(400, f"{name} must be at most 2**64 - {n} for {n} images (image i "
                                f"uses {name} + i), got {base}", "bad_request", name)
        return [base + i for i in range(n)]

    def sampler(self, name, field, schedule_type=None, schedule_field="scheduler"):
        """The sdrt sampler an A1111 sampler name and schedule type (1.9's ``scheduler``) ask
        for; None for the model's own. A schedule type without a sampler applies to the
        model's own sampler."""
        kind = schedule_kind(schedule_type)
        if name is None and kind == "automatic":
            return None
        sid = sampler_id(name) if name is not None else None
        if name is not None and sid is None:
            labels = ", ".join(SAMPLER_LABELS[s] for s in SAMPLER_NAMES)
            raise ApiError(400, f"{field} must be one of {labels} (or sdrt's "
                                f"{sampler_choices()}), got {short_repr(name)}",
                           "bad_request", field)
        if kind is None:
            raise ApiError(400, f"{schedule_field} must be {' or '.join(SCHEDULE_TYPES)}, got "
                                f"{short_repr(schedule_type)}", "bad_request", schedule_field)
        if name is None:
            from sdrt.engine.samplers import default_sampler
            sid = default_sampler(self.runner.pipe.scheduler_config)
        resolved = sampler_id(sid if name is None else name, schedule_type)
        if resolved is None:
            raise ApiError(400, f"{schedule_field}: sampler {sampler_label(sid)} has no "
                                f"{schedule_type} variant in sdrt; use Automatic or Uniform, got "
                                f"{short_repr(schedule_type)}", "bad_request", schedule_field)
        return resolved


# -- the app ---------------------------------------------------------------------------------------

class _Guard:
    """ASGI middleware: the API key, the body size limit, and per-endpoint status counts."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    def _authorized(self, scope):
        """No API key set, an open path, or 'Authorization: Bearer <key>' (websockets too)."""
        if self.config.api_key is None or scope["path"] in _OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.config.api_key}".encode())

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if path.startswith("/api/") and path[4:].split("/", 2)[1] in _COMFY_ROUTES:
            # ComfyUI serves every route under /api too, which its newer clients call
            scope = {**scope, "path": path[4:], "raw_path": path[4:].encode()}
        if scope["type"] == "websocket" and not self._authorized(scope):
            await receive()  # the handshake, refused: the client sees HTTP 403
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = getattr(scope["app"].state, "server", None)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start" and server is not None:
                server.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        def refuse(status, message, kind):
            if server is not None:
                server.metrics.errors.labels(kind).inc()
            return _error_json(status, message, kind,
                               headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

        if not self._authorized(scope):
            given = dict(scope["headers"]).get(b"authorization", b"")
            what = "missing" if not given else "wrong"
            response = refuse(401, f"Authorization must be 'Bearer <API key>' (the key given "
                                   f"to sdrt serve --api-key), got a {what} one",
                              "unauthorized")
            return await response(scope, receive, counted_send)
        limit = self.config.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = refuse(413, f"the request body must be at most {limit} bytes, got "
                                   f"{int(length)}", "too_large")
            return await response(scope, receive, counted_send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"the request body must be at most "
                                                      f"{limit} bytes, got more")
            return message
        await self.app(scope, limited_receive, counted_send)


def _validation_message(exc: RequestValidationError):
    """FastAPI's list of errors -> one line naming the first bad field."""
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                    for i, p in enumerate(loc)) or "the request body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body must be valid JSON " \
               f"({err.get('ctx', {}).get('error', 'decode error')})", None
    if kind == "missing":
        return f"{field} is required", field
    allowed = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
               "float_parsing": "a number", "string_type": "a string", "bool_type":
               "true or false", "list_type": "a list", "dict_type": "an object",
               "model_type": "a JSON object", "model_attributes_type": "a JSON object",
               "int_from_float": "an integer"}.get(kind)
    if kind == "literal_error":
        allowed = f"one of {err.get('ctx', {}).get('expected', '')}"
    if allowed is None:
        allowed = f"valid ({err.get('msg', kind)})"
    return f"{field} must be {allowed}, got {short_repr(err.get('input'))}", field or None


def create_app(config: ServeConfig = None) -> FastAPI:
    config = config or ServeConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server = app.state.server = Server(config)
        server.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.close)

    app = FastAPI(title="sdrt", version="0.1.0", lifespan=lifespan,
                  description="Stable Diffusion over OpenAI's Images API and AUTOMATIC1111's "
                              "API, with batching. Errors: see ErrorResponse.")
    app.add_middleware(_Guard, config=config)
    errors = {c: {"model": schemas.ErrorResponse} for c in (400, 401, 413, 422, 429, 503)}

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        request.app.state.server.metrics.errors.labels(exc.kind).inc()
        return _error_json(exc.status, str(exc), exc.kind, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        request.app.state.server.metrics.errors.labels("validation").inc()
        return _error_json(422, message, "validation", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "bad_request")
        request.app.state.server.metrics.errors.labels(kind).inc()
        detail = str(exc.detail)
        if exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            detail = (f"{request.method} {request.url.path} is not served by sdrt: it serves "
                      f"OpenAI's, A1111's and ComfyUI's endpoints listed at GET /docs")
        return _error_json(exc.status_code, detail, kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("sdrt serve: %s: %s", type(exc).__name__, exc)
        request.app.state.server.metrics.errors.labels("internal").inc()
        return _error_json(500, f"internal error: {type(exc).__name__}", "internal")

    def server_of(request) -> Server:
        return request.app.state.server

    from .comfy_api import register as register_comfy  # ComfyUI's /prompt, /history, /view
    register_comfy(app, server_of, ApiError)
    from .a1111_extras import register as register_a1111_extras  # options, PNG info, lists
    register_a1111_extras(app, server_of, ApiError, Server.text_layers)
    from .a1111_controlnet import register as register_controlnet  # the extension's lists
    register_controlnet(app, server_of)
    from .a1111_upscale import register as register_upscale  # upscalers, Extras
    register_upscale(app, server_of, ApiError)

    # -- OpenAI ---------------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=schemas.ImagesResponse,
              responses=errors, tags=["OpenAI"])
    async def images_generations(body: schemas.ImageGenerationRequest, request: Request):
        """OpenAI's image generation; ``openai.OpenAI(base_url=...).images.generate(...)``."""
        server = server_of(request)
        server.require_ready()
        t0 = time.perf_counter()
        _check_openai_formats(body)
        req = _openai_request(server, body, *_size(body.size, server))
        seeds = server.seeds(req.seed, body.n, "seed")
        key = BatchKey(req.height, req.width, req.num_inference_steps, req.sampler,
                       req.guidance, None, 0, server.chunks(req), rescale=_rescale(req))
        rows = [Row(body.prompt, body.negative_prompt or "", req.guidance_scale, s)
                for s in seeds]
        return await _openai_images(server, request, t0, key, rows)

    @app.post("/v1/images/edits", response_model=schemas.ImagesResponse, responses=errors,
              tags=["OpenAI"])
    async def images_edits(request: Request):
        """OpenAI's image edit, multipart/form-data: ``image`` (one file) and ``prompt``, and
        an optional ``mask`` PNG whose transparent pixels mark what is repainted
        (inpainting); ``openai.OpenAI(base_url=...).images.edit(...)``. Without a mask the
        whole image is redrawn (image-to-image at ``strength``)."""
        server = server_of(request)
        server.require_ready()
        t0 = time.perf_counter()
        form = await _read_form(request)
        body = _form_body(form)
        _check_openai_formats(body)
        image = _one_file(form, "image")
        raw_mask = _one_file(form, "mask", required=False)
        image = (await run_in_threadpool(_decode_bytes, await image.read(), "image",
                                         server.limits))
        mask = None
        if raw_mask is not None:
            mask = await run_in_threadpool(_openai_mask, await raw_mask.read(), image.size,
                                           server.limits)
        elif _has_alpha(image) and image.getextrema()[-1][0] < 255:
            # OpenAI: without a mask, the image's own transparency marks what is edited
            mask = await run_in_threadpool(_alpha_mask, image)
        width, height = _size(body.size, server)
        if width is None:
            width, height = server.image_size(image, "image")
        req = _openai_request(server, body, width, height, has_image=True,
                              strength=_given(body.strength, 1.0 if mask is not None else 0.8))
        seeds = server.seeds(req.seed, body.n, "seed")
        job = None
        if mask is not None:  # pasted back through the mask: the kept pixels stay exact
            job = (await run_in_threadpool(_inpaint_jobs, [image], mask, req, False, 0))[0]
            image, mask = job.image, job.mask
        key = BatchKey(req.height, req.width, req.num_inference_steps, req.sampler,
                       req.guidance, req.strength, 0, server.chunks(req),
                       inpaint=mask is not None, rescale=_rescale(req))
        rows = [Row(body.prompt, body.negative_prompt or "", req.guidance_scale, s, image, mask)
                for s in seeds]
        return await _openai_images(server, request, t0, key, rows,
                                    job.finish if job is not None else None)

    # -- AUTOMATIC1111 --------------------------------------------------------------------------

    async def a1111(request, body: schemas.A1111Request, init_images=None, strength=None,
                    mask=None):
        server = server_of(request)
        server.require_ready()
        t0 = time.perf_counter()
        _check_unsupported(body)
        if body.styles:
            body = _styled(server, body)
        sampler = server.sampler(body.sampler_name or body.sampler_index, "sampler_name",
                                 body.scheduler)
        _check_sampler_settings(server, body, sampler)
        if body.override_settings is not None:  # (refused, never ignored: as the options)
            check_settings(server, body.override_settings,
                           lambda message, param: ApiError(400, message, "bad_request", param),
                           Server.text_layers, "override_settings")
        clip_skip = _clip_skip(body.override_settings, server.text_layers(),
                               server.options.get("CLIP_stop_at_last_layers", 1))
        if not 1 <= body.n_iter <= server.limits.max_images:
            raise ApiError(400, f"n_iter must be an integer from 1 to "
                                f"{server.limits.max_images}, got {body.n_iter}", "bad_request",
                           "n_iter")
        n = body.batch_size * body.n_iter
        if body.batch_size >= 1 and n > server.limits.max_images:
            raise ApiError(400, f"batch_size × n_iter must be at most {server.limits.max_images} "
                                f"images (SDRT_MAX_IMAGES), got {body.batch_size} × "
                                f"{body.n_iter}", "bad_request", "batch_size")
        prompt, loras = _prompt_loras(server, body.prompt)
        width, height = body.width, body.height
        if init_images and width is None and height is None:
            width, height = server.image_size(init_images[0], "init_images")
        req = server.check(
            _A1111_NAMES, prompt=prompt, negative_prompt=body.negative_prompt or None,
            height=height, width=width,
            num_inference_steps=_given(body.steps, server.runner.default_steps),
            guidance_scale=_given(body.cfg_scale, server.runner.default_guidance, 7.0),
            sampler=sampler, seed=body.seed,
            num_images_per_prompt=body.batch_size * body.n_iter, clip_skip=clip_skip,
            strength=strength if strength is not None else 0.8,
            has_image=init_images is not None, subseed=body.subseed,
            subseed_strength=body.subseed_strength,
            seed_resize_from=_seed_resize(server, body),
            initial_noise_multiplier=_given(getattr(body, "initial_noise_multiplier", None),
                                            1.0))
        enable_hr = isinstance(body, schemas.Txt2ImgRequest) and body.enable_hr
        hires = _hires(server, body, req) if enable_hr else None
        script = None  # A1111's SD upscale: req's size is its tiles'
        if a1111_sd_upscale.named(body.script_name):
            script = await run_in_threadpool(a1111_sd_upscale.check_request, server, body, req,
                                             init_images, mask)
        refiner = _refiner(server, body, hires or script or init_images)
        seeds = server.seeds(req.seed, script.seed_span() if script else n, "seed")
        if script is not None and req.subseed_strength:
            raise ApiError(400, "subseed_strength must be 0 with SD upscale (its tiles draw "
                                "their own seeds)", "bad_request", "subseed_strength")
        if script is not None and req.seed_resize_from:
            raise ApiError(400, "seed_resize_from_w must be -1 with SD upscale (its tiles draw "
                                "their own seeds)", "bad_request", "seed_resize_from_w")
        subseeds = (server.seeds(body.subseed, n, "subseed") if req.subseed_strength
                    else [-1] * n)
        from sdrt.engine.images import RESIZE_MODES  # (numpy: imported once serving)
        from sdrt.engine.inpaint import MASKED_CONTENT
        from sdrt.engine.stages import inpainting_unet
        resize = RESIZE_MODES[body.resize_mode] if init_images else None
        # inpainting_fill numbers A1111's masked content in MASKED_CONTENT's order.
        content = list(MASKED_CONTENT)[body.inpainting_fill] if mask is not None else "original"
        fill, masked_content = MASKED_CONTENT[content]
        latent_size = None
        if resize == "latent" and mask is None and script is None:  # a key per size
            latent_size = _one_size(init_images)
        controls = hints = units = sources = hires_hints = ()
        prompts = ((), ())
        args = script_args(body.alwayson_scripts)
        if args is not None:
            controls, hints, units, sources, prompts = await run_in_threadpool(
                parse_controlnet, server, args, init_images, req.width, req.height, ApiError,
                mask is None)
        if hires and sources:  # the maps framed again at the second pass's size
            hires_hints = await run_in_threadpool(
                _hires_maps, sources, hires, req, server.runner.pipe.vae_scale_factor)
        key = BatchKey(req.height, req.width, req.num_inference_steps, req.sampler,
                       req.guidance, req.strength if init_images else None, req.clip_skip,
                       server.chunks(req), inpaint=mask is not None, hires=hires,
                       masked_content=masked_content, latent_resize_from=latent_size,
                       loras=loras, controls=controls,
                       vae=sd_vae(server, body.override_settings, "override_settings"),
                       image_prompts=prompts[0], subseed_strength=req.subseed_strength,
                       refiner=refiner, eta=_ddim_eta(server, body, sampler),
                       tiling=_tiling(server, body, script), seed_resize_from=req.seed_resize_from,
                       noise_multiplier=req.initial_noise_multiplier)
        extra, jobs = dict(hires.params()) if hires else {}, None
        if refiner is not None:
            extra.update({"Refiner": server.runner.refiner_title(),
                          "Refiner switch at": refiner[0]})
        if mask is not None:  # one job per init image; image i inpaints init image i mod n
            only = body.inpaint_full_res
            jobs = await run_in_threadpool(_inpaint_jobs, init_images, mask, req, only,
                                           body.inpaint_full_res_padding, fill, resize)
            init_images = [job.image for job in jobs]
            if sources:  # each job's control images, framed (and cut) as its init image
                hints = await run_in_threadpool(lambda: [
                    tuple(job.frame_like(p, m) for p, m in sources) for job in jobs])
            extra["Mask blur"] = body.mask_blur
            if content != "original":
                extra["Masked content"] = content
            if only:
                extra.update({"Inpaint area": "Only masked",
                              "Masked area padding": body.inpaint_full_res_padding})
        elif init_images and script is None:  # A1111's resize mode (not for SD upscale's tiles)
            init_images = await run_in_threadpool(_frame_images, init_images, req, resize)
        if script is not None:  # one picture per n_iter, blended from its redrawn tiles
            first = Row(prompt, body.negative_prompt, req.guidance_scale, seeds[0])
            images, texts, seeds = await a1111_sd_upscale.run(
                server, request, script, key, first, init_images[0], body.prompt)
            n = len(images)
            extra.update(script.params())
        else:
            rows = [Row(prompt, body.negative_prompt, req.guidance_scale, s,
                        init_images[i % len(init_images)] if init_images else None,
                        jobs[i % len(jobs)].mask if jobs else None, extra.get("Mask blur"),
                        extra.get("Masked area padding"), extra.get("Masked content"),
                        hints[i % len(jobs)] if jobs and sources else hints, units,
                        hires_hints, prompts[1], subseed=subseeds[i])
                    for i, s in enumerate(seeds)]
            extra.update(units)
            images = await server.generate(request, key, rows)
            if jobs:
                images = await run_in_threadpool(
                    lambda: [jobs[i % len(jobs)].finish(im) for i, im in enumerate(images)])
            texts = [server.infotext(key, r, body.prompt) for r in rows]
        pngs = await server.encode(images, texts) if body.send_images else []
        parameters = body.model_dump()
        if "init_images" in parameters:  # as A1111: not echoed back
            parameters["init_images"] = None
        info = {
            "prompt": body.prompt, "all_prompts": [body.prompt] * n,
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * n,
            "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0],
            "all_subseeds": subseeds, "subseed_strength": req.subseed_strength,
            "width": req.width, "height": req.height,
            "sampler_name": sampler_label(req.sampler), "cfg_scale": req.guidance_scale,
            "steps": req.num_inference_steps, "batch_size": body.batch_size,
            "restore_faces": False, "sd_model_name": server.runner.model_name,
            "seed_resize_from_w": req.seed_resize_from[1] if req.seed_resize_from else -1,
            "seed_resize_from_h": req.seed_resize_from[0] if req.seed_resize_from else -1,
            "sd_model_hash": server.runner.model_hash,
            "denoising_strength": (hires.strength if hires else
                                   req.strength if init_images else None),
            "extra_generation_params": extra,
            "index_of_first_image": 0, "infotexts": texts,
            "styles": body.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": req.clip_skip + 1,
            "is_using_inpainting_conditioning": inpainting_unet(server.runner.pipe.unet),
            "version": "sdrt 0.1.0",
        }
        server.metrics.stage_seconds.labels("total").observe(time.perf_counter() - t0)
        return schemas.A1111Response(images=pngs, parameters=parameters, info=json.dumps(info))

    @app.post("/sdapi/v1/txt2img", response_model=schemas.A1111Response, responses=errors,
              tags=["AUTOMATIC1111"])
    async def txt2img(body: schemas.Txt2ImgRequest, request: Request):
        """A1111's text-to-image; ``images`` are base64 PNGs with their ``parameters``."""
        return await a1111(request, body)

    @app.post("/sdapi/v1/img2img", response_model=schemas.A1111Response, responses=errors,
              tags=["AUTOMATIC1111"])
    async def img2img(body: schemas.Img2ImgRequest, request: Request):
        """A1111's image-to-image, and inpainting with a ``mask``."""
        server = server_of(request)
        server.require_ready()
        if not body.init_images:
            raise ApiError(400, "init_images must hold at least one image, got []",
                           "bad_request", "init_images")
        if body.resize_mode not in (0, 1, 2, 3):
            raise ApiError(400, f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 "
                                f"(resize and fill) or 3 (just resize, latent upscale), got "
                                f"{short_repr(body.resize_mode)}", "bad_request", "resize_mode")
        mask = None
        if body.mask is not None:
            _check_inpaint_fields(body)
            mask = await run_in_threadpool(_read_mask, body, server.limits)
        images = await run_in_threadpool(_decode_images, body.init_images, server.limits)
        return await a1111(request, body, images, body.denoising_strength, mask)

    @app.get("/sdapi/v1/samplers", response_model=list[schemas.SamplerItem],
             tags=["AUTOMATIC1111"])
    async def samplers():
        return [schemas.SamplerItem(name=SAMPLER_LABELS[s], aliases=[s, *SAMPLER_ALIASES[s]])
                for s in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers", response_model=list[schemas.SchedulerItem],
             tags=["AUTOMATIC1111"])
    async def schedulers():
        """A1111's schedule types (``scheduler``, from 1.9 on), by its names and labels:
        Automatic (each sampler's default, as A1111's: Karras for DPM++ 2M, Exponential for
        the SDE DPM-Solvers ...), Uniform (the sampler's own spacing), Karras (for the
        samplers with such a variant) and the sigma schedules every sampler but DDIM, PLMS
        and LCM runs along."""
        return [schemas.SchedulerItem(
            name=label.lower().replace(" ", "_"), label=label,
            aliases=["SGMUniform"] if label == "SGM Uniform" else None,
            default_rho={"Karras": 7.0, "Polyexponential": 1.0}.get(label, -1.0),
            need_inner_model=label in ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM",
                                       "Beta"))
            for label in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/sd-models", response_model=list[schemas.SdModelItem],
             tags=["AUTOMATIC1111"])
    async def sd_models(request: Request):
        server = server_of(request)
        server.require_ready()
        r = server.runner
        models = [schemas.SdModelItem(title=f"{r.model_name} [{r.model_hash}]",
                                      model_name=r.model_name, hash=r.model_hash,
                                      sha256=r.model_sha256,
                                      filename=config.model or "built-in")]
        if r.refiner is not None:  # (what refiner_checkpoint names)
            models.append(schemas.SdModelItem(title=f"{r.refiner_name} [{r.refiner_hash}]",
                                              model_name=r.refiner_name, hash=r.refiner_hash,
                                              sha256=r.refiner_sha256, filename=config.refiner))
        return models

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111"])
    async def loras(request: Request):
        """The LoRAs prompts may name with ``<lora:NAME:SCALE>`` (--lora-dir's files)."""
        runner = server_of(request).runner
        return [{"name": name, "alias": name, "path": runner.lora_path(name), "metadata": {}}
                for name in await run_in_threadpool(runner.lora_names)]

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[schemas.LatentUpscaleModeItem],
             tags=["AUTOMATIC1111"])
    async def latent_upscale_modes():
        """The hires fix's latent upscalers (``hr_upscaler``)."""
        return [schemas.LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/options", tags=["AUTOMATIC1111"])
    async def options(request: Request):
        """The A1111 settings clients read: the model loaded, clip skip and the VAE (the
        server's, POST /sdapi/v1/options sets them; a request sets its own with
        override_settings), the image format."""
        server = server_of(request)
        server.require_ready()
        r = server.runner
        return {"sd_model_checkpoint": f"{r.model_name} [{r.model_hash}]",
                "sd_checkpoint_hash": r.model_sha256,
                "CLIP_stop_at_last_layers": server.options.get("CLIP_stop_at_last_layers", 1),
                "sd_vae": server.options.get("sd_vae", "Automatic"),
                "samples_format": "png"}

    # -- the server's own -----------------------------------------------------------------------

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}},
             tags=["server"])
    async def health(request: Request):
        """200 once the model is loaded and the ``--compile`` plans are built; 503 before."""
        server = server_of(request)
        runtime = server.runner.pipe.runtime if server.runner.pipe is not None else None
        body = schemas.Health(
            status=server.status, model=server.runner.model_name, pid=os.getpid(),
            queue_depth=server.scheduler.depth(), detail=server.failure,
            static_plans=[s.describe() for s in runtime.plans] if runtime else [])
        return JSONResponse(body.model_dump(), status_code=200 if server.status == "ok" else 503)

    @app.get("/metrics", tags=["server"])
    async def metrics(request: Request):
        """Prometheus text format."""
        return Response(server_of(request).metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def _openai_request(server, body, width, height, **image_fields):
    """The checked request of an OpenAI body: its fields, and sdrt's extras."""
    return server.check(
        _OPENAI_NAMES, prompt=body.prompt, negative_prompt=body.negative_prompt,
        height=height, width=width,
        num_inference_steps=_given(body.steps, server.runner.default_steps),
        guidance_scale=_given(body.guidance_scale, server.runner.default_guidance, 7.5),
        sampler=server.sampler(body.sampler, "sampler"), seed=body.seed,
        num_images_per_prompt=body.n, guidance_rescale=_given(body.guidance_rescale, 0.0),
        **image_fields)


def _rescale(req):
    """``BatchKey.rescale`` of a checked request: diffusers' guidance rescale where it has
    one (and guidance to rescale)."""
    return (req.guidance_rescale, "diffusers") if req.guidance_rescale and req.guidance else ()


async def _openai_images(server, request, t0, key, rows, finish=None):
    """Generate ``rows`` and answer as OpenAI does; ``finish`` (an inpainting job's) turns
    each image into the one returned."""
    images = await server.generate(request, key, rows)
    if finish is not None:
        images = await run_in_threadpool(lambda: [finish(im) for im in images])
    pngs = await server.encode(images, [server.infotext(key, r) for r in rows])
    server.metrics.stage_seconds.labels("total").observe(time.perf_counter() - t0)
    return schemas.ImagesResponse(created=int(time.time()),
                                  data=[schemas.ImageData(b64_json=p) for p in pngs])


def _check_openai_formats(body):
    if body.response_format == "url":
        raise ApiError(400, "response_format must be b64_json: this server keeps no images to "
                            "link to, got 'url'", "bad_request", "response_format")
    if body.output_format not in (None, "png"):
        raise ApiError(400, f"output_format must be png, got {short_repr(body.output_format)}",
                       "bad_request", "output_format")
    if body.background not in (None, "auto", "opaque"):
        raise ApiError(400, f"background must be auto or opaque (sdrt draws no transparency), "
                            f"got {short_repr(body.background)}", "bad_request", "background")


async def _read_form(request):
    """The multipart form of an edit; 400 for any other body."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise ApiError(400, f"the request body must be multipart/form-data (the image and mask "
                            f"are files), got {short_repr(kind or 'no content-type')}",
                       "bad_request", None)
    try:
        return await request.form()
    except (ValueError, KeyError, AssertionError) as e:
        raise ApiError(400, f"the request body must be a valid multipart form ({e})",
                       "bad_request", None)


def _form_body(form):
    """The form's text fields, checked as an ``ImageEditRequest`` (422 naming the field)."""
    from pydantic import ValidationError
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    try:
        return schemas.ImageEditRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _one_file(form, field, required=True):
    """The one uploaded file of ``field`` (OpenAI's SDK sends a list as ``field[]``)."""
    from starlette.datastructures import UploadFile
    items = form.getlist(field) + form.getlist(f"{field}[]")
    files = [f for f in items if isinstance(f, UploadFile)]
    if len(files) != len(items):
        raise ApiError(400, f"{field} must be an uploaded file, got a text field",
                       "bad_request", field)
    if not files and not required:
        return None
    if len(files) != 1:
        raise ApiError(400, f"{field} must be one image file, got {len(files)}",
                       "bad_request", field)
    return files[0]


def _openai_mask(raw, size, limits):
    """OpenAI's mask: a PNG of the image's size whose transparent pixels (alpha 0) mark what
    is repainted → float (H, W), 1 there."""
    im = _decode_bytes(raw, "mask", limits)
    if not _has_alpha(im):
        raise ApiError(400, f"mask must be a PNG with an alpha channel (transparent where the "
                            f"image is edited), got mode {im.mode}", "bad_request", "mask")
    if im.size != size:
        raise ApiError(400, f"mask must have the image's size {size[0]}x{size[1]}, got "
                            f"{im.width}x{im.height}", "bad_request", "mask")
    return _alpha_mask(im)


def _has_alpha(im):
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _alpha_mask(im):
    """A picture's transparency as OpenAI's mask: float (H, W), 1 where alpha is 0."""
    import numpy as np
    alpha = np.asarray(im.convert("RGBA"))[..., 3]
    return 1 - alpha.astype(np.float32) / 255


def _given(value, *defaults):
    """``value``, or else the first default that is not None."""
    return next(v for v in (value, *defaults) if v is not None)


def _size(size, server):
    """OpenAI's ``size`` -> (width, height); None for 'auto' (the model's native size)."""
    if size is None or size == "auto":
        return None, None
    w, sep, h = size.partition("x")
    top = server.limits.max_side
    if not sep or not w.isdigit() or not h.isdigit() or not 1 <= int(w) <= top \
            or not 1 <= int(h) <= top:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' with sides from 8 to {top} "
                            f"(multiples of 8), or 'auto', got {short_repr(size)}",
                       "bad_request", "size")
    return int(w), int(h)


def sd_vae(server, settings, field=None):
    """A1111's ``sd_vae`` (in ``settings``, else the server's, set with POST
    /sdapi/v1/options): the --vae-dir VAE a request decodes with; None for the model's own
    ("Automatic" or "None"). A 400 names ``field`` (None: the setting itself)."""
    value = (settings or {}).get("sd_vae", server.options.get("sd_vae", "Automatic"))
    if value in (None, "Automatic", "None"):
        return None
    if server.runner.vae_path(value) is None:
        names = ", ".join(server.runner.vae_names()) or "none: the server has no --vae-dir"
        raise ApiError(400, f"{field + '.' if field else ''}sd_vae must be Automatic, None or "
                            f"one of --vae-dir's VAEs ({names}), got {short_repr(value)}",
                       "bad_request", field or "sd_vae")
    return value


def _clip_skip(settings, layers, default=1):
    """A1111's ``CLIP_stop_at_last_layers`` (1 = the last of the text encoder's ``layers``;
    ``default``: the server's, set with POST /sdapi/v1/options) -> sdrt's count of layers to
    skip."""
    value = (settings or {}).get("CLIP_stop_at_last_layers", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= layers:
        raise ApiError(400, f"override_settings.CLIP_stop_at_last_layers must be an integer "
                            f"from 1 to {layers} (the text encoder has {layers} layers), got "
                            f"{short_repr(value)}", "bad_request", "override_settings")
    return value - 1


def _prompt_loras(server, prompt):
    """A1111's ``<lora:NAME:SCALE>`` tags of a prompt → (the prompt without them, the
    LoRAs checked by ``check_loras``)."""
    from sdrt.engine.infotext import lora_tags
    try:
        text, tags = lora_tags(prompt)
    except ValueError as e:
        raise ApiError(400, f"prompt: {e}", "bad_request", "prompt") from None
    return text, check_loras(server, tags, "prompt")


def check_loras(server, loras, field):
    """[(name, scale), ...] → ((name, scale), ...): each a LoRA file of --lora-dir, named
    once, its scale (one number, or (UNet's, text encoders')) finite, at most ``max_loras``
    of them; a 400 naming ``field`` else."""
    out = {}
    for name, scale in loras:
        if server.config.lora_dir is None:
            raise ApiError(400, f"{field} applies LoRA {name!r}, but the server has no LoRAs "
                                f"(sdrt serve --lora-dir DIR)", "bad_request", field)
        if server.runner.lora_path(name) is None:
            raise ApiError(400, f"{field} applies LoRA {name!r}, which --lora-dir does not "
                                f"have (GET /sdapi/v1/loras lists them)", "bad_request", field)
        if name in out:
            raise ApiError(400, f"{field} applies LoRA {name!r} twice", "bad_request", field)
        for s in (scale if isinstance(scale, tuple) else (scale,)):
            if not math.isfinite(s) or abs(s) > MAX_LORA_SCALE:
                raise ApiError(400, f"{field} applies LoRA {name!r} at a scale that must be a "
                                    f"number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, "
                                    f"got {s}", "bad_request", field)
        out[name] = tuple(map(float, scale)) if isinstance(scale, tuple) else float(scale)
    if len(out) > server.config.max_loras:
        raise ApiError(400, f"{field} applies {len(out)} LoRAs, more than the "
                            f"{server.config.max_loras} a request may", "bad_request", field)
    return tuple(out.items())


def _check_inpaint_fields(body):
    """The A1111 inpainting settings sdrt runs: the others are refused, not ignored."""
    from sdrt.engine.images import MAX_MASK_BLUR
    from sdrt.engine.inpaint import MAX_PADDING
    for field, ok, allowed in (
            ("mask_blur", 0 <= body.mask_blur <= MAX_MASK_BLUR,
             f"an integer from 0 to {MAX_MASK_BLUR}"),
            ("inpainting_mask_invert", body.inpainting_mask_invert in (0, 1), "0 or 1"),
            ("inpainting_fill", body.inpainting_fill in (0, 1, 2, 3),
             "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)"),
            ("inpaint_full_res_padding", 0 <= body.inpaint_full_res_padding <= MAX_PADDING,
             f"an integer from 0 to {MAX_PADDING}")):
        if not ok:
            raise ApiError(400, f"{field} must be {allowed}, got "
                                f"{short_repr(getattr(body, field))}", "bad_request", field)
    if body.resize_mode == 3 and not body.inpaint_full_res:
        raise ApiError(400, "resize_mode 3 (latent upscale) cannot inpaint the whole picture "
                            "(inpaint_full_res false): use resize_mode 0, 1 or 2, or inpaint "
                            "only the masked area", "bad_request", "resize_mode")


# A1111 fields of features sdrt does not have, and the values that leave them off.
_OFF_VALUES = {"restore_faces": (None, False),
               "script_name": (None, "", "None")}
_FEATURES = {"restore_faces": "face restoration",
             "script_name": "any script but SD upscale",
             "alwayson_scripts": "always-on scripts (ControlNet, ...)"}


def _styled(server, body):
    """The request with A1111's ``styles`` (--styles-file's) applied to its prompts as A1111
    applies them (``engine.styles``): the prompt, the negative prompt and a hires fix's own
    where given (otherwise its second pass reads the styled first ones)."""
    from sdrt.engine.styles import apply
    if not server.styles:
        raise ApiError(400, f"styles: this server has no styles (sdrt serve --styles-file FILE), "
                            f"got {short_repr(body.styles)}", "bad_request", "styles")
    prompt, negative = body.prompt, body.negative_prompt or ""
    try:
        most = server.limits.max_prompt_chars
        update = dict(zip(("prompt", "negative_prompt"),
                          apply(server.styles, body.styles, prompt, negative, max_chars=most)))
        hires = (getattr(body, "hr_prompt", ""), getattr(body, "hr_negative_prompt", ""))
        if any(hires):
            update.update(zip(("hr_prompt", "hr_negative_prompt"), apply(
                server.styles, body.styles, hires[0] or prompt, hires[1] or negative,
                max_chars=most)))
    except SdrtError as e:
        raise ApiError(400, str(e), "bad_request", "styles")
    return body.model_copy(update=update)


def _seed_resize(server, body):
    """A1111's ``seed_resize_from_h`` and ``_w`` → (height, width), or None where either is
    unset or at most 0 (off, as A1111 reads them); a 400 naming the field outside
    [the VAE's scale factor, SDRT_MAX_SIDE]."""
    sides = {"seed_resize_from_h": body.seed_resize_from_h,
             "seed_resize_from_w": body.seed_resize_from_w}
    if any(v is None or v <= 0 for v in sides.values()):
        return None
    low, high = server.runner.pipe.vae_scale_factor, server.limits.max_side
    for field, value in sides.items():
        if not low <= value <= high:
            raise ApiError(400, f"{field} must be -1 (off) or from {low} to {high} pixels, got "
                                f"{value}", "bad_request", field)
    return sides["seed_resize_from_h"], sides["seed_resize_from_w"]


def _tiling(server, body, script):
    """A1111's ``tiling`` (seamless images: ``BatchKey.tiling``), refused where its pictures
    are made of tiles, each of which would wrap around itself: VAE tiling, SD upscale."""
    if not body.tiling:
        return False
    for clash, what in ((server.runner.config.vae_tiling, "this server's VAE tiling "
                         "(sdrt serve --vae-tiling)"), (script is not None, "SD upscale")):
        if clash:
            raise ApiError(400, f"tiling cannot be combined with {what} yet (each tile would "
                                f"wrap around itself, not the picture)", "bad_request", "tiling")
    return True


def _refiner(server, body, other):
    """A1111's refiner_checkpoint and refiner_switch_at → ``BatchKey.refiner`` (None without
    a refiner): the checkpoint must be the server's --refiner (by name or title), the switch
    a fraction of the noise schedule in (0, 1), A1111's 0.8 by default. ``other``: whether
    the request also runs a hires fix, a script or image to image (not yet with it)."""
    name = body.refiner_checkpoint
    if name in (None, "", "None"):
        return None
    runner = server.runner
    if runner.refiner is None:
        raise ApiError(400, f"refiner_checkpoint: this server runs no refiner (sdrt serve "
                            f"--refiner PATH), got {short_repr(name)}", "bad_request",
                       "refiner_checkpoint")
    title = runner.refiner_title()
    if name not in (runner.refiner_name, title) and \
            os.path.splitext(os.path.basename(name))[0] != runner.refiner_name:
        raise ApiError(400, f"refiner_checkpoint must be the server's refiner {title!r}, got "
                            f"{short_repr(name)}", "bad_request", "refiner_checkpoint")
    switch = 0.8 if body.refiner_switch_at is None else body.refiner_switch_at
    if not (isinstance(switch, (int, float)) and 0 < switch < 1):
        raise ApiError(400, f"refiner_switch_at must be a number in (0, 1), got "
                            f"{short_repr(switch)}", "bad_request", "refiner_switch_at")
    if other:
        raise ApiError(400, "refiner_checkpoint: the refiner finishes text to image only (not "
                            "yet a hires fix, a script or image to image)", "bad_request",
                       "refiner_checkpoint")
    if sd_vae(server, body.override_settings, "override_settings") is not None:
        raise ApiError(400, "override_settings.sd_vae: the refiner decodes with its own VAE "
                            "(not yet another beside refiner_checkpoint)", "bad_request",
                       "override_settings")
    return float(switch), None, None


def _pass_samplers(server, body, sampler):
    """The samplers a request's passes run: its own (the model's for None), and the hires
    fix's."""
    from sdrt.engine.samplers import default_sampler
    samplers = [sampler or default_sampler(server.runner.pipe.scheduler_config)]
    hires = getattr(body, "hr_sampler_name", None)
    if getattr(body, "enable_hr", False) and hires:
        samplers.append(server.sampler(hires, "hr_sampler_name"))
    return samplers


def _ddim_eta(server, body, sampler):
    """A1111's ``eta`` where a pass runs DDIM (which adds that share of fresh noise a step,
    ``schedules.with_eta``; A1111's "Eta for DDIM" is 0 when none is given), else 0."""
    if not body.eta or all(sampler_family(s) != "ddim"
                           for s in _pass_samplers(server, body, sampler)):
        return 0.0
    if not 0 <= body.eta <= 1:
        raise ApiError(400, f"eta must be a number from 0 to 1, got {short_repr(body.eta)}",
                       "bad_request", "eta")
    return float(body.eta)


def _check_sampler_settings(server, body, sampler):
    """A1111's eta, s_churn and s_noise: refused where the sampler (the model's own for None,
    and the hires fix's) reads another value than sdrt runs it at."""
    from sdrt.engine.infotext import sampler_setting_problem
    for sid in _pass_samplers(server, body, sampler):
        problem = sampler_setting_problem(sid, body.eta, body.s_churn, body.s_noise)
        if problem is not None:
            field, runs = problem
            raise ApiError(400, f"{field} must be {runs:g} (or null) for {sampler_label(sid)}: "
                                f"sdrt runs it at A1111's default, got "
                                f"{short_repr(getattr(body, field))}", "bad_request", field)


def _check_unsupported(body):
    """A field of a feature sdrt does not have is refused unless it leaves the feature off:
    silently ignoring it would return a different picture than the client asked for."""
    for field, off in _OFF_VALUES.items():
        if not hasattr(body, field):  # (a field of the other endpoint's)
            continue
        if field == "script_name" and a1111_sd_upscale.named(body.script_name):
            continue  # the one script sdrt runs: a1111_sd_upscale checks it
        value = getattr(body, field)
        if value not in off:
            raise ApiError(400, f"{field} must be off ({' or '.join(map(json.dumps, off))}): "
                                f"{_FEATURES[field]} is not supported, got {short_repr(value)}",
                           "bad_request", field)
    for name, script in (body.alwayson_scripts or {}).items():
        if isinstance(name, str) and name.lower() == "controlnet":
            continue  # a1111_controlnet reads its units
        args = script.get("args") if isinstance(script, dict) else None
        if isinstance(name, str) and name.lower() == "adetailer" and isinstance(args, list) \
                and args and args[0] is False:
            continue  # ADetailer's first argument switches it: off
        if not isinstance(script, dict) or script.get("args"):
            raise ApiError(400, f"alwayson_scripts must hold no script with arguments: "
                                f"{_FEATURES['alwayson_scripts']} are not supported, got "
                                f"{short_repr(name)}", "bad_request", "alwayson_scripts")


def _hires(server, body, req):
    """A txt2img request's hires fix (``enable_hr``), checked, its second pass's size and
    memory too; an upscale model (``hr_upscaler`` naming a file of --upscaler-dir) from its
    file's header."""
    from sdrt.engine.hires import UPSCALERS, Hires

    from .a1111_upscale import check_model
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint") and \
            body.hr_checkpoint_name not in model_titles(server.runner, server.config.model):
        raise ApiError(400, f"hr_checkpoint_name must be null, '' or 'Use same checkpoint' "
                            f"or name the loaded model (the server runs one model), got "
                            f"{short_repr(body.hr_checkpoint_name)}", "bad_request",
                       "hr_checkpoint_name")
    names = {"scale": "hr_scale", "upscaler": "hr_upscaler", "steps": "hr_second_pass_steps",
             "strength": "denoising_strength", "resize_x": "hr_resize_x",
             "resize_y": "hr_resize_y", "sampler": "hr_sampler_name", "prompt": "hr_prompt",
             "negative_prompt": "hr_negative_prompt"}
    # A1111 1.9: the second pass's sampler and schedule type, each the first pass's unless
    # given (no hr_sampler: the first pass's sampler, its schedule type applied).
    hr_sampler, hr_scheduler = body.hr_sampler_name or None, body.hr_scheduler
    if hr_scheduler in (None, "Use same scheduler"):
        hr_scheduler = body.scheduler if hr_sampler else None
    elif hr_sampler is None:
        hr_sampler = body.sampler_name or body.sampler_index
    upscaler = body.hr_upscaler or "Latent"
    models = () if upscaler in UPSCALERS else server.runner.upscaler_names()
    if upscaler in models:
        check_model(server, upscaler, "hr_upscaler")
    try:
        hires = Hires(scale=body.hr_scale, upscaler=upscaler,
                      steps=body.hr_second_pass_steps,
                      strength=_given(body.denoising_strength, 0.75),
                      resize_x=body.hr_resize_x, resize_y=body.hr_resize_y,
                      sampler=server.sampler(hr_sampler, "hr_sampler_name", hr_scheduler,
                                             "hr_scheduler"),
                      prompt=body.hr_prompt, negative_prompt=body.hr_negative_prompt,
                      ).check(names, server.limits.max_side, server.limits.max_steps, models)
    except SdrtError as e:
        raise ApiError(400, str(e), "bad_request", _param_of(str(e)))
    second = {"height": "hr_scale", "width": "hr_scale",
              "num_inference_steps": "hr_second_pass_steps"}
    server.check_second_pass(hires, req, {**_A1111_NAMES, **second})
    return hires


def _inpaint_jobs(init_images, mask, req, only_masked, padding, fill=False,
                  resize_mode="resize"):
    """A1111's framing of each init image and the mask (``sdrt.engine.inpaint``)."""
    from sdrt.engine.inpaint import prepare
    try:
        return [prepare(im, mask, req.width, req.height, only_masked, padding, fill,
                        resize_mode) for im in init_images]
    except SdrtError as e:
        raise ApiError(400, str(e), "bad_request", "mask") from None


def _frame_images(init_images, req, resize_mode):
    """Each init image brought to the request's size by A1111's resize mode."""
    from sdrt.engine.images import frame_init_image
    return [frame_init_image(im, req.width, req.height, resize_mode) for im in init_images]


def _hires_maps(sources, hires, req, factor):
    """Each unit's map framed at a hires fix's second-pass size, as A1111's ControlNet
    extension frames it again there (``preprocess.frame_map``)."""
    from sdrt.engine.preprocess import frame_map
    w, h, _, _ = hires.target(req.width, req.height, factor)
    try:
        return tuple(frame_map(p, w, h, m, "hires fix's control image") for p, m in sources)
    except SdrtError as e:
        raise ApiError(400, str(e), "bad_request", "alwayson_scripts") from None


def _one_size(init_images):
    """The init images' one size: resize mode 3 encodes them at it, in one batch."""
    sizes = {im.size for im in init_images}
    if len(sizes) > 1:
        raise ApiError(400, f"init_images must all be the same size with resize_mode 3 (they "
                            f"are encoded together at their own size), got "
                            f"{', '.join(f'{w}x{h}' for w, h in sorted(sizes))}", "bad_request",
                       "init_images")
    return sizes.pop()


def _read_mask(body, limits):
    """The request's mask as the pipeline takes it: float (H, W), 1 where repainted, read as
    A1111 reads one (alpha where transparent, else brightness), inverted and blurred."""
    from sdrt.engine.images import blur_mask, mask_to_float
    mask = mask_to_float(_decode_images([body.mask], limits, "mask")[0])
    return blur_mask(1 - mask if body.inpainting_mask_invert else mask, body.mask_blur)


def _decode_images(items, limits, field="init_images"):
    """Base64 images (optionally ``data:image/...;base64,`` URLs) -> PIL images, EXIF
    orientation applied, each checked against the pixel limit before it is decoded."""
    out = []
    for i, text in enumerate(items):
        name = f"{field}[{i}]" if field == "init_images" else field
        out.append(_decode_bytes(b64_bytes(text, name, field), name, limits, field))
    return out


async def json_body(request):
    """A request's JSON body; a 400 where it is not valid JSON."""
    try:
        return await request.json()
    except ValueError as e:
        raise ApiError(400, f"the request body must be valid JSON ({e})", "bad_request") \
            from None
    except RecursionError:
        raise ApiError(400, "the request body must be valid JSON (it nests too deeply)",
                       "bad_request") from None


def b64_bytes(text, name, field):
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> its bytes; a 400
    naming ``field`` when it is not base64."""
    data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} must be a base64-encoded image, got "
                            f"{short_repr(text, 40)}", "bad_request", field) from None


def _decode_bytes(raw, name, limits, field=None):
    """An image file's bytes -> a PIL image, EXIF orientation applied, checked against the
    pixel limit before it is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    field = field or name
    try:
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > (2 * limits.max_side) ** 2:
            raise ApiError(400, f"{name} must be at most {(2 * limits.max_side) ** 2} pixels, "
                                f"got {im.width}x{im.height}", "bad_request", field)
        im.load()
        return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise ApiError(400, f"{name} must be an image file (PNG, JPEG, WebP, ...), got "
                            f"bytes PIL cannot read ({type(e).__name__})", "bad_request",
                       field)
