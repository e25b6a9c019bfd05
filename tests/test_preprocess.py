"""The ControlNet preprocessors (``engine.preprocess``) against OpenCV run by hand as A1111's
ControlNet extension runs it: the short side scaled to the resolution, the edge-padding to a
multiple of 64 and its removal, each preprocessor's own operation, the defaults and ranges of
its settings, "pixel perfect", and the errors for what sdrt does not run."""
import numpy as np
import pytest
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.preprocess import (PREPROCESSORS, frame_map, get, pixel_perfect_resolution,
                                    preprocess, settings)


@pytest.fixture
def cv2():
    return pytest.importorskip("cv2")


def _picture(h, w, seed=0):
    """Flat blocks of random colours with noise: edges a canny map finds, and a mid-grey mean
    a threshold splits."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3))
    x = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[:h, :w]
    return (x + rng.integers(-12, 13, x.shape)).clip(0, 255).astype(np.uint8)


def _pad_run_cut(x, f):
    """The extension's padding by hand: edge-pad to multiples of 64, run ``f``, cut."""
    h, w = x.shape[:2]
    padded = np.pad(x, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return f(padded)[:h, :w]


@pytest.mark.parametrize("h,w,lo,hi", [
    (256, 320, 100, 200),  # multiples of 64 at their own resolution: cv2.Canny alone
    (100, 130, 50, 120),   # padded to 128 × 192 and cut back: edges at the cut as OpenCV's
])
def test_canny_is_opencv_on_the_padded_picture(cv2, h, w, lo, hi):
    x = _picture(h, w)
    got = np.asarray(preprocess(Image.fromarray(x), "canny", resolution=min(h, w),
                                threshold_a=lo, threshold_b=hi))
    edges = _pad_run_cut(x, lambda p: cv2.Canny(p, lo, hi))
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    assert (edges > 0).mean() > 0.02, "the test picture has no edges"
    np.testing.assert_array_equal(got, np.repeat(edges[:, :, None], 3, axis=2))


@pytest.mark.parametrize("h,w,res,interpolation", [
    (300, 200, 512, "INTER_CUBIC"),  # up: the short side to 512, the long one 768
    (300, 200, 128, "INTER_AREA"),   # down: 192 × 128
    (90, 150, 100, "INTER_CUBIC"),   # up to 100 × 167: rounded, then padded to 128 × 192
])
def test_resolution_scales_the_short_side(cv2, h, w, res, interpolation):
    x = _picture(h, w, seed=1)
    th, tw = int(np.round(h * res / min(h, w))), int(np.round(w * res / min(h, w)))
    scaled = cv2.resize(x, (tw, th), interpolation=getattr(cv2, interpolation))
    want = _pad_run_cut(scaled, lambda p: np.where(p.min(axis=2, keepdims=True) > 127, 255,
                                                   0).repeat(3, axis=2).astype(np.uint8))
    got = np.asarray(preprocess(Image.fromarray(x), "threshold", resolution=res))
    assert got.shape == (th, tw, 3)
    np.testing.assert_array_equal(got, want)


def test_each_preprocessor_keeps_its_size_rule(cv2):
    x = Image.fromarray(_picture(120, 200, seed=2))
    for name, pre in PREPROCESSORS.items():
        out = preprocess(x, name, resolution=256)
        assert out.mode == "RGB", name
        want = (427, 256) if pre.resolution else (200, 120)
        assert out.size == want, (name, out.size)
        assert np.array_equal(np.asarray(out), np.asarray(preprocess(x, name, resolution=256)))


def test_operations(cv2):
    x = _picture(128, 192, seed=3)
    pic = Image.fromarray(x)
    np.testing.assert_array_equal(np.asarray(preprocess(pic, "invert")), 255 - x)
    # Transparency goes onto white first, as the extension's HWC3 puts it: white inverts to 0.
    rgba = np.dstack([x, np.full(x.shape[:2], 255, np.uint8)])
    rgba[:40, :, 3] = 0
    inverted = np.asarray(preprocess(Image.fromarray(rgba), "invert"))
    assert inverted[:40].max() == 0 and np.array_equal(inverted[40:], 255 - x[40:])
    half = np.asarray(preprocess(pic, "tile_resample", threshold_a=2.0))
    np.testing.assert_array_equal(half, cv2.resize(x, (96, 64), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(np.asarray(preprocess(pic, "tile_resample", threshold_a=1.05)),
                                  x)  # below 1.1: the picture as it is
    grid = np.asarray(preprocess(pic, "color", resolution=128))
    assert grid.shape == (128, 192, 3)
    cells = grid.reshape(2, 64, 3, 64, 3)
    assert (cells == cells[:, :1, :, :1]).all(), "a colour grid cell is not one colour"
    blurred = np.asarray(preprocess(pic, "blur_gaussian", resolution=128, threshold_a=3.0))
    np.testing.assert_array_equal(blurred, cv2.GaussianBlur(x, (0, 0), 3.0))
    gamma = np.asarray(preprocess(pic, "recolor_luminance", threshold_a=0.5))
    lum = cv2.cvtColor(x, cv2.COLOR_BGR2LAB)[:, :, 0].astype(np.float32) / 255
    np.testing.assert_array_equal(gamma[:, :, 0], (lum ** 0.5 * 255).clip(0, 255).astype(
        np.uint8))
    assert (gamma == gamma[:, :, :1]).all()


def test_line_preprocessors_find_dark_lines(cv2):
    # Black strokes on white: lineart_standard and scribble_xdog mark them, and little else.
    x = np.full((128, 128, 3), 255, np.uint8)
    x[30:33, 10:118] = 0
    x[10:118, 80:83] = 0
    pic = Image.fromarray(x)
    lines = (x.min(axis=2) == 0)
    for name in ("lineart_standard", "scribble_xdog"):
        out = np.asarray(preprocess(pic, name, resolution=128))[:, :, 0]
        assert out[lines].mean() > 100, name
        assert out[~lines].mean() < out[lines].mean() / 4, name


def test_tile_resample_of_a_picture_smaller_than_its_rate(cv2):
    # The extension's resize would fail (a 0-pixel side); sdrt keeps a pixel of each side.
    x = _picture(5, 20)
    small = np.asarray(preprocess(Image.fromarray(x), "tile_resample", threshold_a=8.0))
    np.testing.assert_array_equal(small, cv2.resize(x, (2, 1), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("size,resolution", [((3000, 2), 2048), ((2, 9000), 512)])
def test_a_long_thin_picture_is_refused_before_it_is_scaled(cv2, size, resolution):
    # Scaled to its short side it would be gigabytes: refused up front, naming the setting.
    with pytest.raises(SdrtError, match="over the 16777216 pixels a map may have") as e:
        preprocess(Image.new("RGB", size, (9, 90, 200)), "canny", resolution=resolution)
    assert e.value.field == "processor_res" and "resolution" in str(e.value)
    # at 4:1 the map is allowed (2048 × 512 at 512)
    assert preprocess(Image.new("RGB", (400, 100)), "canny", resolution=512).size == (2048, 512)


@pytest.mark.parametrize("h,w", [(60, 90), (200, 300), (90, 60)])
def test_frame_map_of_a_photo_like_map(cv2, h, w):
    # Many colours: OpenCV's cubic up, area down, to cover (crop: the middle kept), to fit
    # (fill: centred on the median colour of the map's border) or stretched (resize).
    x = _picture(h, w, seed=h)
    for width, height in ((64, 64), (96, 48)):
        def resized(size):
            up = size[0] * size[1] >= h * w
            return cv2.resize(x, size, interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)
        np.testing.assert_array_equal(
            np.asarray(frame_map(Image.fromarray(x), width, height, "resize")),
            resized((width, height)))
        k = max(height / h, width / w)
        cover = resized((round(w * k), round(h * k)))
        top, left = (cover.shape[0] - height) // 2, (cover.shape[1] - width) // 2
        np.testing.assert_array_equal(
            np.asarray(frame_map(Image.fromarray(x), width, height, "crop")),
            cover[top:top + height, left:left + width])
        k = min(height / h, width / w)
        inside = resized((round(w * k), round(h * k)))
        fill = np.asarray(frame_map(Image.fromarray(x), width, height, "fill"))
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        top, left = (height - inside.shape[0]) // 2, (width - inside.shape[1]) // 2
        np.testing.assert_array_equal(fill[top:top + inside.shape[0],
                                           left:left + inside.shape[1]], inside)
        outside = np.ones((height, width), bool)
        outside[top:top + inside.shape[0], left:left + inside.shape[1]] = False
        assert outside.any()
        assert (fill[outside] == np.median(border, axis=0).astype(np.uint8)).all()


def test_frame_map_keeps_a_segmentations_colours(cv2):
    # 3 to 199 colours: nearest, so no blended colour appears.
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    x = palette[np.kron(rng.integers(0, 5, (6, 9)), np.ones((8, 8), int))]
    got = np.asarray(frame_map(Image.fromarray(x), 100, 64, "resize"))
    np.testing.assert_array_equal(got, cv2.resize(x, (100, 64),
                                                  interpolation=cv2.INTER_NEAREST))


def test_frame_map_of_black_and_white_maps(cv2):
    # Two colours, black and white: grey, then Otsu's split; thick shapes are not thinned.
    yy, xx = np.mgrid[:48, :64]
    disc = np.where(((yy - 24) ** 2 + (xx - 30) ** 2 < 15 ** 2)[..., None], 255, 0)
    disc = np.repeat(disc, 3, axis=2).astype(np.uint8)
    got = np.asarray(frame_map(Image.fromarray(disc), 160, 120, "resize"))
    grey = cv2.resize(disc, (160, 120), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    grey = grey.mean(axis=2).clip(0, 255).astype(np.uint8)
    want = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    # A canny map enlarged stays one-pixel lines: black and white, hardly a 2 × 2 white
    # square (a Lanczos resize gives grey edges two or three pixels wide: 28 times the
    # pixels here), lines three times as long, not three times as thick too.
    edges = preprocess(Image.fromarray(_picture(96, 128, seed=2)), "canny", 96)
    x = np.asarray(edges)
    big = np.asarray(frame_map(edges, 384, 288, "crop"))
    assert set(np.unique(big)) == {0, 255} and (big == big[..., :1]).all()
    white = big[..., 0] > 0
    squares = white[1:, 1:] & white[:-1, 1:] & white[1:, :-1] & white[:-1, :-1]
    assert squares.sum() < 0.05 * white.sum()
    ratio = white.sum() / (x[..., 0] > 0).sum()
    assert 2.5 < ratio < 4.5, ratio
    # shrunk, the map stays black and white too
    small = np.asarray(frame_map(edges, 64, 48, "resize"))
    assert set(np.unique(small)) <= {0, 255}


def test_thinning_leaves_a_bars_middle_line(cv2):
    # The extension's thinning patterns, each in four rotations, applied until none matches:
    # a bar three pixels thick becomes its middle row (its corners branch off, spurs the
    # pruning pass of an enlarged map removes).
    from sdrt.engine.preprocess import _thinned
    x = np.zeros((9, 16), np.uint8)
    x[3:6, 2:14] = 255
    thin = _thinned(cv2, x.copy(), spurs=False) > 0
    assert thin[4, 3:13].all() and not thin[3, 4:12].any() and not thin[5, 4:12].any()
    assert thin.sum() <= 12 + 4
    pruned = _thinned(cv2, x.copy(), spurs=True) > 0
    assert pruned.sum() < thin.sum() and pruned[4, 4:12].all()


def test_frame_map_of_a_long_thin_map_is_refused(cv2):
    with pytest.raises(SdrtError, match="unit.image: this 16000x2 map would be scaled to "
                                        "2048000x256 to cover 256x256"):
        frame_map(Image.new("RGB", (16000, 2)), 256, 256, "crop", field="unit.image")
    assert frame_map(Image.new("RGB", (16000, 2)), 256, 256, "fill").size == (256, 256)


def test_pixel_perfect_resolution():
    # A 1024 × 768 picture to 512 × 512: covering the frame needs its short side at 512,
    # fitting inside it at 384.
    assert pixel_perfect_resolution((1024, 768), 512, 512, "crop") == 512
    assert pixel_perfect_resolution((1024, 768), 512, 512, "resize") == 512
    assert pixel_perfect_resolution((1024, 768), 512, 512, "fill") == 384
    assert pixel_perfect_resolution((300, 200), 768, 512, "crop") == 512


def test_names_and_settings():
    assert get("Canny").name == "canny" and get(None).name == get("None").name == "none"
    assert get("invert (from white bg & black line)").name == "invert"
    assert get("t2ia_color_grid").name == "color"
    canny = get("canny")
    assert settings(canny) == (512, 100, 200)
    assert settings(canny, -1, -1, 150) == (512, 100, 150)
    assert settings(get("invert"), 64, 3, 4) == (None, None, None)  # no sliders: ignored
    assert settings(get("threshold"), 700.0, 20) == (700, 20, None)
    with pytest.raises(SdrtError, match=r"^threshold_b \(canny's High Threshold\) must be from "
                                        r"1 to 255 \(or -1: 200\), got 300$"):
        settings(canny, b=300)
    with pytest.raises(SdrtError, match="--control-res .* must be from 64 to 2048") as e:
        settings(canny, 32, names=("--control-res", "a", "b"))
    assert e.value.field == "processor_res"
    for bad in (float("nan"), True, "100"):
        with pytest.raises(SdrtError, match="threshold_a"):
            settings(canny, a=bad)


@pytest.mark.parametrize("module,message", [
    ("depth_midas", "does not run preprocessor 'depth_midas' .*send its map with module none"),
    ("openpose_full", "does not run preprocessor"),
    ("reference_only", "hooks into sampling"),
    ("sobel", "must be one of none, canny, invert"),
    (3, "must be one of"),
])
def test_unknown_and_network_preprocessors_are_refused(module, message):
    with pytest.raises(SdrtError, match=message):
        get(module)


def test_without_opencv(monkeypatch):
    import sys

    from sdrt.engine.preprocess import available
    monkeypatch.setitem(sys.modules, "cv2", None)  # as where the control extra is missing
    assert not available()
    pic = Image.fromarray(_picture(64, 64))
    with pytest.raises(SdrtError, match=r"needs OpenCV: pip install 'sdrt\[control\]'"):
        preprocess(pic, "canny")
    np.testing.assert_array_equal(np.asarray(preprocess(pic, "none")), np.asarray(pic))
    np.testing.assert_array_equal(np.asarray(preprocess(pic, "invert")),  # (no OpenCV in it)
                                  255 - np.asarray(pic))
