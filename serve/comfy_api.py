"""ComfyUI's HTTP API over the server's model, as ComfyUI's own script examples and the
clients built on them use it:

- ``POST /prompt`` ``{"prompt": <API-format workflow>, "client_id", "prompt_id"}`` queues the
  workflow (the graphs ``sdrt.engine.comfy`` reads; checked before it is queued, a 400 naming
  the node otherwise) and answers ``{"prompt_id", "number", "node_errors": {}}`` at once;
- ``GET /history/{prompt_id}`` is ``{}`` until the prompt is done, then ComfyUI's entry: the
  prompt, ``outputs`` (the save node's images by file name) and ``status``; ``GET /history``
  holds the newest ones;
- ``GET /view?filename=...&type=output`` returns an image (a PNG with the workflow in its
  "prompt" chunk, as ComfyUI writes it, and A1111's "parameters");
- ``POST /upload/image`` (multipart ``image``) takes an image a workflow's LoadImage (or
  LoadImageMask) names, kept as sent (a MASK reads its alpha); ``GET /queue`` lists what is
  running; ``POST /queue`` (delete, clear), ``/interrupt``, ``/history`` (delete, clear) and
  ``/free`` as ComfyUI's; ``GET /models/checkpoints`` the one model;
- ``/ws?clientId=...`` (a websocket) tells a client ``status`` (the queue's length) on
  connecting and whenever it changes, and of each of its prompts (those queued with its
  ``client_id``; all, for a prompt queued without one) ``execution_start``, ``executing``
  (the KSampler), ``executed`` (the save node's images), ``execution_success`` or
  ``execution_error``, then ``executing`` with node null: done, as ComfyUI's
  ``websockets_api_example.py`` waits for it. No per-step ``progress`` is sent;
- ``GET /object_info`` (and ``/object_info/{node_class}``) describes the nodes sdrt runs, as
  ComfyUI does, with the names their menus take (the checkpoint, --lora-dir's files, the
  uploaded images, the sampler and scheduler names); ``GET /system_stats`` the Python,
  torch and the device; ``/embeddings`` lists --embedding-dir's, ``/extensions`` is empty.

The server runs its
one model (``ckpt_name`` must name it); LoraLoader's files come from ``--lora-dir``,
ControlNetLoader's and IPAdapterModelLoader's from ``--controlnet-dir`` (where the A1111 API's
IP-Adapter units find theirs too), CLIPVisionLoader's from ``--clip-vision-dir`` (``GET
/models/clip_vision``) and UpscaleModelLoader's from ``--upscaler-dir`` (``GET
/models/upscale_models``), by file name. A model upscale (ImageUpscaleWithModel, perhaps
then ImageScale(By)) runs in a hires fix in pixels, in the same job, or on the decoded images
before they are saved, as a job of its own after theirs (``_FinalUpscale``), the model loaded
in the worker thread either way (``Runner.upscaler``). History, images and uploads are
kept in memory, the newest ``MAX_HISTORY`` prompts and ``MAX_UPLOADS`` uploads.
"""
import asyncio
import json
import os
import re
import struct
import sys
import time
import uuid
from collections import OrderedDict
import dataclasses
from dataclasses import dataclass

from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from sdrt.engine import comfy
from sdrt.engine.errors import SdrtError
from sdrt.engine.infotext import png_bytes
from sdrt.engine.model_files import file_stem
from sdrt.engine.request import (MAX_CONTROL_SCALE, MAX_FREEU_FACTOR, MAX_LORA_SCALE,
                                 MAX_PAG_SCALE, short_repr)

from .scheduler import BatchKey, Row

MAX_HISTORY = 64
MAX_UPLOADS = 32
_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg", "sampler": "sampler_name",
          "strength": "denoise", "num_images_per_prompt": "batch_size",
          "clip_skip": "stop_at_clip_layer", "prompt_2": "text_g", "negative_prompt_2": "text_g",
          "original_size": "width", "crops_coords_top_left": "crop_w",
          "target_size": "target_width", "guidance_rescale": "multiplier",
          "negative_original_size": "width", "negative_crops_coords_top_left": "crop_w",
          "negative_target_size": "target_width"}


class ComfyJobs:
    """The prompts queued through ComfyUI's API, their outputs, and the uploaded images."""

    def __init__(self):
        self.number = 0
        self.running = OrderedDict()  # prompt_id → ComfyUI's queue item
        self.history = OrderedDict()  # prompt_id → ComfyUI's history entry
        self.files = {}  # output file name → PNG bytes
        self.outputs = {}  # prompt_id → its file names
        self.uploads = OrderedDict()  # input file name → PIL image
        self.tasks = {}  # prompt_id → the task that runs it
        self.deleted = set()  # prompt ids deleted from the queue while they ran
        self.sockets = {}  # client id → its open websockets
        self._sending = None  # one send at a time: prompts finish concurrently

    async def emit(self, client_id, kind, data):
        """Send ComfyUI's message ``{"type": kind, "data": data}`` to ``client_id``'s
        websockets (every client's when None); a socket that fails is dropped."""
        await self._send(client_id, lambda socket: socket.send_json({"type": kind, "data": data}))

    async def emit_image(self, client_id, png):
        """ComfyUI's binary preview message: event 1 (a preview image), image type 2 (PNG),
        both 4-byte big-endian, then the PNG."""
        await self._send(client_id, lambda socket: socket.send_bytes(
            struct.pack(">II", 1, 2) + png))

    async def _send(self, client_id, send):
        targets = ([s for group in self.sockets.values() for s in group] if client_id is None
                   else list(self.sockets.get(client_id, ())))
        if self._sending is None:  # made on the server's event loop
            self._sending = asyncio.Lock()
        async with self._sending:
            for socket in targets:
                try:
                    await send(socket)
                except Exception:  # closed under us: its handler removes it
                    pass

    async def emit_status(self):
        await self.emit(None, "status", {"status": {"exec_info": {
            "queue_remaining": len(self.running)}}})

    def finish(self, prompt_id, entry, files):
        self.running.pop(prompt_id, None)
        self.history[prompt_id] = entry
        self.files.update(files)
        self.outputs[prompt_id] = list(files)
        while len(self.history) > MAX_HISTORY:
            self.forget([next(iter(self.history))])  # (the oldest)

    def forget(self, prompt_ids):
        """Drop prompts' history entries and their files."""
        for prompt_id in prompt_ids:
            self.history.pop(prompt_id, None)
            for name in self.outputs.pop(prompt_id, ()):
                self.files.pop(name, None)

    def upload(self, name, image, overwrite):
        """Store an upload under ``name`` (as ComfyUI, "name (1).png" and on when taken)."""
        stem, ext = os.path.splitext(name)
        n = 1
        while name in self.uploads and not overwrite:
            name, n = f"{stem} ({n}){ext}", n + 1
        self.uploads.pop(name, None)
        self.uploads[name] = image
        while len(self.uploads) > MAX_UPLOADS:
            self.uploads.popitem(last=False)
        return name


def _node_specs(server, checkpoints, loras, images, controlnets, vaes, upscalers,
                encoders=()):
    """ComfyUI's ``/object_info`` entries for the nodes ``engine.comfy`` reads: each node's
    required inputs (a type, or a list of the names it takes, with ComfyUI's bounds) and its
    outputs."""
    from sdrt.engine.preprocess import available
    limits, preprocessors = server.limits, available()

    def number(kind, default, low, high, step):
        return [kind, {"default": default, "min": low, "max": high, "step": step}]

    def upscales(to_size, by, category, source, kind, methods, step, least):
        """A pair of nodes that scale a ``kind`` input: to a size, and by a factor (at least
        ``least``)."""
        common = {source: [kind], "upscale_method": [list(methods)]}
        return {to_size: (category, {**common,
                                     "width": number("INT", 512, 0, limits.max_side, step),
                                     "height": number("INT", 512, 0, limits.max_side, step),
                                     "crop": [["disabled", "center"]]}, [kind]),
                by: (category, {**common, "scale_by": number("FLOAT", 1.5, least, 8.0, 0.01)},
                     [kind])}

    side = number("INT", 512, 16, limits.max_side, 8)
    strength = number("FLOAT", 1.0, -MAX_LORA_SCALE, MAX_LORA_SCALE, 0.01)
    nodes = {  # class: (category, required inputs, outputs)
        "CheckpointLoaderSimple": ("loaders", {"ckpt_name": [checkpoints]},
                                   ["MODEL", "CLIP", "VAE"]),
        "LoraLoader": ("loaders", {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [loras],
                                   "strength_model": strength, "strength_clip": strength},
                       ["MODEL", "CLIP"]),
        "LoraLoaderModelOnly": ("loaders", {"model": ["MODEL"], "lora_name": [loras],
                                            "strength_model": strength}, ["MODEL"]),
        "CLIPSetLastLayer": ("conditioning", {"clip": ["CLIP"], "stop_at_clip_layer": number(
            "INT", -1, -server.text_layers(), -1, 1)}, ["CLIP"]),
        "CLIPTextEncode": ("conditioning", {"text": ["STRING", {"multiline": True}],
                                            "clip": ["CLIP"]}, ["CONDITIONING"]),
        # (SDXL's second prompt and micro-conditioning; not beside a hires fix)
        "CLIPTextEncodeSDXL": ("advanced/conditioning", {
            "clip": ["CLIP"], "width": side, "height": side,
            "crop_w": number("INT", 0, 0, limits.max_side, 1),
            "crop_h": number("INT", 0, 0, limits.max_side, 1),
            "target_width": side, "target_height": side,
            "text_g": ["STRING", {"multiline": True}],
            "text_l": ["STRING", {"multiline": True}]}, ["CONDITIONING"]),
        "EmptyLatentImage": ("latent", {"width": side, "height": side, "batch_size": number(
            "INT", 1, 1, limits.max_images, 1)}, ["LATENT"]),
        "LoadImage": ("image", {"image": [images, {"image_upload": True}]}, ["IMAGE", "MASK"]),
        "VAEEncode": ("latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
        # inpainting (engine/comfy.py: INPAINT_LATENTS), its mask a LoadImage's or these
        "LoadImageMask": ("mask", {"image": [images, {"image_upload": True}],
                                   "channel": [list(comfy.MASK_CHANNELS)]}, ["MASK"]),
        **{node: ("model_patches/unet", {
            "model": ["MODEL"], **{k: number("FLOAT", d, 0.0, MAX_FREEU_FACTOR, 0.01)
                                   for k, d in zip(("b1", "b2", "s1", "s2"), defaults)}},
            ["MODEL"]) for node, (_, defaults) in comfy.FREEU_NODES.items()},
        comfy.PAG: ("model_patches/unet", {"model": ["MODEL"], "scale": number(
            "FLOAT", 3.0, 0.0, MAX_PAG_SCALE, 0.01)}, ["MODEL"]),
        comfy.RESCALE_CFG: ("advanced/model", {"model": ["MODEL"], "multiplier": number(
            "FLOAT", 0.7, 0.0, 1.0, 0.01)}, ["MODEL"]),
        comfy.MODEL_SAMPLING: ("advanced/model", {
            "model": ["MODEL"], "sampling": [list(comfy.MODEL_SAMPLINGS)],
            "zsnr": ["BOOLEAN", {"default": False}]}, ["MODEL"]),
        comfy.OUTPAINT: ("image", {
            "image": ["IMAGE"], **{side: number("INT", 0, 0, limits.max_side, 8)
                                   for side in ("left", "top", "right", "bottom")},
            "feathering": number("INT", 40, 0, limits.max_side, 1)}, ["IMAGE", "MASK"]),
        comfy.COMPOSITE: ("image", {
            "destination": ["IMAGE"], "source": ["IMAGE"],
            "x": number("INT", 0, 0, 0, 1), "y": number("INT", 0, 0, 0, 1),
            "resize_source": ["BOOLEAN", {"default": False}], "mask": ["MASK"]}, ["IMAGE"]),
        "VAEEncodeForInpaint": ("latent/inpaint", {
            "pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"],
            "grow_mask_by": number("INT", 6, 0, comfy.MAX_GROW_MASK, 1)}, ["LATENT"]),
        "InvertMask": ("mask", {"mask": ["MASK"]}, ["MASK"]),
        "GrowMask": ("mask", {"mask": ["MASK"], "expand": number(
            "INT", 0, -comfy.MAX_EXPAND, comfy.MAX_EXPAND, 1),
            "tapered_corners": ["BOOLEAN", {"default": True}]}, ["MASK"]),
        "SetLatentNoiseMask": ("latent/inpaint", {"samples": ["LATENT"], "mask": ["MASK"]},
                               ["LATENT"]),
        comfy.INPAINT_CONDITIONING: ("conditioning/inpaint", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "vae": ["VAE"],
            "pixels": ["IMAGE"], "mask": ["MASK"],
            "noise_mask": ["BOOLEAN", {"default": True}]},
            ["CONDITIONING", "CONDITIONING", "LATENT"]),
        "KSampler": ("sampling", {
            "model": ["MODEL"], "seed": number("INT", 0, 0, 2 ** 64 - 1, 1),
            "steps": number("INT", 20, 1, limits.max_steps, 1),
            "cfg": number("FLOAT", 8.0, 0.0, limits.max_guidance, 0.1),
            "sampler_name": [sorted({name for name, _ in comfy.SAMPLERS})],
            "scheduler": [sorted({scheduler for _, scheduler in comfy.SAMPLERS})],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"], "denoise": number("FLOAT", 1.0, 0.0, 1.0, 0.01)},
            ["LATENT"]),
        # (noise added, the schedule run to its end: see engine/comfy.py)
        "KSamplerAdvanced": ("sampling", {
            "model": ["MODEL"], "add_noise": [["enable"]],
            "noise_seed": number("INT", 0, 0, 2 ** 64 - 1, 1),
            "steps": number("INT", 20, 1, limits.max_steps, 1),
            "cfg": number("FLOAT", 8.0, 0.0, limits.max_guidance, 0.1),
            "sampler_name": [sorted({name for name, _ in comfy.SAMPLERS})],
            "scheduler": [sorted({scheduler for _, scheduler in comfy.SAMPLERS})],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"],
            "start_at_step": number("INT", 0, 0, limits.max_steps - 1, 1),
            "end_at_step": number("INT", 10000, 0, 10000, 1),
            "return_with_leftover_noise": [["disable"]]},
            ["LATENT"]),
        # ComfyUI's custom sampling, read as a KSampler (engine/comfy.py: _custom_samplers)
        "SamplerCustom": ("sampling/custom_sampling", {
            "model": ["MODEL"], "add_noise": ["BOOLEAN", {"default": True}],
            "noise_seed": number("INT", 0, 0, 2 ** 64 - 1, 1),
            "cfg": number("FLOAT", 8.0, 0.0, limits.max_guidance, 0.1),
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "sampler": ["SAMPLER"], "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]},
            ["LATENT", "LATENT"]),
        "SamplerCustomAdvanced": ("sampling/custom_sampling", {
            "noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"],
            "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]}, ["LATENT", "LATENT"]),
        "RandomNoise": ("sampling/custom_sampling/noise", {
            "noise_seed": number("INT", 0, 0, 2 ** 64 - 1, 1)}, ["NOISE"]),
        "CFGGuider": ("sampling/custom_sampling/guiders", {
            "model": ["MODEL"], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "cfg": number("FLOAT", 8.0, 0.0, limits.max_guidance, 0.1)}, ["GUIDER"]),
        "BasicGuider": ("sampling/custom_sampling/guiders", {
            "model": ["MODEL"], "conditioning": ["CONDITIONING"]}, ["GUIDER"]),
        "KSamplerSelect": ("sampling/custom_sampling/samplers", {
            "sampler_name": [sorted({name for name, _ in comfy.SAMPLERS})]}, ["SAMPLER"]),
        "BasicScheduler": ("sampling/custom_sampling/schedulers", {
            "model": ["MODEL"],
            "scheduler": [sorted({scheduler for _, scheduler in comfy.SAMPLERS})],
            "steps": number("INT", 20, 1, limits.max_steps, 1),
            "denoise": number("FLOAT", 1.0, 0.0, 1.0, 0.01)}, ["SIGMAS"]),
        "AlignYourStepsScheduler": ("sampling/custom_sampling/schedulers", {
            "model_type": [list(comfy.AYS_SCHEDULES)],
            "steps": number("INT", 10, 1, limits.max_steps, 1),
            "denoise": number("FLOAT", 1.0, 0.0, 1.0, 0.01)}, ["SIGMAS"]),
        "VAEDecode": ("latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        "VAELoader": ("loaders", {"vae_name": [vaes]}, ["VAE"]),
        # between two samplers: the hires fix (engine/comfy.py), on latents or in pixels
        # (between a VAEDecode and a VAEEncode: lanczos, or any method after a model); after
        # an ImageUpscaleWithModel before the save node
        **upscales("LatentUpscale", "LatentUpscaleBy", "latent", "samples", "LATENT",
                   comfy.LATENT_UPSCALES, 8, 1.0),
        **upscales("ImageScale", "ImageScaleBy", "image/upscaling", "image", "IMAGE",
                   comfy.SCALE_METHODS, 1, 0.01),
        "UpscaleModelLoader": ("loaders", {"model_name": [upscalers]}, ["UPSCALE_MODEL"]),
        "ImageUpscaleWithModel": ("image/upscaling", {"upscale_model": ["UPSCALE_MODEL"],
                                                      "image": ["IMAGE"]}, ["IMAGE"]),
        "ControlNetLoader": ("loaders", {"control_net_name": [controlnets]}, ["CONTROL_NET"]),
        "ControlNetApplyAdvanced": ("conditioning/controlnet", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
            "strength": number("FLOAT", 1.0, 0.0, MAX_CONTROL_SCALE, 0.01),
            "start_percent": number("FLOAT", 0.0, 0.0, 1.0, 0.001),
            "end_percent": number("FLOAT", 1.0, 0.0, 1.0, 0.001)},
            ["CONDITIONING", "CONDITIONING"]),
        # cubiq's IP-Adapter nodes, as sdrt runs them (engine/comfy.py: IPADAPTER_PLAIN)
        "IPAdapterModelLoader": ("ipadapter", {"ipadapter_file": [controlnets]},
                                 ["IPADAPTER"]),
        "CLIPVisionLoader": ("loaders", {"clip_name": [list(encoders)]}, ["CLIP_VISION"]),
        comfy.IPADAPTER: ("ipadapter", {
            "model": ["MODEL"], "ipadapter": ["IPADAPTER"], "image": ["IMAGE"],
            "weight": number("FLOAT", 1.0, -1.0, 5.0, 0.05),
            "weight_type": [list(comfy.WEIGHT_TYPES)],
            **{k: [list(v)] for k, v in comfy.IPADAPTER_PLAIN.items()},
            "start_at": number("FLOAT", 0.0, 0.0, 1.0, 0.001),
            "end_at": number("FLOAT", 1.0, 0.0, 1.0, 0.001), "clip_vision": ["CLIP_VISION"]},
            ["MODEL"]),
        comfy.UNIFIED: ("ipadapter", {"model": ["MODEL"], "preset": [list(comfy.PRESETS)]},
                        ["MODEL", "IPADAPTER"]),
        comfy.IPADAPTER_SIMPLE: ("ipadapter", {
            "model": ["MODEL"], "ipadapter": ["IPADAPTER"], "image": ["IMAGE"],
            "weight": number("FLOAT", 1.0, -1.0, 3.0, 0.05),
            "start_at": number("FLOAT", 0.0, 0.0, 1.0, 0.001),
            "end_at": number("FLOAT", 1.0, 0.0, 1.0, 0.001),
            "weight_type": [list(comfy.SIMPLE_WEIGHT_TYPES)]}, ["MODEL"]),
        comfy.PREP: ("ipadapter/utils", {
            "image": ["IMAGE"], "interpolation": [list(comfy.PREP_FILTERS)],
            "crop_position": [list(comfy.PREP_CROPS)],
            "sharpening": number("FLOAT", 0.0, 0.0, 1.0, 0.05)}, ["IMAGE"]),
        # (the preprocessors run OpenCV: listed where the control extra is installed)
        **({"CannyEdgePreprocessor": ("ControlNet Preprocessors/Line Extractors", {
            "image": ["IMAGE"], "low_threshold": number("INT", 100, 1, 255, 1),
            "high_threshold": number("INT", 200, 1, 255, 1),
            "resolution": number("INT", 512, 64, 2048, 8)}, ["IMAGE"])} if preprocessors else {}),
        "ImageInvert": ("image", {"image": ["IMAGE"]}, ["IMAGE"]),
        comfy.SAVE_WEBSOCKET: ("api node/image", {"images": ["IMAGE"]}, []),
        "SaveImage": ("image", {"images": ["IMAGE"], "filename_prefix": [
            "STRING", {"default": "ComfyUI"}]}, []),
        "PreviewImage": ("image", {"images": ["IMAGE"]}, []),
    }
    return {name: {"input": {"required": required}, "input_order": {"required": list(required)},
                   "output": outputs, "output_is_list": [False] * len(outputs),
                   "output_name": outputs, "name": name, "display_name": name,
                   "description": "", "python_module": "nodes", "category": category,
                   "output_node": name in ("SaveImage", "PreviewImage", comfy.SAVE_WEBSOCKET)}
            for name, (category, required, outputs) in nodes.items()}


def _system_stats(server):
    """ComfyUI's ``/system_stats``: the OS, Python and torch, and the device the model runs
    on with its memory (a CPU's: the machine's)."""
    import torch
    device = server.runner.pipe.device
    try:  # Linux and most Unixes
        page = os.sysconf("SC_PAGE_SIZE")
        ram_total, ram_free = (page * os.sysconf("SC_PHYS_PAGES"),
                               page * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        ram_total = ram_free = 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        torch_total = torch.cuda.memory_reserved(device)
        torch_free = torch_total - torch.cuda.memory_allocated(device)
    else:
        free, total, name, torch_total, torch_free = ram_free, ram_total, "cpu", 0, 0
    return {"system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": "sdrt", "python_version": sys.version,
                       "pytorch_version": torch.__version__, "embedded_python": False,
                       "argv": sys.argv},
            "devices": [{"name": name, "type": device.type, "index": device.index or 0,
                         "vram_total": total, "vram_free": free,
                         "torch_vram_total": torch_total, "torch_vram_free": torch_free}]}


# The queue, interrupt, history and free bodies' keys: {key: (check, what it must be)}
_IDS = (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "a list of prompt ids (strings)")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_BODY_KEYS = {"delete": _IDS, "clear": _FLAG, "unload_models": _FLAG, "free_memory": _FLAG,
              "prompt_id": (lambda v: isinstance(v, str), "a prompt id (a string)")}


def _free_memory():
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def register(app, server_of, api_error):
    """Add the routes to ``app``; ``api_error(status, message, kind, param)`` builds the
    app's ``ApiError``."""
    jobs = ComfyJobs()

    def bad(message, param="prompt"):
        return api_error(400, " ".join(message.split()), "bad_request", param)

    async def body_of(request, keys=()):
        """The request's JSON body, an object; ``keys``: those of ``_BODY_KEYS`` it may hold,
        each checked (a bad value is refused by name)."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body must be valid JSON ({e})", None)
        except RecursionError:
            raise bad("the request body must be valid JSON (it nests too deeply)", None)
        if not isinstance(body, dict):
            raise bad(f"the request body must be a JSON object, got {short_repr(body)}", None)
        for key in keys:
            ok, allowed = _BODY_KEYS[key]
            if key in body and not ok(body[key]):
                raise bad(f"{key} must be {allowed}, got {short_repr(body[key])}", key)
        return body

    @app.post("/prompt", tags=["ComfyUI"])
    async def post_prompt(request: Request):
        """Queue an API-format workflow; its images appear in /history/{prompt_id}."""
        server = server_of(request)
        server.require_ready()
        body = await body_of(request)
        if not isinstance(body.get("prompt"), dict):
            raise bad(f"prompt must be a workflow in API format (an object of nodes), got "
                      f"{short_repr(body.get('prompt'))}")
        _check_ids(body, jobs, bad)
        if len(jobs.running) >= server.config.max_queue:  # (refused now, not failed later)
            raise api_error(429, f"the queue is full ({len(jobs.running)} prompts queued or "
                                 f"running); retry later", "queue_full", None,
                            {"Retry-After": "1"})
        graph = body["prompt"]
        try:
            flow = await run_in_threadpool(comfy.read, graph, _upscaler_scale(server.runner))
        except SdrtError as e:
            raise bad(f"prompt: {e}")
        _check_model(flow, server.runner.model_name, bad)
        if flow.vae is not None and server.runner.vae_path(flow.vae) is None:
            raise bad(f"prompt: workflow decodes with VAE {short_repr(flow.vae)} (a VAELoader), "
                      f"which --vae-dir does not have (GET /models/vae lists those it has)")
        refiner = _refiner(server, flow, bad) if flow.refiner is not None else None
        sdxl = [k for k in ("prompt_2", "negative_2", "original_size", "crop", "target_size",
                            "negative_sizes") if getattr(flow, k) is not None]
        if sdxl and flow.hires is not None:
            raise bad(f"prompt: workflow's CLIPTextEncodeSDXL asks for {', '.join(sdxl)} with a "
                      f"hires fix; the server's hires fix conditions SDXL on one prompt and the "
                      f"image's size (sdrt generate --workflow runs it)")
        from .app import check_loras
        loras = check_loras(server, [(file_stem(name), s) for name, s in flow.loras], "prompt")
        init = mask = overlay = canvas = None
        if flow.init_image is not None:
            init = comfy.comfy_image(_uploaded(jobs.uploads, flow.init_image, bad))
            if flow.outpaint is not None:  # (ImagePadForOutpaint: the canvas and its MASK)
                try:
                    init, canvas = await run_in_threadpool(
                        comfy.outpaint, init, flow.outpaint, server.limits.max_side)
                except SdrtError as e:
                    raise bad(f"prompt: {e}")
        if flow.mask is not None:  # (read and grown as ComfyUI does; laid over by a composite)
            source = canvas if canvas is not None else _uploaded(jobs.uploads, flow.mask[0],
                                                                 bad)
            read, mask = await run_in_threadpool(comfy.workflow_masks, source, flow.mask[1],
                                                 flow.mask_ops, init.width, init.height,
                                                 flow.grow_mask)
            overlay = (init, read) if flow.composite else None
        width, height = flow.width, flow.height
        if init is not None:
            width, height = server.image_size(init, "prompt",
                                              f"prompt: the LoadImage's picture "
                                              f"{short_repr(flow.init_image)}")
        req = server.check(_NAMES, prompt=flow.prompt, negative_prompt=flow.negative or None,
                           height=height, width=width, num_inference_steps=flow.steps,
                           guidance_scale=flow.guidance, sampler=flow.sampler, seed=flow.seed,
                           num_images_per_prompt=flow.batch, clip_skip=flow.clip_skip,
                           strength=flow.strength if init is not None else 0.8,
                           has_image=init is not None, prompt_2=flow.prompt_2,
                           negative_prompt_2=flow.negative_2, original_size=flow.original_size,
                           crops_coords_top_left=flow.crop, target_size=flow.target_size,
                           **_negative_micro(flow),
                           prompt_syntax="comfy", pag_scale=flow.pag_scale,
                           guidance_rescale=flow.guidance_rescale,
                           guidance_rescale_style="comfy",
                           zero_out_negative=flow.zero_out_negative)
        if flow.pag_scale and flow.controlnets and flow.guidance <= 1:
            raise bad(f"prompt: workflow's {comfy.PAG} cannot be combined with ControlNets "
                      f"at cfg 1 yet")
        seeds = server.seeds(req.seed, flow.batch, "seed")
        hires = _hires(server, flow, req, bad) if flow.hires is not None else None
        if flow.upscale is not None:
            _check_upscale(server, flow.upscale, *(
                hires.target(req.width, req.height, server.runner.pipe.vae_scale_factor)[:2]
                if hires else (req.width, req.height)), bad)
        controls, hints, units = await run_in_threadpool(
            _controls, server, flow, jobs.uploads, req.width, req.height, bad)
        prompts, pictures, texts = await run_in_threadpool(
            _image_prompts, server, flow, jobs.uploads, len(units), bad)
        key = BatchKey(req.height, req.width, req.num_inference_steps, req.sampler,
                       req.guidance, req.strength if init is not None else None,
                       req.clip_skip, server.chunks(req), inpaint=mask is not None,
                       hires=hires, loras=loras, controls=controls, vae=flow.vae,
                       image_prompts=prompts,
                       micro=(flow.original_size, flow.crop, flow.target_size,
                              *(flow.negative_sizes or (None, None, None))),
                       prompt_syntax="comfy", freeu=flow.freeu, pag_scale=flow.pag_scale,
                       rescale=(flow.guidance_rescale, "comfy") if flow.guidance_rescale else (),
                       scheduler=comfy.scheduler_fields(flow.sampling), refiner=refiner,
                       zero_out_negative=flow.zero_out_negative)
        rows = [Row(flow.prompt, flow.negative, req.guidance_scale, s, init, mask,
                    control_images=hints, control_info=units + texts, ip_images=pictures,
                    prompt_2=flow.prompt_2, negative_prompt_2=flow.negative_2)
                for s in seeds]
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        if prompt_id in jobs.running or prompt_id in jobs.history:  # (while this one waited)
            raise bad(f"prompt_id must be a new string, got {short_repr(prompt_id)}",
                      "prompt_id")
        client_id = body.get("client_id")
        jobs.number += 1
        extra = {**(body.get("extra_data") or {}), "client_id": client_id}
        item = [jobs.number, prompt_id, graph, extra, [flow.output]]
        jobs.running[prompt_id] = item
        await jobs.emit_status()
        task = asyncio.create_task(_run(server, jobs, item, flow, key, rows, overlay))
        jobs.tasks[prompt_id] = task
        task.add_done_callback(lambda _, p=prompt_id: jobs.tasks.pop(p, None))
        return {"prompt_id": prompt_id, "number": jobs.number, "node_errors": {}}

    @app.post("/queue", tags=["ComfyUI"])
    async def post_queue(request: Request):
        """ComfyUI's ``{"delete": [prompt_id, ...]}`` and ``{"clear": true}``: the prompts
        leave the queue with no history entry (a batch already on the device finishes, its
        images dropped)."""
        body = await body_of(request, ("delete", "clear"))
        doomed = list(jobs.running) if body.get("clear") else body.get("delete") or []
        for prompt_id in doomed:
            if prompt_id in jobs.tasks:
                jobs.deleted.add(prompt_id)
                jobs.tasks[prompt_id].cancel()
        return Response(status_code=200)

    @app.post("/interrupt", tags=["ComfyUI"])
    async def post_interrupt(request: Request):
        """ComfyUI's interrupt: the prompt ``{"prompt_id": ...}`` names, or the oldest one
        queued, ends with ``execution_interrupted`` in its history (a batch already on the
        device finishes, its images dropped). A body is optional."""
        body = await body_of(request, ("prompt_id",)) if await request.body() else {}
        prompt_id = body.get("prompt_id") or next(iter(jobs.running), None)
        if prompt_id in jobs.tasks:
            jobs.tasks[prompt_id].cancel()
        return Response(status_code=200)

    @app.post("/history", tags=["ComfyUI"])
    async def post_history(request: Request):
        """ComfyUI's ``{"delete": [prompt_id, ...]}`` and ``{"clear": true}``: the entries and
        their images go."""
        body = await body_of(request, ("delete", "clear"))
        jobs.forget(list(jobs.history) if body.get("clear") else body.get("delete") or [])
        return Response(status_code=200)

    @app.post("/free", tags=["ComfyUI"])
    async def post_free(request: Request):
        """ComfyUI's ``{"unload_models": bool, "free_memory": bool}``: the server keeps its one
        model loaded (it is what it serves); ``free_memory`` returns the device's cached
        blocks to the driver."""
        body = await body_of(request, ("unload_models", "free_memory"))
        if body.get("free_memory"):
            await run_in_threadpool(_free_memory)
        return Response(status_code=200)

    @app.get("/history/{prompt_id}", tags=["ComfyUI"])
    async def history_of(prompt_id: str):
        entry = jobs.history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @app.get("/history", tags=["ComfyUI"])
    async def history(max_items: int = MAX_HISTORY):
        items = list(jobs.history.items())
        return dict(items[-max_items:] if max_items > 0 else [])

    @app.get("/queue", tags=["ComfyUI"])
    async def queue():
        return {"queue_running": list(jobs.running.values()), "queue_pending": []}

    @app.get("/view", tags=["ComfyUI"])
    async def view(filename: str, type: str = "output", subfolder: str = ""):
        if subfolder:
            raise api_error(404, f"subfolder must be empty (sdrt keeps no folders), got "
                                 f"{short_repr(subfolder)}", "not_found", "subfolder")
        if type == "input" and filename in jobs.uploads:
            data = await run_in_threadpool(_png, jobs.uploads[filename])
        elif type == "output" and filename in jobs.files:
            data = jobs.files[filename]
        else:
            raise api_error(404, f"filename {short_repr(filename)} of type {short_repr(type)} "
                                 f"is not here (outputs are kept for the newest {MAX_HISTORY} "
                                 f"prompts)", "not_found", "filename")
        return Response(data, media_type="image/png")

    @app.post("/upload/image", tags=["ComfyUI"])
    async def upload_image(request: Request):
        """Multipart ``image`` (and ``overwrite``): an init image for LoadImage."""
        from .app import _decode_bytes
        server = server_of(request)
        form = await request.form()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            raise bad("image must be an uploaded file (multipart form field 'image')", "image")
        name = os.path.basename(upload.filename or "") or "image.png"
        image = await run_in_threadpool(_decode_bytes, await upload.read(), "image",
                                        server.limits)
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        name = jobs.upload(name, image, overwrite)  # (as sent: a MASK reads its alpha)
        return {"name": name, "subfolder": "", "type": "input"}

    @app.post("/upload/mask", tags=["ComfyUI"])
    async def upload_mask(request: Request):
        """Multipart ``image`` (a mask drawn in its alpha), ``original_ref`` (JSON: the
        ``filename`` and ``type``, "input" or "output", of an upload or an output) and
        ``overwrite``: the original with the mask's alpha as its own, stored as an upload under
        the mask's file name, as ComfyUI's mask editor saves a mask for LoadImage's MASK."""
        from .app import _decode_bytes
        server = server_of(request)
        form = await request.form()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            raise bad("image must be an uploaded file (multipart form field 'image')", "image")
        original = _original(jobs, form.get("original_ref"), bad)
        mask = await run_in_threadpool(_decode_bytes, await upload.read(), "image",
                                       server.limits)
        if isinstance(original, bytes):  # an output's PNG
            original = await run_in_threadpool(_decode_bytes, original, "original_ref",
                                               server.limits)
        if mask.size != original.size:
            raise bad(f"image must be the original's size, {original.width}x{original.height}, "
                      f"got {mask.width}x{mask.height}", "image")
        combined = original.convert("RGBA")
        combined.putalpha(mask.convert("RGBA").getchannel("A"))
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        name = jobs.upload(os.path.basename(upload.filename or "") or "image.png", combined,
                           overwrite)
        return {"name": name, "subfolder": "", "type": "input"}

    @app.get("/models/upscale_models", tags=["ComfyUI"])
    async def upscale_models(request: Request):
        """--upscaler-dir's models by file name, as UpscaleModelLoader's model_name takes
        them."""
        return await run_in_threadpool(_upscaler_files, server_of(request).runner)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, clientId: str = None):  # noqa: N803 (ComfyUI's name)
        await websocket.accept()
        sid = clientId or uuid.uuid4().hex
        jobs.sockets.setdefault(sid, set()).add(websocket)
        try:
            await websocket.send_json({"type": "status", "data": {"status": {"exec_info": {
                "queue_remaining": len(jobs.running)}}, "sid": sid}})
            while True:  # clients send nothing that matters; wait for them to leave
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            group = jobs.sockets.get(sid, set())
            group.discard(websocket)
            if not group:
                jobs.sockets.pop(sid, None)

    async def specs(request):
        server = server_of(request)
        server.require_ready()
        runner = server.runner
        names = await run_in_threadpool(runner.lora_names)
        return _node_specs(server, runner.checkpoint_names(),
                           [os.path.basename(runner.lora_path(n)) for n in names],
                           list(jobs.uploads), await run_in_threadpool(_controlnet_files, runner),
                           await run_in_threadpool(runner.vae_names),
                           await run_in_threadpool(_upscaler_files, runner),
                           await run_in_threadpool(_clip_vision_files, runner))

    @app.get("/object_info", tags=["ComfyUI"])
    async def object_info(request: Request):
        """The nodes sdrt runs, as ComfyUI describes its nodes."""
        return await specs(request)

    @app.get("/object_info/{node_class}", tags=["ComfyUI"])
    async def object_info_one(request: Request, node_class: str):
        """One node's description; ``{}`` for a node sdrt does not run (as ComfyUI)."""
        spec = (await specs(request)).get(node_class)
        return {} if spec is None else {node_class: spec}

    @app.get("/system_stats", tags=["ComfyUI"])
    async def system_stats(request: Request):
        server = server_of(request)
        server.require_ready()
        return _system_stats(server)

    @app.get("/embeddings", tags=["ComfyUI"])
    async def embeddings(request: Request):
        """--embedding-dir's loaded embeddings, by name (a prompt's embedding:NAME)."""
        server = server_of(request)
        server.require_ready()
        return sorted(server.runner.embeddings)

    @app.get("/extensions", tags=["ComfyUI"])
    async def extensions():
        return []

    @app.get("/models/checkpoints", tags=["ComfyUI"])
    async def checkpoints(request: Request):
        return server_of(request).runner.checkpoint_names()

    @app.get("/models/loras", tags=["ComfyUI"])
    async def loras(request: Request):
        """--lora-dir's files by name, as LoraLoader's lora_name takes them."""
        runner = server_of(request).runner
        names = await run_in_threadpool(runner.lora_names)
        return [os.path.basename(runner.lora_path(n)) for n in names]

    @app.get("/models/vae", tags=["ComfyUI"])
    async def vaes(request: Request):
        """--vae-dir's VAEs, as VAELoader's vae_name takes them."""
        return await run_in_threadpool(server_of(request).runner.vae_names)

    @app.get("/models/clip_vision", tags=["ComfyUI"])
    async def clip_visions(request: Request):
        """--clip-vision-dir's image encoders, as CLIPVisionLoader's clip_name takes them."""
        return await run_in_threadpool(_clip_vision_files, server_of(request).runner)

    @app.get("/models/controlnet", tags=["ComfyUI"])
    async def controlnets(request: Request):
        """--controlnet-dir's ControlNets, as ControlNetLoader's control_net_name takes them."""
        return await run_in_threadpool(_controlnet_files, server_of(request).runner)

    return jobs


def _clip_vision_files(runner):
    """--clip-vision-dir's image encoders by file name (a folder by its name)."""
    return [os.path.basename(runner.clip_vision_path(n)) for n in runner.clip_vision_names()]


def _controlnet_files(runner):
    """--controlnet-dir's ControlNets by file name (a diffusers folder by its name)."""
    return [os.path.basename(runner.controlnet_path(n)) for n in runner.controlnet_names()]


def _upscaler_files(runner):
    """--upscaler-dir's models by file name (each file once, though Real-ESRGAN's answer to
    A1111's names too: ``comfy.read`` takes either, and the stem)."""
    return sorted({os.path.basename(runner.upscaler_path(n)) for n in runner.upscaler_names()})


def _upscaler_scale(runner):
    """``comfy.read``'s upscaler_scale: the scale of --upscaler-dir's model ``name``, read from
    its file's header."""
    def scale(name):
        path = runner.upscaler_path(name)
        if path is None:
            raise SdrtError("--upscaler-dir has no such model (GET /models/upscale_models lists "
                            "those it has)")
        from sdrt.engine.upscaler_config import file_config
        return file_config(path).scale
    return scale


def _check_upscale(server, upscale, width, height, bad):
    """The images a workflow saves after its model upscale (of ``width`` × ``height``
    pictures): at least 1 and at most max_side pixels a side."""
    _, w, h, _ = upscale.scaling(width, height)
    top = server.limits.max_side
    if not (1 <= w <= top and 1 <= h <= top):
        raise bad(f"prompt: the model upscale of the saved images makes them {w}x{h} (from "
                  f"{width}x{height}); each side must be from 1 to {top} pixels (SDRT_MAX_SIDE)")


@dataclass(frozen=True)
class _FinalUpscale:
    """The scheduler's key of a workflow's model upscale of its decoded images (the job's rows:
    the images): run in the worker thread (``key.run(runner, rows)``), the model loaded
    there."""
    upscale: comfy.ModelUpscale

    def run(self, runner, images):
        return self.upscale.run(runner.upscaler(self.upscale.model), images)


def _controls(server, flow, uploads, width, height, bad):
    """A workflow's ControlNetApplyAdvanced nodes → (``BatchKey.controls``, the control images
    framed to ``width`` × ``height`` as ComfyUI centres and crops them, the PNG info's units).
    """
    from sdrt.engine.comfy import comfy_hint

    from .a1111_controlnet import unit_parts
    controls, images, info = [], [], []
    for i, unit in enumerate(flow.controlnets):
        name = file_stem(unit.name)
        if server.runner.controlnet_path(name) is None:
            raise bad(f"prompt: ControlNetLoader loads {short_repr(unit.name)}, which "
                      f"--controlnet-dir does not have (GET /models/controlnet)")
        if name in [c[0] for c in controls]:
            raise bad(f"prompt: ControlNet {short_repr(unit.name)} is applied twice; sdrt "
                      f"applies each once")
        picture = _uploaded(uploads, unit.image, bad).convert("RGB")
        processor = None
        if unit.preprocessor is not None:  # (a preprocessor node, checked when read)
            from sdrt.engine.preprocess import apply, get
            module, *settings = unit.preprocessor
            try:
                picture, processor = apply(get(module), picture, *settings,
                                           field="the preprocessor node's resolution")
            except SdrtError as e:
                raise bad(f"prompt: {e}") from None
        for out, value in zip((controls, images, info), unit_parts(
                server, i, name, comfy_hint(picture, width, height), unit.strength, "crop",
                unit.start, unit.end, processor)):
            out.append(value)
    return tuple(controls), tuple(images), tuple(info)


def _image_prompts(server, flow, uploads, first, bad):
    """A workflow's IPAdapterAdvanced nodes → (``BatchKey.image_prompts``, each one's reference
    picture as the node prepares it for its encoder, the PNG info's units numbered from
    ``first``). The adapter is a file of --controlnet-dir (where the A1111 API's IP-Adapter
    units find theirs), the CLIPVisionLoader's model one of --clip-vision-dir."""
    import hashlib

    from sdrt.engine.clip_vision import encoder_config
    from sdrt.engine.comfy import (IPADAPTER, adapter_scale, clip_vision_image, comfy_mask,
                                   preset_files)
    from sdrt.engine.infotext import controlnet_unit
    from sdrt.engine.ip_adapter import encoder_fits, file_config

    from .a1111_controlnet import BlockScales, RegionMask
    prompts, pictures, texts = [], [], []
    for i, prompt in enumerate(flow.ip_adapters):
        if prompt.preset is not None:  # an IPAdapterUnifiedLoader's: its files by name
            try:
                adapter, encoder = preset_files(
                    prompt.preset, server.runner.pipe.family.name.startswith("sdxl"),
                    _controlnet_files(server.runner),
                    None if prompt.encoder else _clip_vision_files(server.runner))
            except SdrtError as e:
                raise bad(f"prompt: {e} (--controlnet-dir, --clip-vision-dir)") from None
            prompt = dataclasses.replace(prompt, adapter=adapter,
                                         encoder=prompt.encoder or encoder)
        name = file_stem(prompt.adapter)
        path = server.runner.controlnet_path(name)
        if path is None or os.path.isdir(path):
            raise bad(f"prompt: IPAdapterModelLoader loads {short_repr(prompt.adapter)}, which "
                      f"--controlnet-dir does not have (GET /models/controlnet)")
        if name in [p[0] for p in prompts]:
            raise bad(f"prompt: IP-Adapter {short_repr(prompt.adapter)} is applied twice; sdrt "
                      f"applies each once")
        encoder = server.runner.clip_vision_path(file_stem(prompt.encoder))
        if encoder is None:
            raise bad(f"prompt: CLIPVisionLoader loads {short_repr(prompt.encoder)}, which "
                      f"--clip-vision-dir does not have (GET /models/clip_vision)")
        try:
            config, adapter = encoder_config(encoder), file_config(path)
            if not encoder_fits(adapter, config):
                raise SdrtError(f"IP-Adapter {name!r} does not read what {prompt.encoder!r} "
                                f"gives")
        except SdrtError as e:
            raise bad(f"prompt: {IPADAPTER}: {e}") from None
        picture = clip_vision_image(_uploaded(uploads, prompt.image, bad), config.image_size,
                                    prompt.prep)
        digest = hashlib.sha256(picture.tobytes()).hexdigest()
        mask = None
        if prompt.mask is not None:  # (its region: weighs the adapter's attention)
            mask = RegionMask(comfy_mask(_uploaded(uploads, prompt.mask[0], bad),
                                         prompt.mask[1]))
        scale = adapter_scale(prompt.weight_type, prompt.weight, server.runner.pipe.unet, adapter)
        if isinstance(scale, dict):  # (the weight per transformer block, hashed in the key)
            scale = BlockScales(scale)
        prompts.append((name, scale, prompt.start, prompt.end, encoder, digest, mask))
        pictures.append(picture)
        short = server.runner.controlnet_hash(name)
        texts.append((f"ControlNet {first + i}", controlnet_unit(
            f"{name} [{short}]" if short else name, prompt.weight, "crop", prompt.start,
            prompt.end, processor=("ip-adapter-auto", None, None, None, False))))
    return tuple(prompts), tuple(pictures), tuple(texts)


def _uploaded(uploads, name, bad):
    """The uploaded image a LoadImage (or LoadImageMask) names, as it was sent. The name may
    carry ComfyUI's annotation (" [input]") and a subfolder ("clipspace/...", the mask
    editor's), as ComfyUI's own front end writes them; uploads are kept by file name."""
    image = uploads.get(name)
    if image is None and isinstance(name, str):
        bare = re.sub(r" \[(input|temp)\]$", "", name).replace("\\", "/").rsplit("/", 1)[-1]
        image = uploads.get(bare)
    if image is None:
        raise bad(f"prompt: workflow loads image {short_repr(name)}, which was not uploaded "
                  f"(POST /upload/image first; this server's outputs are not inputs)")
    return image


def _original(jobs, text, bad):
    """The image an /upload/mask's ``original_ref`` names: an upload (PIL) or an output's PNG
    (bytes). Its filename may carry ComfyUI's " [input]"/" [output]" annotation, which gives the
    type; the type is "output" when neither says."""
    try:
        ref = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str) or \
            not ref["filename"]:
        raise bad(f"original_ref must be JSON naming the original's filename (and type), got "
                  f"{short_repr(text)}", "original_ref")
    name, kind = ref["filename"], ref.get("type", "output")
    for annotation in ("input", "output"):
        if name.endswith(f" [{annotation}]"):
            name, kind = name[:-len(annotation) - 3], annotation
    if ref.get("subfolder", "") not in ("", None):
        raise bad(f"original_ref's subfolder must be empty (sdrt keeps no folders), got "
                  f"{short_repr(ref['subfolder'])}", "original_ref")
    found = {"input": jobs.uploads, "output": jobs.files}.get(kind, {}).get(name)
    if found is None:
        raise bad(f"original_ref names {short_repr(name)} of type {short_repr(kind)}, which is "
                  f"not here (an upload, or an output of the newest {MAX_HISTORY} prompts)",
                  "original_ref")
    return found


def _hires(server, flow, req, bad):
    """A workflow's hires fix (a latent, image or model upscale and a second sampler), checked
    as the A1111 API checks one, its second pass's size and steps too."""
    names = {"scale": "scale_by", "upscaler": "upscale_method", "steps": "steps",
             "strength": "denoise", "resize_x": "width", "resize_y": "height",
             "sampler": "sampler_name"}
    model = (flow.hires.upscaler,) if flow.hires.comfy_upscale else ()  # (comfy.read found it)
    try:
        hires = flow.hires.check(names, server.limits.max_side, server.limits.max_steps,
                                 model_upscalers=model)
    except SdrtError as e:
        raise bad(f"prompt: the hires fix's second pass: {e}")
    server.check_second_pass(hires, req, {**_NAMES, "height": "height", "width": "width"})
    return hires


def _negative_micro(flow):
    """The pipeline's negative micro-conditioning arguments of a workflow whose negative
    prompt conditions on sizes of its own (``Workflow.negative_sizes``); {} where it does
    not."""
    if flow.negative_sizes is None:
        return {}
    return dict(zip(("negative_original_size", "negative_crops_coords_top_left",
                     "negative_target_size"), flow.negative_sizes))


def _check_ids(body, jobs, bad):
    """A /prompt body's prompt_id (a new string that /history/{prompt_id} can name),
    client_id (a string) and extra_data (an object)."""
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and (
            not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= 256
            or any(c in "/\\" or not c.isprintable() for c in prompt_id)
            or prompt_id in jobs.running or prompt_id in jobs.history):
        raise bad(f"prompt_id must be a new string of 1 to 256 printable characters without "
                  f"/ or \\, got {short_repr(prompt_id)}", "prompt_id")
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise bad(f"client_id must be a string, got {short_repr(client_id)}", "client_id")
    extra = body.get("extra_data")
    if extra is not None and not isinstance(extra, dict):
        raise bad(f"extra_data must be an object, got {short_repr(extra)}", "extra_data")
    pnginfo = (extra or {}).get("extra_pnginfo")
    if pnginfo is not None and not (isinstance(pnginfo, dict) and all(map(_png_key, pnginfo))):
        raise bad(f"extra_data.extra_pnginfo must be an object whose keys are PNG text keywords "
                  f"(1 to 79 printable Latin-1 characters, no space at either end or two in "
                  f"a row), got {short_repr(pnginfo)}", "extra_data.extra_pnginfo")


def _png_key(key):
    """Whether ``key`` can name a PNG text chunk (the PNG spec's keyword)."""
    return isinstance(key, str) and 0 < len(key) < 80 and key == key.strip() and \
        "  " not in key and \
        all(" " <= c <= "~" or "\xa1" <= c <= "\xff" for c in key)


def _refiner(server, flow, bad):
    """``BatchKey.refiner`` of an SDXL base-and-refiner workflow: the server's --refiner by
    its checkpoint's name, taking over after the base's end_at_step (``switch_after``), at
    its CLIPTextEncodeSDXLRefiner's aesthetic scores."""
    import dataclasses

    from sdrt.engine.samplers import switch_after
    runner = server.runner
    if runner.refiner is None:
        raise bad(f"prompt: workflow refines with checkpoint {short_repr(flow.refiner)}; "
                  f"the server runs no refiner (sdrt serve --refiner PATH)")
    if file_stem(flow.refiner) != file_stem(runner.refiner_name):
        raise bad(f"prompt: the refiner's ckpt_name must name the server's refiner "
                  f"{runner.refiner_name!r} (GET /models/checkpoints), got "
                  f"{short_repr(flow.refiner)}")
    if flow.hires is not None or flow.init_image is not None or flow.vae is not None:
        raise bad("prompt: the server's refiner finishes text to image decoded with its own "
                  "VAE (not yet a hires fix, an init image or a VAELoader beside it; sdrt "
                  "generate --workflow --refiner runs them)")
    config = dataclasses.replace(runner.scheduler_config,
                                 **dict(comfy.scheduler_fields(flow.sampling)))
    try:
        switch = switch_after(config, flow.sampler, flow.steps, flow.refiner_steps)
    except SdrtError as e:
        raise bad(f"prompt: {e}")
    return switch, flow.aesthetic_score, flow.negative_aesthetic_score


def _check_model(flow, model_name, bad):
    if file_stem(flow.checkpoint) != file_stem(model_name):
        raise bad(f"prompt: ckpt_name must name the server's model {model_name!r} (GET "
                  f"/models/checkpoints), got {short_repr(flow.checkpoint)}")


def _png(image, **save):
    """An image as PNG bytes, without text (``save``: PIL's PNG options)."""
    import io
    if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):  # (CMYK, YCbCr ...)
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


async def _run(server, jobs, item, flow, key, rows, overlay=None):
    """One queued prompt: its images into the history, or its error; its client told each
    step as ComfyUI tells it. ``overlay``: (init image, mask) an ImageCompositeMasked lays the
    images over the init image through."""
    prompt_id, client = item[1], item[3]["client_id"]
    started = int(time.time() * 1000)
    messages = [["execution_start", {"prompt_id": prompt_id, "timestamp": started}]]
    try:
        await jobs.emit(client, *messages[0])
        await jobs.emit(client, "executing", {"node": flow.sampler_node,
                                              "display_node": flow.sampler_node,
                                              "prompt_id": prompt_id})
        await _generate(server, jobs, item, flow, key, rows, messages, overlay)
    except asyncio.CancelledError:  # POST /queue's delete, or /interrupt
        if prompt_id in jobs.deleted:  # (deleted: gone, as from ComfyUI's queue)
            jobs.deleted.discard(prompt_id)
            jobs.running.pop(prompt_id, None)
        elif prompt_id in jobs.running:  # (not yet finished: interrupted)
            messages.append(["execution_interrupted", {
                "prompt_id": prompt_id, "node_id": flow.sampler_node,
                "node_type": item[2][flow.sampler_node].get("class_type"), "executed": [],
                "timestamp": int(time.time() * 1000)}])
            jobs.finish(prompt_id, {"prompt": item, "outputs": {}, "status": {
                "status_str": "error", "completed": False, "messages": messages}}, {})
        raise
    finally:
        if len(messages) > 1:  # (a prompt deleted from the queue ends without a word)
            await jobs.emit(client, *messages[-1])
        await jobs.emit(client, "executing", {"node": None, "prompt_id": prompt_id})
        await jobs.emit_status()


async def _generate(server, jobs, item, flow, key, rows, messages, overlay):
    number, prompt_id, graph = item[:3]
    websocket = graph[flow.output].get("class_type") == comfy.SAVE_WEBSOCKET
    try:
        images = await server.generate(None, key, rows)
        if overlay is not None:  # ImageCompositeMasked after the VAEDecode
            images = await run_in_threadpool(
                lambda: [comfy.composite(overlay[0], im, overlay[1]) for im in images])
        if flow.upscale is not None:  # ImageUpscaleWithModel before the save node
            images = await server.generate(None, _FinalUpscale(flow.upscale), images)
        if websocket:  # (as ComfyUI's previews: compression level 1, no text)
            pngs = await run_in_threadpool(
                lambda: [_png(im.convert("RGB"), compress_level=1) for im in images])
        else:
            texts = [server.infotext(key, r) for r in rows]
            # As ComfyUI's SaveImage: the graph, then each of the client's extra_pnginfo (the
            # web UI sends its "workflow", which it loads back from the PNG)
            pnginfo = item[3].get("extra_pnginfo") or {}
            chunks = {"prompt": json.dumps(graph),
                      **{k: json.dumps(v) for k, v in pnginfo.items()
                         if k not in ("prompt", "parameters")}}
            pngs = await run_in_threadpool(
                lambda: [png_bytes(im, t, chunks) for im, t in zip(images, texts)])
    except Exception as e:  # an ApiError (queue full, deadline, ...) or a failure
        messages.append(["execution_error", {"prompt_id": prompt_id,
                                             "exception_message": str(e),
                                             "exception_type": type(e).__name__}])
        jobs.finish(prompt_id, {"prompt": item, "outputs": {}, "status": {
            "status_str": "error", "completed": False, "messages": messages}}, {})
        return
    client = item[3]["client_id"]
    if websocket:
        # As ComfyUI's SaveImageWebsocket: "executing" the node, then each picture as a
        # binary message to the prompt's client; no file, no output in the history.
        await jobs.emit(client, "executing", {"node": flow.output, "display_node": flow.output,
                                              "prompt_id": prompt_id})
        for png in pngs:
            await jobs.emit_image(client, png)
        files, outputs = {}, {}
    else:
        prefix = os.path.basename(flow.filename_prefix) or "ComfyUI"
        files = {f"{prefix}_{number:05}_{i}_.png": data for i, data in enumerate(pngs)}
        outputs = {flow.output: {"images": [{"filename": name, "subfolder": "", "type": "output"}
                                            for name in files]}}
    messages.append(["execution_success", {"prompt_id": prompt_id,
                                           "timestamp": int(time.time() * 1000)}])
    jobs.finish(prompt_id, {"prompt": item, "outputs": outputs, "status": {
        "status_str": "success", "completed": True, "messages": messages}}, files)
    if outputs:
        await jobs.emit(client, "executed", {
            "node": flow.output, "display_node": flow.output, "output": outputs[flow.output],
            "prompt_id": prompt_id})
