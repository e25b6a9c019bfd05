"""IP-Adapters against diffusers: the CLIP image encoder and its pixels against transformers',
whole pipelines with plain, plus and full-face adapters in h94/IP-Adapter's file layout
(one adapter, two at once, several images for one, under a static plan) on the same latents,
and the refusals."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_close_abs
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.clip_vision import clip_pixels, load_image_encoder
from test_controlnet import IMAGE_ATOL, _latents
from test_pipeline import _assert_lively, _diffusers_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red fox in the snow, 35mm photo"
# The tiny image encoder: 30-pixel images in 6-pixel patches (26 tokens with the class token);
# 64 channels a head, as a single file's weights are read (they do not give the head count).
ENCODER = dict(hidden_size=128, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
               image_size=30, patch_size=6, projection_dim=24, hidden_act="gelu")


def _picture(seed, w, h):
    """A reference image: colour blocks on noise, of any size (the encoder crops it)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 3] = (250, 40, 10)
    return Image.fromarray(a)


def _encoder(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(11)
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    ref.save_pretrained(folder)
    return ref


def _weights(kind, seed, widths, cross=32, embed=24, hidden=128):
    """An IP-Adapter's state dict in the original layout, every tensor drawn."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    one = lambda n: 1 + r(n, s=0.1)
    if kind == "plain":
        proj = {"proj.weight": r(4 * cross, embed), "proj.bias": r(4 * cross),
                "norm.weight": one(cross), "norm.bias": r(cross)}
    elif kind == "full":
        proj = {"proj.0.weight": r(hidden, hidden), "proj.0.bias": r(hidden),
                "proj.2.weight": r(cross, hidden), "proj.2.bias": r(cross),
                "proj.3.weight": one(cross), "proj.3.bias": r(cross)}
    else:  # plus: width 16, one 64-channel head, depth 4 (diffusers assumes it), 5 queries
        w = 16
        proj = {"latents": r(1, 5, w, s=1.0), "proj_in.weight": r(w, hidden),
                "proj_in.bias": r(w), "proj_out.weight": r(cross, w), "proj_out.bias": r(cross),
                "norm_out.weight": one(cross), "norm_out.bias": r(cross)}
        for i in range(4):
            p = f"layers.{i}."
            proj.update({p + "0.norm1.weight": one(w), p + "0.norm1.bias": r(w),
                         p + "0.norm2.weight": one(w), p + "0.norm2.bias": r(w),
                         p + "0.to_q.weight": r(64, w), p + "0.to_kv.weight": r(128, w),
                         p + "0.to_out.weight": r(w, 64), p + "1.0.weight": one(w),
                         p + "1.0.bias": r(w), p + "1.1.weight": r(4 * w, w),
                         p + "1.3.weight": r(w, 4 * w)})
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, width in enumerate(widths):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = r(width, cross, s=0.5)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = r(width, cross, s=0.5)
    return state


# The tiny SD 1 UNet's cross-attention layers in diffusers' order: down level 0 (2 layers of
# 32 channels), up level 1 (3 of 32), the mid block (1 of 64).
WIDTHS = (32,) * 5 + (64,)


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tmp_path_factory):
    """(our pipeline with "plain", "plus" and "full" loaded, diffusers pipeline, folder)."""
    folder, ref = tiny_sd1
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    root = tmp_path_factory.mktemp("ip-adapters")
    _encoder(root / "image_encoder")
    ours = Pipeline.from_pretrained(folder, device="cpu")
    for seed, kind in enumerate(("plain", "plus", "full")):
        save_file(_weights(kind, seed, WIDTHS), str(root / f"{kind}.safetensors"))
        assert ours.load_ip_adapter(root / f"{kind}.safetensors") == kind
    return ours, ref, root


def _reference(ref, root, kinds, scales):
    """A diffusers pipeline with ``kinds`` loaded, sharing ``ref``'s modules."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**{**ref.components, "unet": type(ref.unet).from_config(
        ref.unet.config)}, requires_safety_checker=False)
    pipe.unet.load_state_dict(ref.unet.state_dict())
    pipe.unet.eval()
    pipe.scheduler = _diffusers_scheduler(ref, "euler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root), subfolder="", weight_name=[f"{k}.safetensors" for k in kinds],
                         image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(list(scales))
    return pipe


KW = dict(height=16, width=24, num_inference_steps=4, guidance_scale=6.0, output_type="np")


def test_image_encoder_and_pixels_match_transformers(tmp_path):
    from transformers import CLIPImageProcessor
    ref = _encoder(tmp_path / "enc")
    images = [_picture(1, 45, 61), _picture(2, 70, 33), _picture(3, 30, 30)]
    want = CLIPImageProcessor(size=30, crop_size=30)(images, return_tensors="pt").pixel_values
    got = clip_pixels(images, 30)
    assert_close_abs(got, want, 1e-6, "pixels")
    with torch.no_grad():
        out = ref(want, output_hidden_states=True)
    for path in (tmp_path / "enc", tmp_path / "enc" / "model.safetensors"):
        ours = load_image_encoder(path, "cpu", torch.float32)
        with torch.no_grad():
            embeds, states = ours(want)
        assert_close_abs(embeds, out.image_embeds, 1e-5, f"{path.name} image_embeds")
        assert_close_abs(states, out.hidden_states[-2], 1e-5, f"{path.name} hidden_states[-2]")


@pytest.mark.parametrize("kind", ["plain", "plus", "full"])
def test_txt2img_matches_diffusers(sd1, kind):
    ours, ref, root = sd1
    picture = _picture(7, 40, 52)
    pipe = _reference(ref, root, [kind], [0.8])
    latents = _latents(8, batch=1)
    expected = pipe(PROMPT, ip_adapter_image=picture, latents=latents, **KW).images
    _assert_lively(expected, f"IP-Adapter {kind}")
    got = ours(PROMPT, ip_adapter_image=picture, ip_adapter=kind, ip_adapter_scale=0.8,
               sampler="euler", latents=latents, **KW)
    assert_close_abs(got, expected, IMAGE_ATOL, f"IP-Adapter {kind}")
    plain = ours(PROMPT, sampler="euler", latents=latents, **KW)
    assert np.abs(plain - got).max() > 20 * IMAGE_ATOL, "the IP-Adapter changed nothing"
    zero = ours(PROMPT, ip_adapter_image=picture, ip_adapter=kind, ip_adapter_scale=0.0,
                sampler="euler", latents=latents, **KW)
    assert_close_abs(zero, plain, 1e-6, f"IP-Adapter {kind} at scale 0")


@pytest.mark.parametrize("scale", [
    {"up": {"block_1": [0.0, 1.2, 0.4]}},  # InstantStyle's shape: one up block, layer by layer
    {"down": 0.7, "mid": [1.5]},            # a part as one number; the up blocks unset: 0
])
def test_per_block_scales_match_diffusers(sd1, scale):
    # diffusers' set_ip_adapter_scale dicts: what they leave out is 0. Eager and under a plan.
    ours, ref, root = sd1
    picture = _picture(9, 44, 40)
    pipe = _reference(ref, root, ["plus"], [scale])
    kw = dict(KW, latents=_latents(12, batch=1))
    expected = pipe(PROMPT, ip_adapter_image=picture, **kw).images
    ip = dict(ip_adapter_image=picture, ip_adapter="plus", sampler="euler", **kw)
    got = ours(PROMPT, ip_adapter_scale=scale, **ip)
    assert_close_abs(got, expected, IMAGE_ATOL, f"per-block scales {scale}")
    whole = ours(PROMPT, ip_adapter_scale=1.2, **ip)
    assert np.abs(whole - got).max() > 20 * IMAGE_ATOL, "the per-block scales changed nothing"
    ours.compile(16, 24, num_inference_steps=4, sampler="euler", ip_adapter=["plus"])
    try:
        static = ours(PROMPT, ip_adapter_scale=scale, **ip)
    finally:
        ours.runtime = None
    assert_close_abs(static, got, 1e-5, f"per-block scales {scale} under a static plan")


@pytest.mark.parametrize("scale, message", [
    ({"left": 1.0}, "ip_adapter_scale may set 'down', 'mid' and 'up' (diffusers' per-block "
                    "scales), got 'left'"),
    ({"down": {"block_1": 1.0}}, "ip_adapter_scale['down']['block_1']: the UNet's down blocks "
                                 "with attention layers are block_0"),
    ({"up": {"block_1": [1.0, 0.5]}}, "ip_adapter_scale['up']['block_1'] must be one number or "
                                      "a list of 3 (one per attention of the block), got 2"),
    ({"mid": [1.0, 2.0]}, "ip_adapter_scale['mid'] must be one number, got 2"),
    ({"up": {"block_1": [0.0, 11.0, 0.0]}}, "ip_adapter_scale['up']['block_1'] must be a "
                                            "number from 0 to 10, got 11.0"),
    ({"down": "strong"}, "ip_adapter_scale['down']['block_0'] must be a number from 0 to 10"),
])
def test_per_block_scale_refusals(sd1, scale, message):
    ours, _, _ = sd1
    with pytest.raises(SdrtError) as e:
        ours(PROMPT, ip_adapter_image=_picture(1, 30, 30), ip_adapter="plus",
             ip_adapter_scale=scale, **KW)
    assert message in str(e.value), str(e.value)


def test_two_adapters_and_several_images_match_diffusers(sd1):
    # plain with two images (their tokens joined) and full with one, each with its own scale;
    # and without CFG (only the conditional rows), under a static plan as well.
    ours, ref, root = sd1
    images = [[_picture(4, 33, 47), _picture(5, 64, 40)], _picture(6, 36, 36)]
    pipe = _reference(ref, root, ["plain", "full"], [0.6, 1.3])
    for guidance in (6.0, 1.0):
        kw = {**KW, "guidance_scale": guidance, "latents": _latents(9, batch=1)}
        expected = pipe(PROMPT, ip_adapter_image=images, **kw).images
        _assert_lively(expected, "two IP-Adapters")
        got = ours(PROMPT, ip_adapter_image=images, ip_adapter=["plain", "full"],
                   ip_adapter_scale=[0.6, 1.3], sampler="euler", **kw)
        assert_close_abs(got, expected, IMAGE_ATOL, f"two IP-Adapters at guidance {guidance}")
    # (strict: the plan compile built is the one the call runs; full-face: 26 tokens an image)
    plan = ours.compile(16, 24, num_inference_steps=4, sampler="euler", guidance=False,
                        strict=True, ip_adapter=["plain", "full"], ip_adapter_images=[2, 1])
    try:
        assert plan.shape.image_prompts == (("plain", 8), ("full", 26))
        got = ours(PROMPT, ip_adapter_image=images, ip_adapter=["plain", "full"],
                   ip_adapter_scale=[0.6, 1.3], sampler="euler", **kw)
        assert_close_abs(got, expected, IMAGE_ATOL, "two IP-Adapters under a static plan")
    finally:
        ours.runtime = None


def test_with_a_controlnet_in_guess_mode_matches_diffusers(sd1, tmp_path):
    # diffusers' ControlNet pipeline with an IP-Adapter: the ControlNet (in guess mode: the
    # conditional half only) sees the text, the UNet the text and the image tokens.
    from diffusers import StableDiffusionControlNetPipeline
    from test_controlnet import _controlnet, _hint
    ours, ref, root = sd1
    net = _controlnet(ref.unet, 3)
    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    picture, hint = _picture(12, 40, 40), _hint(4)
    base = _reference(ref, root, ["plus"], [0.9])
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=net,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(KW, latents=_latents(23, batch=1))
    expected = pipe(PROMPT, image=hint, ip_adapter_image=picture, guess_mode=True, **kw).images
    _assert_lively(expected, "ControlNet in guess mode with an IP-Adapter")
    ours.load_controlnet(tmp_path / "net", name="net")
    try:
        got = ours(PROMPT, control_image=hint, controlnet="net", guess_mode=True,
                   ip_adapter_image=picture, ip_adapter="plus", ip_adapter_scale=0.9,
                   sampler="euler", **kw)
    finally:
        ours.unload_controlnet("net")
    assert_close_abs(got, expected, IMAGE_ATOL, "ControlNet in guess mode with an IP-Adapter")


def _region(w, h, left, right):
    """A greyscale mask of a w x h picture, white from column ``left`` to ``right``."""
    a = np.zeros((h, w), np.uint8)
    a[:, left:right] = 255
    return Image.fromarray(a, "L")


def test_regional_masks_match_diffusers(sd1):
    # diffusers' ip_adapter_masks (IPAdapterMaskProcessor, binarized, bicubic at each layer):
    # "plain" with two images, each in its own region with its own scale ([[0.7, 1.6]]), and
    # "full" beside it without masks; eager and under a static plan. Masks at another size
    # than the picture are resized to it first.
    from diffusers.image_processor import IPAdapterMaskProcessor
    ours, ref, root = sd1
    images = [[_picture(4, 33, 47), _picture(5, 64, 40)], _picture(6, 36, 36)]
    masks = [_region(24, 16, 0, 10), _region(24, 16, 9, 24)]
    processed = IPAdapterMaskProcessor().preprocess(masks, height=16, width=24)
    pipe = _reference(ref, root, ["plain", "full"], [[0.7, 1.6], 0.8])
    kw = dict(KW, latents=_latents(21, batch=1))
    expected = pipe(PROMPT, ip_adapter_image=images, cross_attention_kwargs={
        "ip_adapter_masks": [processed.reshape(1, 2, 16, 24), None]}, **kw).images
    _assert_lively(expected, "regional IP-Adapter")
    ip = dict(ip_adapter_image=images, ip_adapter=["plain", "full"], sampler="euler", **kw)
    got = ours(PROMPT, ip_adapter_scale=[[0.7, 1.6], 0.8], ip_adapter_mask=[masks, None], **ip)
    assert_close_abs(got, expected, IMAGE_ATOL, "regional IP-Adapter")
    joined = ours(PROMPT, ip_adapter_scale=[1.0, 0.8], **ip)
    assert np.abs(joined - got).max() > 20 * IMAGE_ATOL, "the masks changed nothing"
    large = [m.resize((48, 32), Image.NEAREST) for m in masks]
    resized = ours(PROMPT, ip_adapter_scale=[[0.7, 1.6], 0.8], ip_adapter_mask=[large, None],
                   **ip)
    assert_close_abs(resized, got, 1e-6, "masks at twice the picture's size")
    ours.compile(16, 24, num_inference_steps=4, sampler="euler", strict=True,
                 ip_adapter=["plain", "full"], ip_adapter_images=[2, 1],
                 ip_adapter_masks=[True, False])
    try:
        static = ours(PROMPT, ip_adapter_scale=[[0.7, 1.6], 0.8],
                      ip_adapter_mask=[processed.reshape(1, 2, 16, 24), None], **ip)
    finally:
        ours.runtime = None
    assert_close_abs(static, got, 1e-5, "regional IP-Adapter under a static plan")


def test_a1111_region_masks(sd1):
    # The A1111 ControlNet extension's effective_region_mask: the mask as it is (not
    # binarized), bilinear to each layer's grid. A white mask is no mask; a black one no
    # adapter; each level's weights are the extension's interpolation.
    import functools

    from sdrt.engine.image_prompt import ImagePromptRequest
    from sdrt.engine.ip_adapter import layer_scales
    from sdrt.engine.layers import level_grids
    ours, _, _ = sd1
    picture = _picture(8, 30, 30)
    kw = dict(KW, sampler="euler", latents=_latents(22, batch=1))
    ip = dict(ip_adapter_image=picture, ip_adapter="plus", ip_adapter_scale=1.3,
              ip_adapter_mask_style="a1111")
    whole = ours(PROMPT, **{**ip, "ip_adapter_mask_style": "diffusers"}, **kw)
    white = ours(PROMPT, ip_adapter_mask=np.ones((5, 7), np.float32), **ip, **kw)
    assert_close_abs(white, whole, 1e-5, "a white region mask")
    black = ours(PROMPT, ip_adapter_mask=np.zeros((16, 24), np.float32), **ip, **kw)
    assert_close_abs(black, ours(PROMPT, **kw), 1e-5, "a black region mask")
    soft = np.random.default_rng(3).random((9, 13)).astype(np.float32)
    req = ImagePromptRequest.parse(["plus"], picture, None, 1.0, 0.0, 1.0, ours._prompt_images,
                                   functools.partial(layer_scales, ours.unet), soft, "a1111",
                                   ours._prompt_masks)
    grids = level_grids(8, 12, 2)
    weights = req.regions((16, 24), grids, 3)[0]
    assert weights.shape == (3, 1, 8 * 12 + 4 * 6)
    mask = torch.from_numpy(soft)[None, None]
    for (h, w), start in zip(grids, (0, 96)):
        factor = (h * w / 96) ** 0.5  # the extension's grid: the latent's, scaled
        want = torch.nn.functional.interpolate(mask, size=(int(8 * factor), int(12 * factor)),
                                               mode="bilinear").flatten()
        assert_close_abs(weights[2, 0, start:start + h * w], want, 1e-6, f"a1111 {h}x{w}")
    assert weights.min() < 0.2 and weights.max() > 0.8, "not binarized"


def test_refusals(sd1, tmp_path):
    ours, _, root = sd1
    picture = _picture(1, 30, 30)
    cases = {
        "ip_adapter 'nope' is not loaded": dict(ip_adapter="nope"),
        "ip_adapter_scale must be a number from 0 to 10": dict(ip_adapter="plain",
                                                               ip_adapter_scale=11),
        "ip_adapter_scale must be one value or a list of 2": dict(
            ip_adapter=["plain", "plus"], ip_adapter_image=[picture, picture],
            ip_adapter_scale=[1.0]),
        "ip_adapter_image must be a list of 2 entries": dict(ip_adapter=["plain", "plus"]),
        "ip_adapter_image values must be finite and in [0, 1]": dict(
            ip_adapter="plain", ip_adapter_image=torch.full((3, 8, 8), 2.0)),
        "ip_adapter_mask must hold one mask per image of its IP-Adapter (2), got 1": dict(
            ip_adapter="plain", ip_adapter_image=[picture, picture],
            ip_adapter_mask=_region(8, 8, 0, 4)),
        "ip_adapter_mask must be a list of 2 entries": dict(
            ip_adapter=["plain", "plus"], ip_adapter_image=[picture, picture],
            ip_adapter_mask=_region(8, 8, 0, 4)),
        "ip_adapter_mask values must be finite and in [0, 1]": dict(
            ip_adapter="plain", ip_adapter_mask=np.full((8, 8), 1.5, np.float32)),
        "ip_adapter_mask: one IP-Adapter's masks must share one size, got 8x8, 9x8": dict(
            ip_adapter="plain", ip_adapter_image=[picture, picture],
            ip_adapter_mask=[_region(8, 8, 0, 4), _region(9, 8, 0, 4)]),
        "ip_adapter_scale is a list (one scale per image), which only an IP-Adapter with "
        "ip_adapter_mask takes": dict(ip_adapter="plain", ip_adapter_scale=[[0.5]]),
        "ip_adapter_scale must be one value or a list of 2 (one per image of the IP-Adapter)":
            dict(ip_adapter="plain", ip_adapter_image=[picture, picture],
                 ip_adapter_mask=[_region(8, 8, 0, 4)] * 2, ip_adapter_scale=[[0.5]]),
        "ip_adapter_mask_style must be one of diffusers, a1111, got 'comfy'": dict(
            ip_adapter="plain", ip_adapter_mask_style="comfy"),
    }
    for message, kw in cases.items():
        kw.setdefault("ip_adapter_image", picture)
        with pytest.raises(SdrtError, match=re.escape(message)):
            ours(PROMPT, **KW, **kw)
    for field, value in (("ip_adapter", "plain"), ("ip_adapter_scale", 0.5),
                         ("ip_adapter_mask", _region(8, 8, 0, 4)),
                         ("ip_adapter_guidance_end", 0.5)):
        with pytest.raises(SdrtError, match=f"{field} was given without ip_adapter_image"):
            ours(PROMPT, **{field: value}, **KW)
    faceid = {"image_proj.proj.0.weight": torch.zeros(64, 8), "image_proj.proj.0.bias":
              torch.zeros(64), "image_proj.proj.2.weight": torch.zeros(128, 64),
              "image_proj.norm.weight": torch.ones(32),
              **{k: v for k, v in _weights("plain", 0, WIDTHS).items() if "ip_adapter" in k}}
    files = {"faceid": faceid, "wrong_unet": _weights("plain", 0, (32,) * 6),
             "wrong_encoder": _weights("plain", 0, WIDTHS, embed=16),
             "extra": {**_weights("plain", 0, WIDTHS), "image_proj.pos_emb.weight":
                       torch.zeros(2)}}
    messages = {"faceid": "an IP-Adapter FaceID", "wrong_unet": "an IP-Adapter for another "
                "model", "wrong_encoder": "reads 16-wide image embeddings, but the image "
                "encoder's projection_dim is 24", "extra": "does not have: image_proj.pos_emb"}
    for name, state in files.items():
        save_file(state, str(root / f"{name}.safetensors"))
        with pytest.raises(SdrtError, match=messages[name]):
            ours.load_ip_adapter(root / f"{name}.safetensors")
    (tmp_path / "a.safetensors").write_bytes((root / "plain.safetensors").read_bytes())
    with pytest.raises(SdrtError, match="no image_encoder folder beside it"):
        ours.load_ip_adapter(tmp_path / "a.safetensors")
    with pytest.raises(SdrtError, match="pickle checkpoints are not loaded"):
        ours.load_ip_adapter(tmp_path / "a.bin")
    for call, message in (
            (lambda: ours.load_ip_adapter(123), "ip_adapter path must be a path, got 123"),
            (lambda: ours.load_ip_adapter(root / "plain.safetensors", name=" "),
             "ip_adapter name must be a non-empty string"),
            (lambda: ours.compile(16, 24, num_inference_steps=2, ip_adapter="plain",
                                  ip_adapter_images=17),
             "ip_adapter_images must be an integer from 1 to 16 or a list of 1, got 17"),
            (lambda: ours.compile(16, 24, num_inference_steps=2, ip_adapter="nope"),
             "ip_adapter 'nope' is not loaded"),
            (lambda: ours.compile(16, 24, num_inference_steps=2, ip_adapter_masks=True),
             "ip_adapter_masks was given without ip_adapter"),
            (lambda: ours.compile(16, 24, num_inference_steps=2, ip_adapter="plain",
                                  ip_adapter_masks=[True, False]),
             "ip_adapter_masks must be True, False or a list of 1 of them")):
        with pytest.raises(SdrtError, match=message):
            call()
    assert ours.runtime is None  # nothing was built
    assert list(ours.ip_adapters) == ["plain", "plus", "full"]


def test_share_of_the_schedule(sd1):
    # The scale table: call i of 4 counts where [i/4, (i+1)/4] lies within [start, end].
    import functools

    from sdrt.engine.image_prompt import ImagePromptRequest
    from sdrt.engine.ip_adapter import layer_scales
    ours, _, _ = sd1
    picture = _picture(3, 30, 30)
    req = ImagePromptRequest.parse(["a", "b"], [picture, picture], None, [0.5, 2.0], [0.0, 0.3],
                                   [0.5, 1.0], ours._prompt_images,
                                   functools.partial(layer_scales, ours.unet))
    table = req.scale_table(3, 4)
    assert table.shape == (3, 4, len(WIDTHS), 2)  # (rows, calls, layers, adapters)
    assert (table == table[:, :, :1]).all(), "one number: the same scale in every layer"
    assert table[2, :, 0].tolist() == [[0.5, 0.0], [0.5, 0.0], [0.0, 2.0], [0.0, 2.0]]
    # No call inside [0, 0.2]: the image is the one without the adapter; the second half only
    # differs from both that and the whole schedule; a static plan runs the same table.
    kw = dict(KW, sampler="euler", latents=_latents(3, batch=1))
    plain = ours(PROMPT, **kw)
    ip = dict(ip_adapter_image=picture, ip_adapter="plus", ip_adapter_scale=1.5)
    none = ours(PROMPT, **ip, ip_adapter_guidance_end=0.2, **kw)
    assert_close_abs(none, plain, 1e-6, "an IP-Adapter on no call")
    half = ours(PROMPT, **ip, ip_adapter_guidance_start=0.5, **kw)
    whole = ours(PROMPT, **ip, **kw)
    for other, what in ((plain, "no adapter"), (whole, "the whole schedule")):
        assert np.abs(half - other).max() > 20 * IMAGE_ATOL, f"half the schedule = {what}"
    ours.compile(16, 24, num_inference_steps=4, sampler="euler")
    try:
        static = ours(PROMPT, **ip, ip_adapter_guidance_start=0.5, **kw)
    finally:
        ours.runtime = None
    assert_close_abs(static, half, 1e-5, "half the schedule under a static plan")
    with pytest.raises(SdrtError, match="ip_adapter_guidance_start must be below "
                                        "ip_adapter_guidance_end, got 0.6 and 0.5"):
        ours(PROMPT, **ip, ip_adapter_guidance_start=0.6, ip_adapter_guidance_end=0.5, **kw)


def test_sdxl_matches_diffusers(sdxl_base_folder, tmp_path):
    # SDXL: several transformer layers a block and a mid block with attention, in diffusers'
    # order (taken here from its attention processors, not from sdrt's walk).
    from diffusers import StableDiffusionXLPipeline
    folder, ref = sdxl_base_folder
    if not hasattr(ref, "original_scheduler_config"):
        ref.original_scheduler_config = dict(ref.scheduler.config)
    names = [n for n in ref.unet.attn_processors if n.endswith("attn2.processor")]
    modules = dict(ref.unet.named_modules())
    widths = tuple(modules[n[:-len(".processor")]].to_q.out_features for n in names)
    cross = ref.unet.config.cross_attention_dim
    _encoder(tmp_path / "image_encoder")
    save_file(_weights("plus", 5, widths, cross=cross), str(tmp_path / "xl.safetensors"))
    pipe = StableDiffusionXLPipeline(**{**ref.components, "unet": type(ref.unet).from_config(
        ref.unet.config)})
    pipe.unet.load_state_dict(ref.unet.state_dict())
    pipe.unet.eval()
    pipe.scheduler = _diffusers_scheduler(ref, "euler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="xl.safetensors",
                         image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(0.7)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    ours.load_ip_adapter(tmp_path / "xl.safetensors", image_encoder=tmp_path / "image_encoder")
    picture = _picture(8, 50, 40)
    kw = dict(height=16, width=16, num_inference_steps=3, guidance_scale=5.0, output_type="np",
              latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    expected = pipe(PROMPT, ip_adapter_image=picture, **kw).images
    _assert_lively(expected, "SDXL IP-Adapter")
    got = ours(PROMPT, ip_adapter_image=picture, ip_adapter_scale=0.7, sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, "SDXL IP-Adapter plus")
    # InstantStyle's style-only scales: the second attention of the first up block with
    # attention layers (every transformer layer of it), nothing elsewhere.
    up = next(i for i, b in enumerate(ref.unet.up_blocks) if getattr(b, "attentions", None))
    n = len(ref.unet.up_blocks[up].attentions)
    style = {"up": {f"block_{up}": [0.0, 1.0] + [0.0] * (n - 2)}}
    pipe.set_ip_adapter_scale(style)
    expected = pipe(PROMPT, ip_adapter_image=picture, **kw).images
    got = ours(PROMPT, ip_adapter_image=picture, ip_adapter_scale=style, sampler="euler", **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"SDXL IP-Adapter plus at {style}")
    ours.unload_ip_adapter("xl")
    assert not ours.ip_adapters and not ours._image_encoders, "unloading kept the modules"
    with pytest.raises(SdrtError, match="no IP-Adapter is loaded"):
        ours(PROMPT, ip_adapter_image=picture, **kw)
    with pytest.raises(SdrtError, match="ip_adapter 'xl' is not loaded"):
        ours.unload_ip_adapter("xl")


def _own_encoder(path):
    """An image encoder written by sdrt alone (no transformers): one .safetensors file."""
    from sdrt.engine.clip_vision import CLIPVisionModelWithProjection, VisionConfig
    model = CLIPVisionModelWithProjection(VisionConfig.from_dict(ENCODER))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 1.0))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _cli_assets(tmp_path):
    """An IP-Adapter for the built-in model, its encoder and a reference image, in tmp_path;
    the options that run them."""
    from sdrt.engine.demo.model import demo_pipeline
    from sdrt.engine.ip_adapter import cross_attentions
    unet = demo_pipeline().unet
    widths = tuple(a.to_q.out_features for a in cross_attentions(unet))
    save_file(_weights("plus", 3, widths, cross=unet.config.cross_attention_dim),
              str(tmp_path / "style.safetensors"))
    _own_encoder(tmp_path / "clip_h.safetensors")
    _picture(2, 50, 70).save(tmp_path / "ref.png")
    return ["--ip-adapter", f"{tmp_path / 'style.safetensors'}:0.7", "--ip-adapter-image",
            str(tmp_path / "ref.png"), "--image-encoder", str(tmp_path / "clip_h.safetensors"),
            "--ip-adapter-end", "0.7"]


@pytest.mark.gpu
def test_cuda_cli_builds_its_static_plan(tmp_path, capsys):
    # The plan is built up front with the IP-Adapter in it, and replays the eager image.
    from test_cli import _static_equals_eager
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a",
                          *_cli_assets(tmp_path)], tmp_path, capsys)


@pytest.mark.gpu
def test_cuda_cli_regional_plan(tmp_path, capsys):
    # With --ip-adapter-mask the plan holds the mask's weights at every level as a buffer.
    from test_cli import _static_equals_eager
    _region(64, 64, 10, 40).save(tmp_path / "region.png")
    _static_equals_eager(["generate", "a red fox", "--steps", "4", "--seed", "5", "--device",
                          "cuda", "--dtype", "fp32", "--sampler", "euler_a",
                          *_cli_assets(tmp_path), "--ip-adapter-mask",
                          str(tmp_path / "region.png")], tmp_path, capsys)


def test_cli_equals_the_library(tmp_path, capsys):
    # sdrt generate --ip-adapter on the built-in model: the library call's pixels; bad options
    # are one line.
    from sdrt.engine.demo.model import demo_config, demo_pipeline
    from test_cli import SMALL, _assert_one_error_line, _pixels, _run
    options = _cli_assets(tmp_path)
    pipe = demo_pipeline()
    out = tmp_path / "ip.png"
    base = ["generate", "a red fox", *SMALL, "--seed", "6", "--steps", "3"]
    code, _, err = _run(base + options + ["-o", str(out)], capsys)
    assert code == 0, err
    pipe.load_ip_adapter(tmp_path / "style.safetensors", tmp_path / "clip_h.safetensors")
    defaults = demo_config()["demo_defaults"]
    with Image.open(tmp_path / "ref.png") as im:
        expected = pipe("a red fox", height=64, width=64, num_inference_steps=3,
                        guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"],
                        generator=[torch.Generator().manual_seed(6)],
                        ip_adapter_image=im.convert("RGB"), ip_adapter_scale=0.7,
                        ip_adapter_guidance_end=0.7)[0]
    got = _pixels(out).astype(int)
    assert np.abs(got - np.asarray(expected).astype(int)).max() <= 1
    # The PNG records the unit as A1111's ControlNet extension does, and --from-png reads its
    # weight and share back for the --ip-adapter of that name.
    from sdrt.engine.infotext import short_hash
    from test_cli import _parameters
    digest = short_hash(str(tmp_path / "style.safetensors"))[:8]
    assert (f'ControlNet 0: "Module: ip-adapter-auto, Model: style [{digest}], Weight: 0.7, '
            f'Resize Mode: Crop and Resize, Processor Res: -1, Threshold A: -1, Threshold B: '
            f'-1, Guidance Start: 0, Guidance End: 0.7') in _parameters(out)
    again = tmp_path / "again.png"
    code, _, err = _run(["generate", "--from-png", str(out), "--ip-adapter",
                         str(tmp_path / "style.safetensors"), *options[2:6], "-o", str(again)],
                        capsys)
    assert code == 0, err
    assert np.array_equal(_pixels(again), _pixels(out)), "--from-png gave another image"
    assert _parameters(again) == _parameters(out)
    plain = tmp_path / "plain.png"
    assert _run(base + ["-o", str(plain)], capsys)[0] == 0
    assert np.abs(_pixels(plain).astype(int) - got).max() > 10, "the IP-Adapter changed nothing"
    # --ip-adapter-mask: the library's ip_adapter_mask (white: the region), binarized.
    _region(64, 64, 0, 30).save(tmp_path / "left.png")
    regional = tmp_path / "regional.png"
    code, _, err = _run(base + options + ["--ip-adapter-mask", str(tmp_path / "left.png"),
                                          "-o", str(regional)], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "ref.png") as im, Image.open(tmp_path / "left.png") as m:
        expected = pipe("a red fox", height=64, width=64, num_inference_steps=3,
                        guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"],
                        generator=[torch.Generator().manual_seed(6)],
                        ip_adapter_image=im.convert("RGB"), ip_adapter_scale=0.7,
                        ip_adapter_guidance_end=0.7, ip_adapter_mask=m.copy())[0]
    masked = _pixels(regional).astype(int)
    assert np.abs(masked - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(masked - got).max() > 10, "the mask changed nothing"
    for extra, message in (
            (options[:2], "--ip-adapter-image must be given once per --ip-adapter (got 0 for 1)"),
            (options + ["--ip-adapter-mask", "none", "--ip-adapter-mask", "none"],
             "--ip-adapter-mask must be given once per --ip-adapter (got 2 for 1)"),
            (options + ["--ip-adapter-mask", str(tmp_path / "nothing.png")],
             "cannot read ip-adapter mask"),
            (options[:4] + ["--ip-adapter-start", "0.8", "--ip-adapter-end", "0.5"],
             "--ip-adapter-start and --ip-adapter-end must satisfy 0 <= start < end <= 1"),
            (options[:4], "no image_encoder folder beside it"),
            (["--ip-adapter", str(tmp_path / "missing.safetensors"), *options[2:4]],
             "--ip-adapter " + str(tmp_path / "missing.safetensors") + ": no such file")):
        code, _, err = _run(base + extra + ["-o", str(tmp_path / "x.png")], capsys)
        assert code == 2
        _assert_one_error_line(err, message)
        assert not (tmp_path / "x.png").exists()
