"""A1111's framing of inpainting (engine/inpaint.py): the overlay that keeps every unmasked
pixel, and "only masked", which inpaints the mask's region at the output size and pastes it
back. A1111's own examples (its docstrings) and hand-worked cases are the reference."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.inpaint import crop_region, expand_region, fill_masked, prepare


def _picture(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_crop_region_is_the_padded_bounding_box():
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[10:20, 30:41] = 1
    assert crop_region(mask, 0) == (30, 10, 41, 20)
    assert crop_region(mask, 5) == (25, 5, 46, 25)
    assert crop_region(mask, 50) == (0, 0, 91, 64)  # clamped to the image
    mask[63, 95] = 1 / 255  # one 8-bit level counts
    assert crop_region(mask, 0) == (30, 10, 96, 64)
    mask[63, 95] = 0.4 / 255  # below one level does not
    assert crop_region(mask, 0) == (30, 10, 41, 20)
    assert crop_region(np.zeros((8, 8), np.float32), 4) is None


@pytest.mark.parametrize("region,size,image,expected", [
    # A1111's docstring: a 128x32 region processed at 512x512 becomes 128x128.
    ((0, 0, 128, 32), (512, 512), (512, 512), (0, 0, 128, 128)),
    ((100, 200, 228, 232), (512, 512), (512, 512), (100, 152, 228, 280)),  # centred
    ((100, 480, 228, 512), (512, 512), (512, 512), (100, 384, 228, 512)),  # at the bottom
    ((10, 10, 20, 50), (64, 32), (200, 100), (0, 10, 80, 50)),  # wider, at the left
    ((0, 0, 100, 100), (64, 64), (100, 100), (0, 0, 100, 100)),  # already square
])
def test_expand_region_to_the_output_ratio(region, size, image, expected):
    assert expand_region(region, *size, *image) == expected


def test_whole_picture_pastes_through_twice_the_mask():
    picture = _picture()
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[:, 48:] = 1
    mask[:, 40:48] = 0.25
    job = prepare(picture, mask, 96, 64)
    assert job.image.size == (96, 64) and job.region is None
    assert np.array_equal(job.mask, mask)
    white = Image.new("RGB", (96, 64), (255, 255, 255))
    out = np.asarray(job.finish(white), dtype=np.float32)
    old = np.asarray(picture, dtype=np.float32)
    assert np.array_equal(out[:, :40], old[:, :40])  # unmasked: the original, exactly
    assert np.array_equal(out[:, 48:], np.full_like(out[:, 48:], 255))
    np.testing.assert_allclose(out[:, 40:48], np.rint(255 * 0.5 + old[:, 40:48] * 0.5))


def test_whole_picture_at_another_size():
    job = prepare(_picture(), np.ones((32, 48), dtype=np.float32), 48, 32)
    assert job.image.size == job.original.size == (48, 32)
    assert job.mask.shape == job.overlay.shape == (32, 48)


@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_whole_picture_by_a_resize_mode(mode):
    """The picture and its mask framed alike by A1111's resize mode: a 96x64 picture in a
    square, the mask's masked column landing where the picture's does."""
    from sdrt.engine.images import fit_image
    picture = _picture(seed=4)
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[:, 60:70] = 1
    job = prepare(picture, mask, 48, 48, resize_mode=mode)
    assert np.array_equal(np.asarray(job.image), np.asarray(fit_image(picture, 48, 48, mode)))
    assert job.original is job.image and job.mask.shape == (48, 48)
    # The masked column's centre, 65/96 across the picture, in the framed square:
    x = 65 * 48 / 64 - 12 if mode == "crop" else 65 * 48 / 96
    assert job.mask[24, int(x)] > 0.9 and job.mask[24, :int(x) - 6].max() < 0.1
    if mode == "fill":  # the picture's 48x32 in the middle; bands above and below
        assert job.mask[:8, int(x)].min() > 0.9  # the edge row stretched: masked there too


def test_whole_picture_refuses_the_latent_resize_mode():
    with pytest.raises(SdrtError, match="resize mode 'latent'.*cannot inpaint the whole"):
        prepare(_picture(), np.ones((64, 96), dtype=np.float32), 48, 48, resize_mode="latent")
    job = prepare(_picture(), np.ones((64, 96), dtype=np.float32), 48, 48, only_masked=True,
                  resize_mode="latent")  # only masked: the resize mode does not apply
    assert job.image.size == (48, 48)


def test_only_masked_cuts_resizes_and_pastes_back():
    picture = _picture(seed=1)
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[20:30, 40:50] = 1
    job = prepare(picture, mask, 32, 32, only_masked=True, padding=3)
    assert job.region == (37, 17, 53, 33)  # 10x10 grown by 3, already square
    assert job.image.size == (32, 32) and job.mask.shape == (32, 32)
    # The cut-out mask at 2x: the masked block spans the middle 20x20 pixels.
    assert job.mask[16, 16] == 1 and job.mask[1, 1] == 0
    black = Image.new("RGB", (32, 32))
    out = np.asarray(job.finish(black))
    old = np.asarray(picture)
    assert out.shape == old.shape  # the original's size
    assert np.array_equal(out[20:30, 40:50], np.zeros((10, 10, 3)))
    outside = np.ones((64, 96), dtype=bool)
    outside[20:30, 40:50] = False
    assert np.array_equal(out[outside], old[outside])


def test_only_masked_refuses_an_empty_mask():
    with pytest.raises(SdrtError, match="empty mask"):
        prepare(_picture(), np.zeros((64, 96), dtype=np.float32), 32, 32, only_masked=True)


def test_a_mask_of_another_size_is_resized_to_the_image():
    mask = np.zeros((32, 48), dtype=np.float32)
    mask[:, 24:] = 1
    job = prepare(_picture(), mask, 96, 64)
    assert job.mask.shape == (64, 96)
    assert job.mask[:, :46].max() == 0 and job.mask[:, 50:].min() == 1


def test_fill_paints_the_surroundings_over_the_mask():
    # A uniform picture with a green block under the mask: filled, it is uniform again (to
    # the 8-bit rounding of the premultiplied blurs), and every kept pixel is untouched.
    a = np.zeros((64, 96, 3), np.uint8)
    a[:] = (200, 40, 90)
    a[20:40, 30:60] = (0, 255, 0)
    mask = np.zeros((64, 96), np.float32)
    mask[18:42, 28:62] = 1
    out = np.asarray(fill_masked(Image.fromarray(a), mask)).astype(int)
    assert np.abs(out - (200, 40, 90)).max() <= 6
    # Two colours meeting under the mask: each side of it takes its own side's colour.
    b = np.zeros((64, 96, 3), np.uint8)
    b[:, :48], b[:, 48:] = (255, 0, 0), (0, 0, 255)
    mask[:] = 0
    mask[20:44, 40:56] = 1
    out = np.asarray(fill_masked(Image.fromarray(b), mask)).astype(int)
    assert np.array_equal(out[mask == 0], b[mask == 0])
    assert out[32, 40, 0] > 200 and out[32, 55, 2] > 200
    assert out[32, 40, 2] < 50 and out[32, 55, 0] < 50


def test_prepare_fills_only_what_the_pipeline_gets():
    picture = _picture(seed=3)
    mask = np.zeros((64, 96), dtype=np.float32)
    mask[10:30, 20:50] = 1
    plain, filled = prepare(picture, mask, 96, 64), prepare(picture, mask, 96, 64, fill=True)
    assert np.array_equal(np.asarray(filled.original), np.asarray(picture))
    assert not np.array_equal(np.asarray(filled.image), np.asarray(plain.image))
    assert np.array_equal(np.asarray(filled.image)[40:], np.asarray(picture)[40:])


def test_the_picture_is_read_as_the_pipeline_reads_it():
    # Transparency on white, as the pipeline composites an init image's alpha.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    job = prepare(Image.fromarray(rgba, "RGBA"), np.zeros((8, 8), np.float32), 8, 8)
    pixels = np.asarray(job.original)
    assert (pixels[:4] == (255, 0, 0)).all() and (pixels[4:] == 255).all()


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_expanded_region_stays_inside_and_keeps_the_mask(image_w, image_h, data):
    # Whatever the mask's box and the output's ratio: the grown region lies in the image,
    # still holds the box, and has the output's ratio wherever the image leaves room for it.
    x1 = data.draw(st.integers(0, image_w - 1))
    x2 = data.draw(st.integers(x1 + 1, image_w))
    y1 = data.draw(st.integers(0, image_h - 1))
    y2 = data.draw(st.integers(y1 + 1, image_h))
    width, height = data.draw(st.sampled_from([(512, 512), (768, 512), (512, 768), (64, 32)]))
    ex1, ey1, ex2, ey2 = expand_region((x1, y1, x2, y2), width, height, image_w, image_h)
    assert 0 <= ex1 <= x1 and x2 <= ex2 <= image_w
    assert 0 <= ey1 <= y1 and y2 <= ey2 <= image_h
    w, h = ex2 - ex1, ey2 - ey1
    if w < image_w and h < image_h:  # not clipped by the image: the ratio is the output's
        assert abs(w / h - width / height) <= max(1 / h, width / height / w) * 1.01
