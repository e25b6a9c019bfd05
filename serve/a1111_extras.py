"""The rest of AUTOMATIC1111's API that its clients call besides generating: setting the
options they read (``POST /sdapi/v1/options``), reading an image's PNG info
(``/sdapi/v1/png-info``), the queue's state (``/sdapi/v1/progress``), and the lists and
refreshes of --styles-file's styles, --embedding-dir's embeddings and --vae-dir's VAEs.

Options are the server's, as A1111's are: ``CLIP_stop_at_last_layers`` and ``sd_vae`` set
here are the clip skip and VAE of every later request that does not set its own in
``override_settings``. Only the
settings sdrt has are taken; any other is refused with a 400 naming it, never ignored.
``/sdapi/v1/progress`` tells how many requests are queued or running; it does not follow
the steps of one (a replayed CUDA graph cannot report them), so ``progress`` stays 0 until
the request is answered.
"""
import io

from fastapi import Request

from sdrt.engine.request import short_repr
from . import schemas

# The settings POST /sdapi/v1/options takes, and GET returns.
OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "samples_format")


def model_titles(runner, model_path):
    """What names the loaded model in A1111's settings: its title "NAME [HASH]", its name,
    its short hash, its file name."""
    import os
    names = {f"{runner.model_name} [{runner.model_hash}]", runner.model_name, runner.model_hash}
    if model_path:
        names.add(os.path.basename(os.path.normpath(model_path)))
    return names - {None}


def check_settings(server, settings, bad, text_layers, where=""):
    """A1111 settings (POST /sdapi/v1/options' body, or a request's ``override_settings``,
    ``where`` its field then) as sdrt takes them: only ``OPTIONS``, ``sd_model_checkpoint``
    naming the loaded model, ``samples_format`` png, ``CLIP_stop_at_last_layers`` within the
    text encoder, ``sd_vae`` one of --vae-dir's (or Automatic, None); ``bad(message, param)``
    the 400 of anything else."""
    from .app import sd_vae
    field = where + "." if where else ""
    if not isinstance(settings, dict):
        raise bad(f"{where or 'the request body'} must be an object of settings, got "
                  f"{short_repr(settings)}", where or None)
    for key in settings:
        if key == "sd_checkpoint_hash" and settings[key] in (None, server.runner.model_sha256):
            continue  # (what GET /sdapi/v1/options returns, posted back as it was)
        if key not in OPTIONS:
            raise bad(f"{field}{key} is not a setting sdrt has; it takes {', '.join(OPTIONS)}",
                      where or key)
    model = settings.get("sd_model_checkpoint")
    if model is not None and model not in model_titles(server.runner, server.config.model):
        raise bad(f"{field}sd_model_checkpoint must name the loaded model, "
                  f"{server.runner.model_name} [{server.runner.model_hash}] (the server "
                  f"runs one model), got {short_repr(model)}", where or "sd_model_checkpoint")
    if settings.get("samples_format", "png") != "png":
        raise bad(f"{field}samples_format must be png, got "
                  f"{short_repr(settings['samples_format'])}", where or "samples_format")
    layers = settings.get("CLIP_stop_at_last_layers")
    if layers is not None:
        top = text_layers(server)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= top:
            raise bad(f"{field}CLIP_stop_at_last_layers must be an integer from 1 to {top} "
                      f"(the text encoder has {top} layers), got {short_repr(layers)}",
                      where or "CLIP_stop_at_last_layers")
    if "sd_vae" in settings:
        sd_vae(server, {"sd_vae": settings["sd_vae"]}, where or None)


def register(app, server_of, api_error, text_layers):
    """Add the routes to ``app``; ``api_error(status, message, kind, param)`` builds the
    app's error; ``text_layers(server)`` is how many layers clip skip can reach."""

    def bad(message, param):
        return api_error(400, message, "bad_request", param)

    @app.post("/sdapi/v1/options", tags=["AUTOMATIC1111"])
    async def set_options(request: Request):
        """Set the settings sdrt has: ``sd_model_checkpoint`` (only the loaded model: the
        server runs one), ``CLIP_stop_at_last_layers`` (the default clip skip), ``sd_vae``
        (the default VAE: "Automatic", "None" or one of --vae-dir's) and ``samples_format``
        ("png")."""
        from .app import json_body
        server = server_of(request)
        server.require_ready()
        body = await json_body(request)
        check_settings(server, body, bad, text_layers)
        for key in ("CLIP_stop_at_last_layers", "sd_vae"):
            if body.get(key) is not None:
                server.options[key] = body[key]
        return None

    @app.post("/sdapi/v1/png-info", tags=["AUTOMATIC1111"])
    async def png_info(request: Request):
        """An image's generation settings: ``info`` (its ``parameters`` text), ``items``
        (its other text chunks) and ``parameters`` (the text read as A1111 reads it)."""
        from PIL import Image, UnidentifiedImageError

        from sdrt.engine.infotext import parse

        from .app import b64_bytes, json_body
        body = await json_body(request)
        text = body.get("image") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text:
            raise bad(f"image must be a base64-encoded image, got {short_repr(text, 40)}",
                      "image")
        raw = b64_bytes(text, "image", "image")
        try:
            with Image.open(io.BytesIO(raw)) as im:
                info = dict(im.info)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise bad(f"image must be a base64-encoded image, got {short_repr(text, 40)}",
                      "image")
        geninfo = info.pop("parameters", "")
        geninfo = geninfo if isinstance(geninfo, str) else ""
        items = {k: v for k, v in info.items() if isinstance(v, str)}
        parameters = {}
        if geninfo:
            prompt, negative, pairs = parse(geninfo)
            parameters = {"Prompt": prompt, "Negative prompt": negative, **pairs}
            width, _, height = pairs.get("Size", "").partition("x")
            if width.isdigit() and height.isdigit():
                parameters.update({"Size-1": width, "Size-2": height})
        return {"info": geninfo, "items": items, "parameters": parameters}

    @app.get("/sdapi/v1/progress", tags=["AUTOMATIC1111"])
    async def progress(request: Request):
        """The queue's state: ``state.job_count`` requests queued or running. Steps are
        not followed: ``progress`` is 0 and ``current_image`` null."""
        scheduler = server_of(request).scheduler
        count = scheduler.depth() + scheduler.running()
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False,
                          "stopping_generation": False, "job": "", "job_count": count,
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                          "sampling_steps": 0}}

    @app.get("/sdapi/v1/sd-vae", tags=["AUTOMATIC1111"])
    async def sd_vae(request: Request):
        """The VAEs of --vae-dir that ``sd_vae`` names (none without it)."""
        runner = server_of(request).runner
        return [{"model_name": name, "filename": runner.vae_path(name)}
                for name in runner.vae_names()]

    @app.get("/sdapi/v1/embeddings", tags=["AUTOMATIC1111"])
    async def embeddings(request: Request):
        """The textual-inversion embeddings of --embedding-dir, as A1111 lists its own: those
        loaded (their width and vectors) and those skipped (with the reason)."""
        server = server_of(request)
        server.require_ready()
        runner = server.runner
        width = next(iter(runner.pipe.text_encoders.values())).config.hidden_size
        blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        return {"loaded": {name: {**blank, "shape": width, "vectors": vectors}
                           for name, (_, vectors) in sorted(runner.embeddings.items())},
                "skipped": {name: {**blank, "shape": None, "vectors": None, "reason": why}
                            for name, why in sorted(runner.skipped_embeddings.items())}}

    @app.get("/sdapi/v1/prompt-styles", response_model=list[schemas.PromptStyleItem],
             tags=["AUTOMATIC1111"])
    async def prompt_styles(request: Request):
        """The styles requests may name in ``styles`` (--styles-file's), in the file's order."""
        return [schemas.PromptStyleItem(name=s.name, prompt=s.prompt,
                                        negative_prompt=s.negative_prompt)
                for s in server_of(request).styles.values()]

    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras",
                 "/sdapi/v1/refresh-vae"):
        @app.post(path, tags=["AUTOMATIC1111"])
        async def refresh():
            """Nothing to refresh: --lora-dir is read at every request, the model is one."""
            return None
