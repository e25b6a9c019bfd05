"""AUTOMATIC1111's "SD upscale" script on ``POST /sdapi/v1/img2img``: ``script_name: "SD
upscale"`` (any case, as A1111 matches a script's title) with ``script_args: [info, overlap,
upscaler, scale]``, run as A1111's ``scripts/sd_upscale.py`` runs it (``engine/sd_upscale.py``).

The first init image, its transparency over white, is upscaled by ``scale`` with the upscaler
(an index into ``GET /sdapi/v1/upscalers``' list or a name from it, in any case; "None": not
upscaled at all) as the Extras tab upscales (``ExtrasJob``, in the worker); it is cut into tiles
of the request's ``width`` × ``height`` overlapping by ``overlap`` pixels; every tile of every
one of ``n_iter`` pictures is a row of one image-to-image job at ``denoising_strength``, seeded
as A1111 seeds it (picture n from ``seed + n``, tiles in batches of ``batch_size``), each with
its own generator so batching changes no tile; each picture's tiles are blended back. Every
picture's PNG info is the first tile's (Size the tile's, Seed the request's first), with A1111's
"SD upscale overlap" and "SD upscale upscaler" pairs.

Everything is checked before any work, each a 400 naming the field: the script on txt2img,
with a mask or with ControlNet units; ``script_args``' length, the overlap (``script_args[1]``),
the upscaler (``[2]``) and the scale (``[3]``: 1 to 8, as the Extras' ``upscaling_resize``);
the upscaled picture's sides, from the tile's to the server's ``max_side``; and the tiles to
redraw, ``tiles × n_iter``, at most ``TILE_FACTOR`` × SDRT_MAX_IMAGES (A1111 sets no bound, but
a large picture in small tiles would hold the worker for thousands of images).
"""
import math
from dataclasses import dataclass, replace

from fastapi.concurrency import run_in_threadpool

from sdrt.engine.errors import SdrtError
from sdrt.engine.extras import MAX_SCALE, UPSCALER_NONE
from sdrt.engine.request import short_repr
from sdrt.engine.sd_upscale import (NAME, check, combine, params, split, tile_count,
                                    tile_seeds, upscaled_size)

from .a1111_upscale import ExtrasJob, check_model, listed

TILE_FACTOR = 16  # tiles × n_iter a request may redraw: at most this × SDRT_MAX_IMAGES
ARGS = "[info, overlap, upscaler, scale]"  # script_args, as A1111's UI orders them


@dataclass(frozen=True)
class SdUpscale:
    """A request's SD upscale, checked."""
    overlap: int
    upscaler: str      # as GET /sdapi/v1/upscalers names it; "None": the image as it is
    scale: float
    tiles: int         # per picture
    batch_size: int    # A1111's batches of tiles, which its seeds follow
    n_iter: int        # pictures

    def seeds(self, seed):
        """Each tile's seed, [picture][tile], from the request's first ``seed``."""
        return tile_seeds(seed, self.tiles, self.batch_size, self.n_iter)

    def seed_span(self):
        """How many seeds from the first the tiles use (the last is first + span - 1)."""
        return max(max(picture) for picture in self.seeds(0)) + 1

    def params(self):
        return params(self.overlap, self.upscaler)


def named(script_name):
    """Whether ``script_name`` asks for SD upscale."""
    return isinstance(script_name, str) and script_name.lower() == NAME.lower()


def _bad(field, message):
    from .app import ApiError
    return ApiError(400, message, "bad_request", field)


def _upscaler(server, value):
    """``script_args[2]``, an index into A1111's list of upscalers or a name from it (any
    case) → the name as listed; a model's file is checked from its header."""
    field = "script_args[2]"
    models = server.runner.upscaler_names()
    names = listed(models)  # GET /sdapi/v1/upscalers' order
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise _bad(field, f"{field} (the upscaler) must be an index from 0 to "
                              f"{len(names) - 1} into GET /sdapi/v1/upscalers "
                              f"({', '.join(names)}) or a name from it, got {value}")
        name = names[value]
    elif isinstance(value, str) and value.lower() in [n.lower() for n in names]:
        name = names[[n.lower() for n in names].index(value.lower())]
    else:
        raise _bad(field, f"{field} (the upscaler) must be one of GET /sdapi/v1/upscalers "
                          f"({', '.join(names)}), by name or index, got {short_repr(value)}")
    if name in models:
        check_model(server, name, field)
    return name


def _refuse_controlnet(scripts):
    """ControlNet units with SD upscale are not supported: a 400 for any enabled unit."""
    from .a1111_controlnet import script_args
    args = script_args(scripts)
    if args is None:
        return
    if not isinstance(args, list) or any(
            not (isinstance(u, dict) and u.get("enabled", True) is False) for u in args):
        raise _bad("alwayson_scripts", "alwayson_scripts must hold no enabled ControlNet unit "
                                       "with script_name 'SD upscale': ControlNet on its tiles "
                                       "is not supported")


def check_request(server, body, req, init_images, mask):
    """The request's SD upscale (``req``: its checked generation, whose size is the tile's),
    every setting checked: a 400 naming the field. Reads --upscaler-dir: off the event loop."""
    if init_images is None:
        raise _bad("script_name", f"script_name {NAME!r} is an image-to-image script: POST "
                                  f"/sdapi/v1/img2img with init_images")
    if mask is not None:
        raise _bad("script_name", f"script_name {NAME!r} redraws the whole picture: it takes "
                                  f"no mask (inpainting), got one")
    _refuse_controlnet(body.alwayson_scripts)
    args = body.script_args
    if not isinstance(args, list) or len(args) != 4:
        raise _bad("script_args", f"script_args must be {ARGS} (4 items) with script_name "
                                  f"{NAME!r}, got {short_repr(args)}")
    _, overlap, upscaler, scale = args
    tile_w, tile_h = req.width, req.height
    try:
        check(tile_w, tile_h, tile_w, tile_h, overlap)
    except SdrtError as e:
        raise _bad("script_args[1]", f"script_args[1]: {e}") from None
    name = _upscaler(server, upscaler)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
            not (math.isfinite(scale) and 1 <= scale <= MAX_SCALE):
        raise _bad("script_args[3]", f"script_args[3] (the scale) must be a number from 1 to "
                                     f"{MAX_SCALE:g}, got {short_repr(scale)}")
    image, scale = init_images[0], float(scale)
    width, height = upscaled_size(image.width, image.height, scale, name)
    if name == UPSCALER_NONE:  # A1111's script: no upscale at all, whatever the scale
        field, what = "script_args[2]", f"init_images[0], kept as it is by upscaler {name},"
    else:
        field = "script_args[3]"
        what = f"init_images[0] ({image.width}x{image.height}) upscaled by {scale:g}"
    try:
        tiles = tile_count(width, height, tile_w, tile_h, overlap, where=f"{field}: {what}")
    except SdrtError as e:
        raise _bad(field, str(e)) from None
    top = server.limits.max_side
    if max(width, height) > top:
        raise _bad(field, f"{field}: {what} is {width}x{height}; its sides must be at most "
                          f"{top} (SDRT_MAX_SIDE)")
    most = TILE_FACTOR * server.limits.max_images
    if tiles * body.n_iter > most:
        field = "n_iter" if tiles <= most else field
        fewer = "ask for fewer pictures, " if field == "n_iter" else ""
        raise _bad(field, f"{field}: SD upscale redraws at most {most} tiles per request "
                          f"({TILE_FACTOR} × SDRT_MAX_IMAGES), got {tiles} tiles of "
                          f"{tile_w}x{tile_h} over {width}x{height} × n_iter {body.n_iter}: "
                          f"{fewer}upscale less or ask for larger tiles")
    _check_memory(server, req, min(tiles * body.n_iter, server.config.max_batch))
    return SdUpscale(overlap, name, scale, tiles, body.batch_size, body.n_iter)


def _check_memory(server, req, per_call):
    """The model's checks of the tiles' largest call (``per_call`` rows; the request was
    checked for its batch_size × n_iter)."""
    from .app import _A1111_NAMES, ApiError, _param_of
    try:
        server.runner.check(replace(req, num_images_per_prompt=per_call), _A1111_NAMES)
    except SdrtError as e:
        message = " ".join(str(e).split())
        raise ApiError(400, message, "bad_request", _param_of(message)) from None


async def run(server, request, script, key, template, init_image, prompt):
    """The pictures, their PNG info texts and their first seeds: ``init_image`` upscaled (a
    job of its own), its tiles redrawn as rows like ``template`` (seeded from its seed) of
    ``key`` (the tile's size, the request's strength), and blended back; ``prompt``: the
    prompt as given, for the PNG info."""
    from sdrt.engine.images import to_rgb8
    image = await run_in_threadpool(to_rgb8, init_image)  # A1111's flatten: over white
    if script.upscaler != UPSCALER_NONE:
        [(image, _)] = await server.generate(
            request, ExtrasJob(script.upscaler, scale=script.scale), [image])
    grid = await run_in_threadpool(split, image, key.width, key.height, script.overlap)
    tiles = grid.tiles()
    seeds = script.seeds(template.seed)
    rows = [replace(template, seed=s, init_image=tile)
            for picture in seeds for s, tile in zip(picture, tiles)]
    out = await server.generate(request, key, rows)
    n = len(tiles)
    pictures = await run_in_threadpool(
        lambda: [combine(grid.replace(out[i:i + n])) for i in range(0, len(out), n)])
    # A1111's Processed of the script: every picture carries the first tile's info.
    text = server.infotext(key, rows[0], prompt, tuple(script.params().items()))
    return pictures, [text] * len(pictures), [picture[0] for picture in seeds]
