"""A1111's SD upscale script's tiles, blending and seeds (engine/sd_upscale.py): the tile
offsets A1111's split_grid gives, written out for sizes worked by hand; tiles pasted back
unchanged give the picture; overlaps fade from one tile to the next; the seeds per tile."""
import numpy as np
import pytest
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.sd_upscale import combine, split, tile_seeds


def _picture(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, tile, overlap, xs", [
    ((1024, 512), (512, 512), 64, [0, 256, 512]),   # ceil(960 / 448) = 3 columns, 256 apart
    ((1000, 512), (512, 512), 64, [0, 244, 488]),   # (1000 - 512) / 2 = 244
    ((512, 512), (512, 512), 64, [0]),              # one tile: the picture itself
    ((700, 300), (300, 300), 0, [0, 200, 400]),     # no overlap: still spread to the edges
    ((410, 96), (128, 96), 32, [0, 94, 188, 282]),  # int() rounds each offset down
])
def test_tiles_are_a1111s(size, tile, overlap, xs):
    grid = split(_picture(*size), *tile, overlap)
    assert [x for x, _ in grid.rows[0][1]] == xs
    assert len(grid.rows) == len(grid.tiles()) // len(xs)
    assert all(t.size == tile for t in grid.tiles())
    assert [y for y, _ in grid.rows][-1] == size[1] - tile[1]  # the last row at the edge


@pytest.mark.parametrize("overlap", [0, 8, 32])
def test_tiles_pasted_back_give_the_picture(overlap):
    image = _picture(410, 300, seed=1)
    grid = split(image, 128, 96, overlap)
    assert np.array_equal(np.asarray(combine(grid)), np.asarray(image))


def test_overlaps_fade_from_tile_to_tile():
    # Two tiles side by side, two rows: in the 16 overlapping columns the left tile's
    # colour gives way to the right one's by the 8-bit ramp 255·i/16, rounded down.
    grid = split(Image.new("RGB", (48, 32)), 32, 24, 16)
    assert [x for x, _ in grid.rows[0][1]] == [0, 16] and [y for y, _ in grid.rows] == [0, 8]
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 200)]
    out = np.asarray(combine(grid.replace([Image.new("RGB", (32, 24), c) for c in colours])),
                     dtype=np.int32)
    ramp = (np.arange(16) * 255 / 16).astype(np.uint8).astype(np.int32)
    left = out[0, 16:32, 0]  # red fading out across the first row's overlap
    assert np.abs(left - np.rint(200 * (255 - ramp) / 255)).max() <= 1, left
    assert out[0, 0].tolist() == [200, 0, 0] and out[0, 47].tolist() == [0, 200, 0]
    assert out[31, 0].tolist() == [0, 0, 200] and out[31, 47].tolist() == [200, 200, 200]
    down = out[8:24, 0, 2]  # the second row fading in over the first, column 0
    assert np.all(np.diff(down) >= 0) and down[0] == 0 and down[-1] > 0, down


def test_seeds_per_tile_are_a1111s():
    # batch 1: one more per tile; batch 2: batch i from seed + i, one more per image in it;
    # picture n from seed + n.
    assert tile_seeds(100, 4, 1, 1) == [[100, 101, 102, 103]]
    assert tile_seeds(100, 5, 2, 1) == [[100, 101, 101, 102, 102]]
    assert tile_seeds(7, 3, 1, 2) == [[7, 8, 9], [8, 9, 10]]


@pytest.mark.parametrize("size, tile, overlap, message", [
    ((100, 100), (128, 96), 16, "smaller than the SD upscale tile 128x96"),
    ((300, 300), (128, 96), 96, "overlap must be an integer from 0 to 95"),
    ((300, 300), (128, 96), -1, "overlap must be an integer from 0 to 95"),
    ((300, 300), (128, 96), 8.5, "overlap must be an integer"),
])
def test_refusals(size, tile, overlap, message):
    with pytest.raises(SdrtError, match=message):
        split(_picture(*size), *tile, overlap)
