"""AUTOMATIC1111's upscalers on ``sdrt serve --upscaler-dir``: ``GET /sdapi/v1/upscalers`` and
the Extras tab's API, ``POST /sdapi/v1/extra-single-image`` and
``/sdapi/v1/extra-batch-images``.

The list is A1111's: "None", "Lanczos" and "Nearest", then --upscaler-dir's models sorted by
name, each with its file, its family (``model_name``: "RealESRGAN" for the names A1111 gives
Real-ESRGAN's released files, "ESRGAN" for the others, as A1111 files them) and its scale,
read from the file's header.

An Extras request runs as A1111's ``run_extras`` runs it (``engine/extras.py``: ``upscaler_1``
by ``upscaling_resize`` (``resize_mode`` 0) or to cover ``upscaling_resize_w`` ×
``upscaling_resize_h`` (1), cut with ``upscaling_crop``, ``upscaler_2`` blended in at
``extras_upscaler_2_visibility``). Each PNG keeps the input's text chunks (its
``parameters``) and gains A1111's ``postprocessing`` text, which ``html_info`` carries too, as
A1111's HTML.

The upscale is a job of the scheduler (``ExtrasJob`` is its key, the images its rows): it runs in
the worker thread that owns the device, queued with generation (429 when the queue is full,
503 past the deadline), and a model upscaler loads there (``Runner.upscaler``). Every setting
and every output size (at most the server's ``max_side``) is checked before the job is queued:
a 400 naming the field. Face restoration (GFPGAN, CodeFormer) is not in sdrt: a visibility
above 0 is a 400, never ignored; ``upscale_first`` and ``show_extras_results`` change nothing
here (A1111's API returns the images either way).
"""
import base64
import html
import math
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from sdrt.engine.errors import SdrtError
from sdrt.engine.extras import MAX_SCALE, UPSCALER_NONE, Extras
from sdrt.engine.hires import IMAGE_UPSCALERS
from sdrt.engine.request import short_repr

from . import schemas


@dataclass(frozen=True)
class ExtrasJob(Extras):
    """An Extras request's upscale, checked: the scheduler's key of its job, whose rows are its
    images (PIL); requests with the same settings may share a call."""

    def run(self, runner, images):
        """The worker's call: [(upscaled image, A1111's postprocessing text)], one per image."""
        return self.apply(lambda name, field: _model(runner, name, field), images)


def _model(runner, name, field):
    """Upscale model ``name`` as the runner loads it; ``SdrtError`` naming ``field`` where
    --upscaler-dir lost its file since the request was checked, or it does not load."""
    if runner.upscaler_path(name) is None:
        raise SdrtError(f"{field} names upscaler {name!r}, which --upscaler-dir no longer has")
    try:
        return runner.upscaler(name)
    except SdrtError as e:
        raise SdrtError(f"{field} names upscaler {name!r}, whose file does not load: "
                        f"{' '.join(str(e).split())}") from None


# -- checking a request -----------------------------------------------------------------------

def check_model(server, name, field):
    """A 400 naming ``field`` unless --upscaler-dir has upscale model ``name`` in a file sdrt
    runs (read from its header: nothing loaded)."""
    from .app import ApiError
    path = server.runner.upscaler_path(name)
    if path is None:
        raise ApiError(400, f"{field} must be {_choices(server)}, got "
                            f"{short_repr(name)}", "bad_request", field)
    from sdrt.engine.upscaler_config import file_config
    try:
        file_config(path)
    except SdrtError as e:
        raise ApiError(400, f"{field} names upscaler {name!r}, whose file is not one sdrt "
                            f"runs: {' '.join(str(e).split())}", "bad_request", field) from None


def _choices(server):
    names = server.runner.upscaler_names()
    models = (f"one of --upscaler-dir's models ({', '.join(names)})" if names else
              "an upscale model (none: the server has no --upscaler-dir, or it holds no "
              ".safetensors file)")
    return f"None, {', '.join(IMAGE_UPSCALERS)} or {models}"


def _check(server, body) -> ExtrasJob:
    """The request's settings, every one checked (a 400 naming the field): its job."""
    from .app import ApiError

    def refuse(field, allowed, value=None):
        value = getattr(body, field) if value is None else value
        raise ApiError(400, f"{field} must be {allowed}, got {short_repr(value)}",
                       "bad_request", field)

    def fraction(field):
        value = getattr(body, field)
        if not (math.isfinite(value) and 0 <= value <= 1):
            refuse(field, "a number from 0 to 1")
        return float(value)

    for field, what in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
        if fraction(field) != 0:
            refuse(field, f"0: face restoration ({what}) is not supported")
    fraction("codeformer_weight")
    visibility = fraction("extras_upscaler_2_visibility")
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(body, field)
        if name not in (UPSCALER_NONE, *IMAGE_UPSCALERS):
            check_model(server, name, field)
    if body.resize_mode not in (0, 1):
        refuse("resize_mode", "0 (scale by upscaling_resize) or 1 (scale to "
                              "upscaling_resize_w x upscaling_resize_h)")
    if body.resize_mode == 0:
        if not (math.isfinite(body.upscaling_resize) and 1 <= body.upscaling_resize
                <= MAX_SCALE):
            refuse("upscaling_resize", f"a number from 1 to {MAX_SCALE:g}")
        return ExtrasJob(body.upscaler_1, body.upscaler_2, visibility,
                         float(body.upscaling_resize))
    top = server.limits.max_side
    for field in ("upscaling_resize_w", "upscaling_resize_h"):
        if not 1 <= getattr(body, field) <= top:
            refuse(field, f"an integer from 1 to {top} (SDRT_MAX_SIDE)")
    return ExtrasJob(body.upscaler_1, body.upscaler_2, visibility, None,
                     body.upscaling_resize_w, body.upscaling_resize_h, body.upscaling_crop)


def _check_size(server, extras, image, name):
    """A 400 unless ``image``'s upscale has sides from 8 to the server's ``max_side``: naming
    ``upscaling_resize``, or the side of resize_mode 1 that sets the scale."""
    from .app import ApiError
    if extras.upscaler_1 == UPSCALER_NONE:
        return
    top = server.limits.max_side
    by, w, h = extras.size(image.width, image.height)
    if 8 <= min(w, h) and max(w, h) <= top:
        return
    if extras.scale is not None:
        field, asked = "upscaling_resize", f"upscaling_resize {extras.scale:g}"
    else:  # the side whose ratio sets the scale
        wide = extras.width / image.width >= extras.height / image.height
        field = "upscaling_resize_w" if wide else "upscaling_resize_h"
        asked = (f"{field} {extras.width if wide else extras.height} (covering "
                 f"{extras.width}x{extras.height}: a scale of {by:.4g})")
    raise ApiError(400, f"{asked} makes {name} ({image.width}x{image.height}) {w}x{h}; the "
                        f"upscaled image's sides must be from 8 to {top} (SDRT_MAX_SIDE)",
                   "bad_request", field)


# -- answering ----------------------------------------------------------------------------------

def _html(text):
    """A1111's ``plaintext_to_html``."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _png(image, source, text):
    """``image`` as base64 PNG with ``source``'s text chunks (its ``parameters``) and A1111's
    ``postprocessing`` text, as A1111's API encodes an Extras result."""
    from sdrt.engine.extras import png_with_text
    return base64.b64encode(png_with_text(image, source, "postprocessing", text)).decode("ascii")


async def _upscale(server, request, body, items, names, field):
    """Decode ``items`` (base64 images named ``names`` in messages), check the request and
    each output's size, run the job; ([base64 PNG], the last image's postprocessing text)."""
    from .app import _decode_bytes, b64_bytes

    def decode():
        return [_decode_bytes(b64_bytes(text, name, field), name, server.limits, field)
                for text, name in zip(items, names)]
    extras = await run_in_threadpool(_check, server, body)  # (reads --upscaler-dir)
    images = await run_in_threadpool(decode)
    for image, name in zip(images, names):
        _check_size(server, extras, image, name)
    if not images:
        return [], ""
    results = await server.generate(request, extras, images)
    pngs = await run_in_threadpool(
        lambda: [_png(out, source, text) for (out, text), source in zip(results, images)])
    return pngs, results[-1][1]


def listed(models):
    """The upscalers in the order ``GET /sdapi/v1/upscalers`` lists them (an index into it
    names one): "None", the image upscalers, then the names of ``models`` by name, case
    aside."""
    return [UPSCALER_NONE, *IMAGE_UPSCALERS, *sorted(models, key=str.lower)]


def _listed_items(config):
    """The list's items: the image upscalers by name, --upscaler-dir's models with their
    family, file and scale."""
    from sdrt.engine.upscaler_config import A1111_NAMES, file_config, upscaler_files
    models = upscaler_files(config.upscaler_dir)
    names = listed(models)
    items = [schemas.UpscalerItem(name=n) for n in names[:1 + len(IMAGE_UPSCALERS)]]
    scales = {}
    for name in names[1 + len(IMAGE_UPSCALERS):]:
        path = models[name]
        if path not in scales:
            try:
                scales[path] = file_config(path).scale
            except SdrtError:  # listed all the same; a request naming it gets the reason
                scales[path] = None
        family = "RealESRGAN" if name in A1111_NAMES.values() else "ESRGAN"
        items.append(schemas.UpscalerItem(name=name, model_name=family, model_path=path,
                                          scale=scales[path]))
    return items


def register(app, server_of, api_error):
    """Add the routes to ``app``; ``api_error(status, message, kind, param)`` builds the
    app's error."""

    @app.get("/sdapi/v1/upscalers", response_model=list[schemas.UpscalerItem],
             tags=["AUTOMATIC1111"])
    async def upscalers(request: Request):
        """What ``hr_upscaler`` and the Extras' ``upscaler_1``/``upscaler_2`` name: "None",
        the image upscalers, then --upscaler-dir's models with their scales."""
        return await run_in_threadpool(_listed_items, server_of(request).config)

    @app.post("/sdapi/v1/extra-single-image", tags=["AUTOMATIC1111"],
              response_model=schemas.ExtrasSingleImageResponse)
    async def extra_single_image(body: schemas.ExtrasSingleImageRequest, request: Request):
        """A1111's Extras on one image (``image``, base64): upscaled by ``upscaler_1``,
        blended with ``upscaler_2``; ``html_info`` says what was done."""
        server = server_of(request)
        server.require_ready()
        if not body.image:
            raise api_error(400, "image is required: a base64-encoded image", "bad_request",
                            "image")
        pngs, text = await _upscale(server, request, body, [body.image], ["image"], "image")
        return schemas.ExtrasSingleImageResponse(html_info=_html(text), image=pngs[0])

    @app.post("/sdapi/v1/extra-batch-images", tags=["AUTOMATIC1111"],
              response_model=schemas.ExtrasBatchImagesResponse)
    async def extra_batch_images(body: schemas.ExtrasBatchImagesRequest, request: Request):
        """A1111's Extras on each image of ``imageList`` (``[{data, name}]``, data base64), as
        extra-single-image; ``html_info`` is the last image's."""
        server = server_of(request)
        server.require_ready()
        top = server.limits.max_images
        if len(body.imageList) > top:
            raise api_error(400, f"imageList must hold at most {top} images "
                                 f"(SDRT_MAX_IMAGES), got {len(body.imageList)}",
                            "bad_request", "imageList")
        names = [f"imageList[{i}].data" for i in range(len(body.imageList))]
        pngs, text = await _upscale(server, request, body, [f.data for f in body.imageList],
                                    names, "imageList")
        return schemas.ExtrasBatchImagesResponse(html_info=_html(text), images=pngs)
