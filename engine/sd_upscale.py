"""AUTOMATIC1111's "SD upscale" img2img script: the init image upscaled by ``scale`` with an
upscaler (``engine/extras.py``'s A1111 upscale; "None" keeps it as it is), cut into tiles of
the request's size that overlap by ``overlap`` pixels, each tile redrawn by image to image,
and the tiles pasted back with their overlaps blended linearly. The CLI (``sdrt generate
--sd-upscale``) and the A1111 API (``script_name: "SD upscale"``) share it; no torch here.

The tiles (``split``) are A1111's ``images.split_grid``: as many columns as cover the width
with the overlap, spread evenly from the left edge to the right one (their offsets rounded
down), the last at the edge; rows the same. ``combine`` is its ``combine_grid``: each tile
pasted over the row so far with its first ``overlap`` columns faded in by a ramp of
``255·i/overlap`` (rounded down, as 8-bit masks), then each row over the picture so far with
its first ``overlap`` rows faded in the same way. Seeds are A1111's: tiles go in batches of
``batch_size``, batch i's images seeded from ``seed + i`` on (one more per image of the
batch), and each of ``n_iter`` pictures starts from ``seed + n``.
"""
import math
from dataclasses import dataclass, field

from .errors import SdrtError

NAME = "SD upscale"  # the script's title, as A1111's API names it (any case)
MAX_OVERLAP = 256  # A1111's slider


@dataclass
class Grid:
    """Tiles of a ``width`` × ``height`` picture: ``rows`` is [(y, [(x, tile), ...]), ...]."""
    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    rows: list = field(default_factory=list)

    def tiles(self):
        """Every tile, row by row, left to right (the order A1111 redraws them in)."""
        return [tile for _, row in self.rows for _, tile in row]

    def replace(self, tiles):
        """A grid of the same layout holding ``tiles`` (in ``tiles()``' order)."""
        it = iter(tiles)
        return Grid(self.width, self.height, self.tile_w, self.tile_h, self.overlap,
                    [(y, [(x, next(it)) for x, _ in row]) for y, row in self.rows])


def _offsets(size, tile, overlap):
    """Where A1111's tiles start along a side of ``size`` pixels."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [size - tile if int(i * step) + tile >= size else int(i * step)
            for i in range(count)]


def check(width, height, tile_w, tile_h, overlap, where="the upscaled image"):
    """``SdrtError`` unless tiles of ``tile_w`` × ``tile_h`` overlapping by ``overlap`` fit a
    ``width`` × ``height`` picture (A1111 pads a smaller picture with black)."""
    if isinstance(overlap, bool) or not isinstance(overlap, int) or \
            not 0 <= overlap <= MAX_OVERLAP or overlap >= min(tile_w, tile_h):
        raise SdrtError(f"the SD upscale overlap must be an integer from 0 to "
                        f"{min(MAX_OVERLAP, min(tile_w, tile_h) - 1)} (below the tile's sides "
                        f"{tile_w}x{tile_h}), got {overlap!r}")
    if width < tile_w or height < tile_h:
        raise SdrtError(f"{where} is {width}x{height}, smaller than the SD upscale tile "
                        f"{tile_w}x{tile_h} (the request's width and height): upscale more or "
                        f"ask for smaller tiles")


def split(image, tile_w, tile_h, overlap):
    """A1111's ``split_grid`` of a PIL ``image`` (at least one tile large)."""
    check(image.width, image.height, tile_w, tile_h, overlap)
    grid = Grid(image.width, image.height, tile_w, tile_h, overlap)
    for y in _offsets(image.height, tile_h, overlap):
        grid.rows.append((y, [(x, image.crop((x, y, x + tile_w, y + tile_h)))
                              for x in _offsets(image.width, tile_w, overlap)]))
    return grid


def combine(grid):
    """A1111's ``combine_grid``: the tiles pasted back, each overlap faded in."""
    import numpy as np
    from PIL import Image
    o = grid.overlap
    ramp = (np.arange(o, dtype=np.float32) * 255 / o).astype(np.uint8) if o else None
    out = Image.new("RGB", (grid.width, grid.height))
    for y, row in grid.rows:
        line = Image.new("RGB", (grid.width, grid.tile_h))
        for x, tile in row:
            if x == 0 or not o:
                line.paste(tile, (x, 0))
                continue
            fade = Image.fromarray(np.repeat(ramp[None, :], grid.tile_h, axis=0), "L")
            line.paste(tile.crop((0, 0, o, grid.tile_h)), (x, 0), mask=fade)
            line.paste(tile.crop((o, 0, grid.tile_w, grid.tile_h)), (x + o, 0))
        if y == 0 or not o:
            out.paste(line, (0, y))
            continue
        fade = Image.fromarray(np.repeat(ramp[:, None], grid.width, axis=1), "L")
        out.paste(line.crop((0, 0, grid.width, o)), (0, y), mask=fade)
        out.paste(line.crop((0, o, grid.width, grid.tile_h)), (0, y + o))
    return out


def tile_seeds(seed, tiles, batch_size, n_iter):
    """The seed of each tile of each picture, [picture][tile], as A1111's script draws them."""
    return [[seed + n + k // batch_size + k % batch_size for k in range(tiles)]
            for n in range(n_iter)]


def params(overlap, upscaler):
    """The PNG info pairs the script adds (after the image-to-image request's own)."""
    return {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}


def tile_count(width, height, tile_w, tile_h, overlap, where="the upscaled image"):
    """How many tiles ``split`` cuts a ``width`` × ``height`` picture into, checked first
    (``check``; ``where`` names the picture in its message)."""
    check(width, height, tile_w, tile_h, overlap, where)
    return len(_offsets(width, tile_w, overlap)) * len(_offsets(height, tile_h, overlap))


def upscaled_size(width, height, scale, upscaler):
    """The size the script upscales a ``width`` × ``height`` init image to (``upscale``'s):
    A1111's size × ``scale`` rounded down to a multiple of 8; "None" keeps the image's."""
    from .extras import UPSCALER_NONE, Extras
    if upscaler == UPSCALER_NONE:
        return width, height
    return Extras(upscaler, scale=scale).size(width, height)[1:]


def upscale(image, scale, upscaler, models=None):
    """The script's first step: the PIL ``image`` flattened onto white (A1111's
    ``img2img_background_color``) and upscaled by ``scale`` with ``upscaler`` (A1111's
    ``Upscaler.upscale``: ``Extras``; "None" keeps it); ``models(name, field)`` is the loaded
    ``Upscaler`` of a model name."""
    from .extras import Extras
    from .images import to_rgb8
    return Extras(upscaler, scale=scale).apply(models, [to_rgb8(image)])[0][0]


def redraw(pipe, grid, seeds, batch_size, **call):
    """The picture of ``grid`` (``split``) with every tile redrawn by ``pipe``'s image to image
    at the tile's size, ``batch_size`` tiles a call, and combined. Tile k is drawn from its own
    CPU generator seeded ``seeds[k]`` (one picture's row of ``tile_seeds``), so the picture
    depends on the seeds, not on how the tiles are batched. ``call``: the pipeline's other
    arguments (the prompt, ``strength``, steps, sampler ...). ``pipe.timings`` sums the calls'."""
    import torch
    tiles = grid.tiles()
    if len(seeds) != len(tiles):
        raise SdrtError(f"seeds must hold one seed per tile ({len(tiles)}), got {len(seeds)}")
    drawn, timings = [], {}
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start:start + batch_size]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + len(batch)]]
        drawn += pipe(image=batch, height=grid.tile_h, width=grid.tile_w,
                      num_images_per_prompt=len(batch), generator=generators, output_type="pil",
                      **call)
        timings = {k: timings.get(k, 0) + v for k, v in pipe.timings.items()}
    pipe.timings = timings
    return combine(grid.replace(drawn))
