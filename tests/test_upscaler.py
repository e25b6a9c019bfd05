"""Model upscalers (engine/upscaler.py): each architecture and layout against the published
network written out over the file's own tensors (tests/upscaler_files.py), tiling against the
whole image, A1111's pass-and-resize rules, file recognition and refusals, and the hires
fix with an upscale model."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdrt.engine.errors import SdrtError
from sdrt.engine.upscaler import load_upscaler
from sdrt.engine.upscaler_config import A1111_NAMES, file_config, upscaler_files
from test_cli import tiny_dir  # noqa: F401  (the fixture)
from upscaler_files import compact_tensors, esrgan_tensors, reference, span_tensors, write

# (layout, tensors, scale): every shape of network a file may hold.
NETWORKS = {
    # ESRGAN's original layout at each number of upsamples (4x-UltraSharp is ×4, 1x_ filters ×1)
    "esrgan-x4": ("esrgan", lambda: esrgan_tensors(), 4),
    "esrgan-x2": ("esrgan", lambda: esrgan_tensors(upsamples=1, blocks=1), 2),
    "esrgan-x1": ("esrgan", lambda: esrgan_tensors(upsamples=0, blocks=1), 1),
    "esrgan-x8": ("esrgan", lambda: esrgan_tensors(upsamples=3, blocks=1), 8),
    # BasicSR's: RealESRGAN_x4plus, and x2plus, which pixel-unshuffles its input by 2
    "real-esrgan-x4": ("real-esrgan", lambda: esrgan_tensors("real-esrgan", gc=6), 4),
    "real-esrgan-x2": ("real-esrgan", lambda: esrgan_tensors("real-esrgan", unshuffle=2), 2),
    "real-esrgan-x1": ("real-esrgan", lambda: esrgan_tensors("real-esrgan", unshuffle=4,
                                                             blocks=1), 1),
    # realesr-general-x4v3 / animevideov3 (×4), and a ×2 compact model
    "compact-x4": ("compact", lambda: compact_tensors(), 4),
    "compact-x2": ("compact", lambda: compact_tensors(nf=12, convs=1, scale=2), 2),
    # SPAN (4x-ClearRealityV1 and most SPAN models: ×4, input normalised), a ×2 without
    "span-x4": ("span", lambda: span_tensors(), 4),
    "span-x2": ("span", lambda: span_tensors(nf=6, scale=2, norm=False, seed=1), 2),
}


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_matches_the_published_forward(tmp_path, name):
    layout, tensors, scale = NETWORKS[name]
    sd = tensors()
    up = load_upscaler(write(tmp_path / f"{name}.safetensors", sd))
    assert up.scale == scale and up.config.arch == layout and up.name == name
    assert file_config(tmp_path / f"{name}.safetensors") == up.config
    x = 0.1 + 0.8 * torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    ref = reference(sd, x, layout).clamp(0, 1)
    assert 0.05 < ref.mean() < 0.95, "a reference clamped flat would not test anything"
    out = torch.full_like(ref, float("nan"))
    out.copy_(up.run(x))
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"{name}: max abs error {err:.2e} against the published forward"


def test_training_prefixes_are_read(tmp_path):
    """Real-ESRGAN's release keeps its weights under params_ema; conversions keep the key."""
    sd = esrgan_tensors("real-esrgan")
    plain = load_upscaler(write(tmp_path / "a.safetensors", sd))
    prefixed = load_upscaler(write(tmp_path / "b.safetensors", sd, prefix="params_ema."))
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(plain.run(x), prefixed.run(x))


def test_odd_sizes_pad_to_the_unshuffle_factor(tmp_path):
    """A ×2 Real-ESRGAN unshuffles by 2: an odd side is padded (replicated) and the output cut
    back to exactly twice the input."""
    sd = esrgan_tensors("real-esrgan", unshuffle=2)
    up = load_upscaler(write(tmp_path / "x2.safetensors", sd))
    x = torch.rand(1, 3, 11, 13)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="replicate")
    ref = reference(sd, padded, "real-esrgan")[..., :22, :26].clamp(0, 1)
    out = up.run(x)
    assert out.shape == (1, 3, 22, 26)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name, tile", [
    ("esrgan-x2", 8),        # tiles of 8 over 20 x 27: ragged last tiles on both axes
    ("real-esrgan-x2", 10),  # tile edges at even offsets for the unshuffle
    ("compact-x4", 7),       # an odd tile side
    ("span-x4", 9),          # 21 convs deep: a reach within the pad
])
def test_tiles_give_the_whole_image(tmp_path, name, tile):
    """With a pad wider than the network's reach, tiled equals whole."""
    layout, tensors, _ = NETWORKS[name]
    path = write(tmp_path / f"{name}.safetensors", tensors())
    whole = load_upscaler(path, tile=64)
    tiled = load_upscaler(path, tile=tile, tile_pad=48)
    x = torch.rand(1, 3, 20, 27, generator=torch.Generator().manual_seed(3))
    a, b = whole.run(x), tiled.run(x)
    err = (a - b).abs().max().item()
    assert err < 1e-5, f"{name}: tiled differs from whole by {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["esrgan-x4", "real-esrgan-x2", "compact-x4", "span-x4"])
def test_cuda_half_precision_matches_float32(tmp_path, name):
    """On a GPU: fp16, channels-last, tiled over 40 x 56, against float32 on the CPU."""
    layout, tensors, _ = NETWORKS[name]
    path = write(tmp_path / f"{name}.safetensors", tensors())
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(6))
    ref = load_upscaler(path, tile=64).run(x)
    out = load_upscaler(path, "cuda", torch.float16, tile=16, tile_pad=48).run(x).cpu()
    err = (out - ref).abs().max().item()
    assert err < 4e-3, f"{name}: fp16 on CUDA differs from float32 by {err:.2e}"


def test_small_tile_pad_stays_close(tmp_path):
    """The default pad with a deep network: not exact, but no visible seam."""
    path = write(tmp_path / "x4.safetensors", esrgan_tensors(blocks=2))
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    err = (load_upscaler(path, tile=64).run(x) - load_upscaler(path, tile=12, tile_pad=8).run(x))
    assert 0 < err.abs().max() < 2 / 255


def test_a1111_upscale_passes_and_sizes(tmp_path):
    x4 = load_upscaler(write(tmp_path / "x4.safetensors", esrgan_tensors(blocks=1)))
    x2 = load_upscaler(write(tmp_path / "x2.safetensors", compact_tensors(scale=2)))
    x1 = load_upscaler(write(tmp_path / "x1.safetensors", compact_tensors(scale=1, nf=6)))
    im = _image(20, 28)
    # ×2 with a ×4 model: one pass to 112 x 80, then Lanczos to 56 x 40
    out = x4.upscale([im], 2)[0]
    one = x4.one_pass([im])[0]
    assert one.size == (112, 80)
    assert out.size == (56, 40)
    assert np.array_equal(np.asarray(out), np.asarray(one.resize((56, 40), Image.LANCZOS)))
    # ×5 with a ×2 model: three passes (×8), then down to the size rounded to a multiple of 8
    passes = x2.one_pass(x2.one_pass(x2.one_pass([im])))[0]
    out = x2.upscale([im], 5)[0]
    assert out.size == (140 // 8 * 8, 100 // 8 * 8)
    assert np.array_equal(np.asarray(out), np.asarray(passes.resize(out.size, Image.LANCZOS)))
    # ×20 with a ×2 model: A1111 stops at three passes and resizes the rest
    assert x2.upscale([im], 20)[0].size == (560, 400)
    # ×1 with a ×1 model: one pass (a filter), the size kept
    out = x1.upscale([_image(16, 24)], 1)[0]
    assert out.size == (24, 16)
    assert np.array_equal(np.asarray(out), np.asarray(x1.one_pass([_image(16, 24)])[0]))
    # the hires fix's resize: the exact size, not rounded to 8
    assert x4.resize([im], 45, 33)[0].size == (45, 33)
    assert x4.resize([im], 28, 20)[0].size == (28, 20)  # no upscale needed: Lanczos only


def test_images_round_to_8_bit(tmp_path):
    """An image pass is the network's output in [0, 1] rounded to 8 bits."""
    up = load_upscaler(write(tmp_path / "x2.safetensors", compact_tensors(scale=2)))
    im = _image(10, 12, seed=5)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    expect = np.rint(up.run(x)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(up.one_pass([im])[0]), expect)


def test_folder_names_and_a1111_aliases(tmp_path):
    write(tmp_path / "4x-UltraSharp.safetensors", esrgan_tensors(blocks=1))
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "RealESRGAN_x4plus.safetensors", esrgan_tensors("real-esrgan"))
    (tmp_path / "old.pth").write_bytes(b"not listed")
    names = upscaler_files(tmp_path)
    assert set(names) == {"4x-UltraSharp", "RealESRGAN_x4plus",
                          A1111_NAMES["RealESRGAN_x4plus"]}
    assert names["R-ESRGAN 4x+"] == names["RealESRGAN_x4plus"]
    assert upscaler_files(None) == {}


# A header: any JSON value, tensors with any shapes, or bytes that are not JSON at all.
_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
_shape = st.sampled_from([[8, 3, 3, 3], [4, 8, 3, 3], [8, 8, 3, 3], [3, 8, 3, 3], [48, 8, 3, 3],
                          [8, 12, 3, 3], [8], [], [0, 8, 3, 3], [8, 0, 3, 3], [1, 8, 3, 3]]) \
    | st.lists(st.integers(-1, 70), max_size=4)
_tensor = st.fixed_dictionaries({"dtype": st.just("F32"), "shape": _shape,
                                 "data_offsets": st.just([0, 0])})
_names = st.sampled_from(["model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight", "model.3.weight",
                          "model.x.weight", "conv_first.weight", "body.0.rdb1.conv1.weight",
                          "conv_last.weight", "conv_up1.weight", "body.0.weight", "body.1.weight",
                          "body.2.weight", "body.a.weight", "params_ema.body.0.weight"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40).map(lambda b: ("raw", b)),
                 _json.map(lambda j: ("json", j)),
                 st.dictionaries(_names, _tensor, min_size=2, max_size=8).map(
                     lambda j: ("json", j))))
def test_any_header_is_read_or_refused(content):
    """Whatever a file's header holds, reading its config answers or refuses it in one
    SdrtError: never another exception."""
    import json
    import os
    import struct
    import tempfile
    kind, value = content
    data = value if kind == "raw" else json.dumps(value).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        with open(path, "wb") as f:
            f.write((struct.pack("<Q", len(data)) if kind == "json" else b"") + data)
        try:
            cfg = file_config(path)
        except SdrtError:
            return
        assert cfg.channels == 3 and cfg.scale >= 1


def _refused(path, *words):
    with pytest.raises(SdrtError) as e:
        load_upscaler(path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_refusals(tmp_path):
    pth = tmp_path / "4x.pth"
    pth.write_bytes(b"\x80\x02")
    _refused(str(pth), "pickle")
    _refused(str(tmp_path / "missing.safetensors"), "no such file")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    _refused(str(tmp_path / "junk.safetensors"), "not a readable safetensors")
    # a file of another kind (a LoRA's keys)
    _refused(write(tmp_path / "lora.safetensors",
                   {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}),
             "not an upscaler sdrt knows", "lora_unet_x")
    # ESRGAN+ (a 1x1 conv in each dense block) or any tensor the network does not have
    sd = esrgan_tensors(blocks=1)
    sd["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(4, 8, 1, 1)
    _refused(write(tmp_path / "plus.safetensors", sd), "conv1x1")
    # a missing tensor, a wrong shape
    sd = esrgan_tensors(blocks=1)
    del sd["model.1.sub.0.RDB2.conv3.0.bias"]
    _refused(write(tmp_path / "missing.safetensors", sd), "missing weight",
             "model.1.sub.0.RDB2.conv3.0.bias")
    sd = esrgan_tensors(blocks=1)
    sd["model.1.sub.0.RDB1.conv2.0.weight"] = torch.zeros(4, 9, 3, 3)
    _refused(write(tmp_path / "shape.safetensors", sd), "model.1.sub.0.RDB1.conv2.0.weight")
    # layers out of ESRGAN's order
    sd = esrgan_tensors(blocks=1)
    sd["model.5.weight"], sd["model.5.bias"] = sd.pop("model.6.weight"), sd.pop("model.6.bias")
    _refused(write(tmp_path / "order.safetensors", sd), "layers sdrt does not know")
    # a compact model without its PReLU weights: relu or leaky relu, the file cannot say
    sd = {k: v for k, v in compact_tensors().items() if int(k.split(".")[1]) % 2 == 0}
    _refused(write(tmp_path / "relu.safetensors", sd), "PReLU")
    # a grayscale (1-channel) ESRGAN
    sd = esrgan_tensors(blocks=1)
    sd["model.0.weight"] = sd["model.0.weight"][:, :1].contiguous()
    sd["model.10.weight"], sd["model.10.bias"] = sd["model.10.weight"][:1], sd["model.10.bias"][:1]
    _refused(write(tmp_path / "gray.safetensors", sd), "1 image channels", "RGB")
    # a SPAN of another depth, or with a tensor SPAN does not have
    sd = {k: v for k, v in span_tensors().items() if not k.startswith("block_6.")}
    _refused(write(tmp_path / "span5.safetensors", sd), "a SPAN of 5 blocks")
    sd = {**span_tensors(), "block_1.attn.weight": torch.zeros(8, 8, 1, 1)}
    _refused(write(tmp_path / "span-extra.safetensors", sd), "block_1.attn.weight")
    for field, value in (("tile", 0), ("tile", 2.5), ("tile_pad", -1), ("tile", True)):
        with pytest.raises(SdrtError, match=field):
            load_upscaler(write(tmp_path / "ok.safetensors", compact_tensors()),
                          **{field: value})


# -- the hires fix with an upscale model -------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    from sdrt.engine import Pipeline
    return Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")


def test_hires_fix_with_an_upscale_model(pipe, tmp_path):
    """The second pass redraws the model's upscale of the first pass's picture, resized with
    Lanczos to the target: the library's two calls composed by hand, image for image."""
    from sdrt.engine.hires import Hires, generate
    up = load_upscaler(write(tmp_path / "x4.safetensors", esrgan_tensors(blocks=1)))
    hires = Hires(scale=1.5, upscaler="x4", steps=2, strength=0.5).check(
        {}, 1024, 50, model_upscalers=("x4",))
    prompts = ["a red cube", "a blue sphere"]
    got = generate(pipe, hires, prompts, "blurry", 32, 48, 3, "euler",
                   [torch.Generator().manual_seed(s) for s in (7, 8)], upscaler=up,
                   guidance_scale=5.0)
    g = [torch.Generator().manual_seed(s) for s in (7, 8)]
    common = dict(negative_prompt="blurry", sampler="euler", guidance_scale=5.0)
    first = pipe(prompts, height=32, width=48, num_inference_steps=3, generator=g,
                 output_type="pil", **common)
    image = up.resize(first, 72, 48)  # ×4 once (192 x 128), then Lanczos down
    want = pipe(prompts, image=image, strength=0.5, num_inference_steps=4, generator=g,
                output_type="pil", **common)
    assert [im.size for im in got] == [(72, 48)] * 2
    for a, b in zip(got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hires_refuses_a_model_it_was_not_given(pipe, tmp_path):
    from sdrt.engine.hires import Hires, generate
    with pytest.raises(SdrtError, match="upscale model"):
        Hires(upscaler="4x-UltraSharp").check({"upscaler": "--hr-upscaler"}, 1024, 50)
    with pytest.raises(SdrtError, match="4x-UltraSharp"):
        Hires(upscaler="nope").check({"upscaler": "--hr-upscaler"}, 1024, 50,
                                     model_upscalers=("4x-UltraSharp",))
    hires = Hires(upscaler="x4", steps=1).check({}, 1024, 50, model_upscalers=("x4",))
    with pytest.raises(SdrtError, match="is a model"):
        generate(pipe, hires, "a", "", 32, 32, 1, "euler", [torch.Generator()])


# -- sdrt generate --hr-upscaler ---------------------------------------------------------------

def _cli(argv, capsys):
    from sdrt.engine.cli import main
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.text.get("parameters", "")


def test_cli_hires_fix_with_an_upscale_model(tiny_dir, tmp_path, capsys):
    """A file path and a name in --upscaler-dir draw the same picture; the PNG names the
    model as A1111's does, and --from-png draws it again from the folder."""
    models = tmp_path / "ESRGAN"
    models.mkdir()
    path = write(models / "4x-Tiny.safetensors", esrgan_tensors(blocks=1))
    base = ["generate", "a fox in the snow", "--model", tiny_dir, "--steps", "2", "--height",
            "32", "--width", "32", "--seed", "3", "--hr-scale", "1.5", "--hr-steps", "1"]
    runs = {"path": ["--hr-upscaler", path],
            "name": ["--hr-upscaler", "4x-Tiny", "--upscaler-dir", models],
            "lanczos": ["--hr-upscaler", "Lanczos"]}
    pixels = {}
    for key, extra in runs.items():
        code, err = _cli(base + extra + ["-o", tmp_path / f"{key}.png"], capsys)
        assert code == 0, err
        pixels[key], text = _png(tmp_path / f"{key}.png")
        assert pixels[key].shape == (48, 48, 3)
    assert "Hires upscaler: 4x-Tiny" in _png(tmp_path / "path.png")[1]
    assert np.array_equal(pixels["path"], pixels["name"])
    assert not np.array_equal(pixels["path"], pixels["lanczos"])
    code, err = _cli(["generate", "--from-png", tmp_path / "path.png", "--model", tiny_dir,
                      "--upscaler-dir", models, "-o", tmp_path / "again.png"], capsys)
    assert code == 0, err
    assert np.array_equal(_png(tmp_path / "again.png")[0], pixels["path"])


@pytest.mark.parametrize("case", ["missing", "pickle", "no folder", "not a folder", "a lora"])
def test_cli_bad_upscale_models(tiny_dir, tmp_path, capsys, case):
    """Each refused in one line, before the model loads."""
    write(tmp_path / "4x-Tiny.safetensors", esrgan_tensors(blocks=1))
    write(tmp_path / "lora.safetensors", {"lora_unet_a.lora_up.weight": torch.ones(2, 2)})
    (tmp_path / "4x.pth").write_bytes(b"\x80\x02")
    given, message = {
        "missing": (["--hr-upscaler", tmp_path / "nope.safetensors"], "no such file"),
        "pickle": (["--hr-upscaler", tmp_path / "4x.pth"], "pickle checkpoints are not loaded"),
        "no folder": (["--hr-upscaler", "4x-Tiny"], "--hr-upscaler must be one of Latent"),
        "not a folder": (["--hr-upscaler", "4x-Tiny", "--upscaler-dir", tmp_path / "4x.pth"],
                         "--upscaler-dir"),
        "a lora": (["--hr-upscaler", tmp_path / "lora.safetensors"],
                   "not an upscaler sdrt knows"),
    }[case]
    code, err = _cli(["generate", "x", "--model", tmp_path / "no-model-here", "--hr-scale", "2",
                      *given, "-o", tmp_path / "o.png"], capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o.png").exists()


# -- sdrt upscale (A1111's Extras on files) ----------------------------------------------------

def _picture_with_parameters(path, w, h, seed):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a fox\nSteps: 20, Seed: {seed}, Size: {w}x{h}")
    _image(h, w, seed).save(path, pnginfo=info)
    return Image.open(path)


def test_cli_upscale_is_a1111s_extras(tmp_path, capsys):
    """By a model file and by name in --upscaler-dir, to a scale and to a size (cut), blended
    with a second upscaler: the library's Extras, image for image; each PNG keeps its
    source's parameters and gains A1111's extras text."""
    from sdrt.engine.extras import Extras
    models = tmp_path / "ESRGAN"
    models.mkdir()
    path = write(models / "4x-Tiny.safetensors", esrgan_tensors(blocks=1))
    up = load_upscaler(path, name="4x-Tiny")
    a = _picture_with_parameters(tmp_path / "a.png", 20, 12, 1)
    b = _picture_with_parameters(tmp_path / "b.png", 16, 16, 2)
    runs = {
        "by": (["--upscaler", path, "--scale", "2"], Extras("4x-Tiny", scale=2.0)),
        "to": (["--upscaler", "4x-Tiny", "--upscaler-dir", models, "--resize", "40x30"],
               Extras("4x-Tiny", scale=None, width=40, height=30, crop=True)),
        "blend": (["--upscaler", "Lanczos", "--upscaler-2", path, "--upscaler-2-visibility",
                   "0.3", "--scale", "1.5"], Extras("Lanczos", "4x-Tiny", 0.3, 1.5)),
    }
    for key, (options, extras) in runs.items():
        code, err = _cli(["upscale", tmp_path / "a.png", tmp_path / "b.png", *options, "-o",
                          tmp_path / f"{key}.png"], capsys)
        assert code == 0, err
        want = extras.apply(lambda name, field: up, [a, b])
        for i, (source, (image, text)) in enumerate(zip((a, b), want)):
            with Image.open(tmp_path / f"{key}-{i}.png") as got:
                assert got.size == image.size
                assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image)), key
                assert got.text["parameters"] == source.text["parameters"]
                assert got.text["extras"] == text
    with Image.open(tmp_path / "to-0.png") as got:
        assert got.size == (40, 30)
        assert got.text["extras"] == ("Postprocess upscale to: 40x30, Postprocess crop to: "
                                      "40x30, Postprocess upscaler: 4x-Tiny")
    with Image.open(tmp_path / "by-1.png") as got:
        assert got.size == (32, 32)
        assert got.text["extras"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"


def test_cli_upscale_refuses_an_output_past_the_side_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDRT_MAX_SIDE", "64")
    _image(20, 40).save(tmp_path / "a.png")
    code, err = _cli(["upscale", tmp_path / "a.png", "--scale", "2", "-o",
                      tmp_path / "o.png"], capsys)
    assert code == 2 and "would be upscaled to 80x40; each side must be from 8 to 64" in err
    assert not (tmp_path / "o.png").exists()


def test_cli_upscale_scales_float_and_16_bit_pictures_to_their_range(tmp_path, capsys):
    # PIL's convert("RGB") clips them to 0..255: a float picture in [0, 1] would be black.
    from sdrt.engine.images import to_rgb8
    values = np.random.default_rng(0).random((24, 16), dtype=np.float32)
    pictures = {"f.tiff": Image.fromarray(values, mode="F"),
                "i16.png": Image.fromarray((values * 65535).astype(np.uint16))}
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
        to_rgb8(picture).save(tmp_path / f"{name}.rgb8.png")
        outs = []
        for source in (name, f"{name}.rgb8.png"):
            code, err = _cli(["upscale", tmp_path / source, "--scale", "2", "-o",
                              tmp_path / f"{source}.out.png"], capsys)
            assert code == 0, err
            outs.append(np.asarray(Image.open(tmp_path / f"{source}.out.png")))
        assert outs[0].std() > 20 and np.array_equal(outs[0], outs[1]), name
