"""engine/images.py: init images read from real files, every pixel format scaled to [0, 1].

Each case writes its image file in the test (numpy + PIL), reads it back through
``read_image``, and compares ``pil_to_float`` with the values it was written from.
"""
import re

import numpy as np
import pytest
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.images import blur_mask, mask_to_float, pil_to_float, read_image

RNG = np.random.default_rng(0)


def _assert_unit_rgb(a, shape):
    assert a.dtype == np.float32 and a.shape == shape, (a.dtype, a.shape)
    assert 0 <= a.min() and a.max() <= 1, (a.min(), a.max())


def _assert_close(ours, ref, atol, what):
    diff = np.abs(ours.astype(np.float64) - ref)
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= atol, (f"{what}: max abs difference {diff.max():.3e} > {atol:.0e} at "
                                f"{worst}: {ours[worst]:.6g} vs {ref[worst]:.6g}")


def _grey16(h=24, w=40):
    # The whole 16-bit range, dark values included: read as 8-bit (clipped at 255) nearly
    # every pixel would be white.
    a = RNG.integers(0, 65536, size=(h, w), dtype=np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    return a


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    a = _grey16()
    Image.fromarray(a).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.mode in ("I;16", "I"), image.mode  # Pillow's name for a 16-bit grey PNG
    out = pil_to_float(image)
    _assert_unit_rgb(out, (24, 40, 3))
    ref = a.astype(np.float64) / 65535
    for c in range(3):
        _assert_close(out[..., c], ref, 1e-7, f"channel {c}")
    assert np.median(out) < 0.9, "the 16-bit image came out almost white"


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_byte_orders(mode):
    a = _grey16(8, 12)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (12, 8), a.astype(dtype).tobytes())
    _assert_close(pil_to_float(image)[..., 1], a / 65535, 1e-7, mode)


def test_mode_I_holding_16_bit_data():
    a = _grey16(8, 12)
    image = Image.frombytes("I;16", (12, 8), a.astype("<u2").tobytes()).convert("I")
    assert image.mode == "I"
    _assert_close(pil_to_float(image)[..., 0], a / 65535, 1e-7, "I with 16-bit values")


def test_mode_I_past_16_bits_and_negative():
    big = np.array([[0, 2 ** 20], [2 ** 31 - 1, 7]], dtype=np.int32)
    out = pil_to_float(Image.frombytes("I", (2, 2), big.tobytes()))[..., 0]
    _assert_close(out, big / (2 ** 31 - 1), 1e-7, "non-negative 32-bit")
    signed = np.array([[-(2 ** 31), -1], [0, 2 ** 31 - 1]], dtype=np.int32)
    out = pil_to_float(Image.frombytes("I", (2, 2), signed.tobytes()))[..., 0]
    _assert_close(out, (signed + 2.0 ** 31) / (2.0 ** 32 - 1), 1e-7, "signed 32-bit")


@pytest.mark.parametrize("lo,hi,scale", [
    (0.0, 1.0, lambda a: a),                                    # the usual float image
    (0.0, 255.0, lambda a: a / 255),                            # PIL's own scale for "F"
    (-1.5, 3.0, lambda a: (a + 1.5) / 4.5),                     # HDR: mapped, not clipped
    (2.0, 400.0, lambda a: a / 400),                            # past 255: from 0 to the max
])
def test_float_image(lo, hi, scale):
    a = RNG.uniform(lo, hi, size=(6, 10)).astype(np.float32)
    a[0, 0], a[0, 1] = lo, hi
    image = Image.frombytes("F", (10, 6), a.tobytes())
    out = pil_to_float(image)
    _assert_unit_rgb(out, (6, 10, 3))
    _assert_close(out[..., 2], scale(a.astype(np.float64)), 1e-6, f"F in [{lo}, {hi}]")


def test_float_image_with_nan_is_refused():
    a = np.zeros((2, 2), np.float32)
    a[1, 1] = np.nan
    with pytest.raises(SdrtError, match="inf or NaN"):
        pil_to_float(Image.frombytes("F", (2, 2), a.tobytes()))


def test_8_bit_rgb_and_grey(tmp_path):
    rgb = RNG.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    _assert_close(pil_to_float(read_image(tmp_path / "rgb.png")), rgb / 255, 1e-7, "RGB")
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    out = pil_to_float(read_image(tmp_path / "l.png"))
    _assert_close(out, np.repeat(grey[..., None], 3, 2) / 255, 1e-7, "L")


def test_palette_png(tmp_path):
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30]], np.uint8)
    index = RNG.integers(0, 3, size=(9, 11), dtype=np.uint8)
    image = Image.fromarray(index)
    image = image.convert("P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "p.png")
    read = read_image(tmp_path / "p.png")
    assert read.mode == "P"
    _assert_close(pil_to_float(read), palette[index] / 255, 1e-7, "palette")


def test_palette_with_a_transparent_index_is_composited_on_white(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).convert("P")
    image.putpalette([0, 0, 0, 40, 80, 120])
    image.save(tmp_path / "pt.png", transparency=0)  # index 0 (black) is transparent
    out = pil_to_float(read_image(tmp_path / "pt.png"))
    ref = np.array([[[1, 1, 1], [40, 80, 120]], [[40, 80, 120], [1, 1, 1]]], np.float64)
    ref[ref > 1] /= 255
    _assert_close(out, ref, 1e-7, "palette with transparency")


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(mode, tmp_path):
    colour = RNG.integers(0, 256, size=(5, 7, 3 if mode == "RGBA" else 1), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255  # fully transparent (→ white), fully opaque (→ colour)
    Image.fromarray(np.concatenate([colour, alpha], 2), mode).save(tmp_path / "a.png")
    read = read_image(tmp_path / "a.png")
    assert read.mode == mode
    c, w = colour / 255, alpha / 255
    ref = np.broadcast_to(c * w + (1 - w), (5, 7, 3))
    _assert_close(pil_to_float(read), ref, 1e-6, mode)
    assert (pil_to_float(read)[0, 0] == 1).all()


def test_cmyk_jpeg(tmp_path):
    cmyk = RNG.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    read = read_image(tmp_path / "c.jpg")
    assert read.mode == "CMYK"
    out = pil_to_float(read)
    _assert_unit_rgb(out, (16, 16, 3))
    _assert_close(out, np.asarray(read.convert("RGB")) / 255, 1e-7, "CMYK → RGB")


# EXIF orientation → the rotation that displays the stored pixels upright.
ORIENTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
                8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_jpeg_exif_orientation_is_applied(orientation, tmp_path):
    # Stored 64 wide × 32 high: left half red, right half blue.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    image = read_image(path)
    with Image.open(path) as raw:
        expected = raw.convert("RGB").transpose(ORIENTATIONS[orientation])
    assert image.size == expected.size == ((64, 32) if orientation == 3 else (32, 64))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert image.getexif().get(0x0112, 1) == 1, "the orientation tag was left in place"
    # Where the red half ends up, checked on its own (not through PIL's table).
    out = pil_to_float(image)
    red_at = {3: (8, 48), 6: (8, 16), 8: (56, 16)}[orientation]  # (row, column)
    assert out[red_at][0] > 0.9 and out[red_at][2] < 0.1, out[red_at]


def _write_truncated_png(path):
    noise = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "folder": (lambda p: p.mkdir(), "is a folder"),
    "text file": (lambda p: p.write_text("not an image"), "not an image file"),
    "missing file": (lambda p: None, "no such file"),
    "empty file": (lambda p: p.write_bytes(b""), "not an image file"),
    "truncated png": (_write_truncated_png, "the file is damaged or truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_errors_in_plain_words(case, tmp_path):
    make, reason = BAD_FILES[case]
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(SdrtError) as e:
        read_image(path, "init image")
    message = str(e.value)
    assert message.startswith(f"cannot read init image {path}: {reason}"), message
    assert "\n" not in message
    assert not re.search(r"\b\w+(Error|Exception)\b", message), f"class name in {message!r}"


def _mask_values():
    rng = np.random.default_rng(9)
    return rng.integers(0, 256, (6, 7), dtype=np.uint8)


def test_mask_by_brightness():
    v = _mask_values()
    np.testing.assert_allclose(mask_to_float(Image.fromarray(v)), v / 255, atol=1e-6)
    rgb = np.stack([v, np.zeros_like(v), 255 - v], axis=-1)
    expected = (0.299 * v + 0.114 * (255 - v.astype(np.float32))) / 255
    np.testing.assert_allclose(mask_to_float(Image.fromarray(rgb)), expected, atol=1e-6)
    sixteen = Image.fromarray(v.astype(np.uint16) * 257).convert("I;16")
    np.testing.assert_allclose(mask_to_float(sixteen), v / 255, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_mask_by_alpha_where_transparent(mode):
    # A1111's rule: a mask with transparency is its alpha (opaque = repaint), whatever the
    # colour; a fully opaque one is read by brightness.
    v = _mask_values()
    colour = np.full((6, 7, 3 if mode == "RGBA" else 1), 255, dtype=np.uint8)
    image = Image.fromarray(np.concatenate([colour, v[..., None]], axis=-1).squeeze(), mode)
    assert np.array_equal(mask_to_float(image), v.astype(np.float32) / 255)
    opaque = np.concatenate([np.zeros_like(colour), np.full_like(v, 255)[..., None]], axis=-1)
    assert np.array_equal(mask_to_float(Image.fromarray(opaque.squeeze(), mode)),
                          np.zeros((6, 7), dtype=np.float32))


def test_palette_mask_with_a_transparent_index():
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # index 0 transparent, index 1 (white) opaque
    expected = np.zeros((2, 4), dtype=np.float32)
    expected[0, 1] = 1
    assert np.array_equal(mask_to_float(image), expected)


def _reference_blur(mask, sigma):
    """A1111's blur (OpenCV's GaussianBlur, kernel cut at 2.5 sigma, border reflected
    without repeating the edge) written out pixel by pixel in float64."""
    r = int(2.5 * sigma + 0.5)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()

    def reflect(i, n):
        while not 0 <= i < n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i

    def along_x(m):
        h, w = m.shape
        return np.array([[sum(k[j + r] * m[y, reflect(x + j, w)] for j in range(-r, r + 1))
                          for x in range(w)] for y in range(h)])
    return along_x(along_x(mask.astype(np.float64)).T).T


@pytest.mark.parametrize("sigma", [1, 3])
def test_blur_mask_is_a1111s_gaussian(sigma):
    rng = np.random.default_rng(sigma)
    mask = (rng.random((13, 17)) > 0.5).astype(np.float32)
    got = blur_mask(mask, sigma)
    np.testing.assert_allclose(got, _reference_blur(mask, sigma), atol=1e-6)
    assert np.array_equal(blur_mask(mask, 0), mask)
