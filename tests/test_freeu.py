"""FreeU (engine/freeu.py): the "diffusers" style against diffusers' own ``enable_freeu`` on the
same weights; ComfyUI's FreeU and FreeU_V2 against diffusers' UNet running ComfyUI's rule (by
channel count, V2's adaptive factor) written out; static plans per setting; the CLI and a
workflow's FreeU nodes."""
import copy
import json

import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline, comfy
from sdrt.engine.errors import SdrtError
from sdrt.engine.freeu import FreeU, fourier_filter
from sdrt.engine.loading import build
from test_cli import _run, tiny_dir  # noqa: F401  (tiny_dir: the fixture)
from test_comfy import DEFAULT, _pixels, _small

# Three levels whose channels are 1×, 2× and 4× the first: where ComfyUI's rule finds both its
# (b1, s1) and (b2, s2) places.
CONFIG = dict(block_out_channels=(16, 32, 64), layers_per_block=2, sample_size=8,
              in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24,
              attention_head_dim=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
ATOL = 1e-5


@pytest.fixture(scope="module")
def unets():
    """(sdrt's UNet, diffusers' UNet2DConditionModel) with the same random weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIG).eval()
    ours = build("unet", {"_class_name": "UNet2DConditionModel", **CONFIG}, device="cpu")
    ours.load_state_dict(ref.state_dict())
    return ours.eval(), ref


def _inputs(seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([700, 300]),
            torch.randn(2, 7, 24, generator=g))


def _run_both(ours, ref, x, t, c):
    with torch.no_grad():
        return ours(x, t, c), ref(x, t, encoder_hidden_states=c).sample


@pytest.mark.parametrize("size", [16, 12])  # (12: FFTs of sizes that are not powers of 2)
def test_diffusers_style_is_enable_freeu(unets, size):
    ours, ref = unets
    x, t, c = _inputs(size=size)
    plain, _ = _run_both(ours, ref, x, t, c)
    ours.freeu = FreeU(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    try:
        got, want = _run_both(ours, ref, x, t, c)
    finally:
        ours.freeu = None
        ref.disable_freeu()
    assert (got - plain).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=ATOL, rtol=1e-4), (got - want).abs().max()


def comfy_rule(v2, first):
    """ComfyUI's FreeU (V2) output-block patch written out, in diffusers' apply_freeu's place:
    where the backbone has 4× (b1, s1) or 2× (b2, s2) the first level's channels, its first
    half times b (V2: 1 + (b - 1) times the channel mean scaled to [0, 1] per picture), the
    skip through diffusers' Fourier filter."""
    from diffusers.utils.torch_utils import fourier_filter as filter_ref

    def apply(resolution_idx, h, hsp, s1, s2, b1, b2):
        scale = {4 * first: (b1, s1), 2 * first: (b2, s2)}.get(h.shape[1])
        if scale is None:
            return h, hsp
        h = h.clone()
        half = h.shape[1] // 2
        if v2:
            mean = h.mean(1).unsqueeze(1)
            b = mean.shape[0]
            high = mean.view(b, -1).max(dim=-1, keepdim=True)[0][..., None, None]
            low = mean.view(b, -1).min(dim=-1, keepdim=True)[0][..., None, None]
            mean = (mean - low) / (high - low)
            h[:, :half] = h[:, :half] * ((scale[0] - 1) * mean + 1)
        else:
            h[:, :half] = h[:, :half] * scale[0]
        return h, filter_ref(hsp, threshold=1, scale=scale[1])
    return apply


@pytest.mark.parametrize("style", ["comfy", "comfy_v2"])
def test_comfy_styles_are_comfyuis_rule(unets, style, monkeypatch):
    from diffusers.models.unets import unet_2d_blocks
    ours, ref = unets
    x, t, c = _inputs(seed=2)
    monkeypatch.setattr(unet_2d_blocks, "apply_freeu", comfy_rule(style == "comfy_v2", 16))
    ours.freeu = FreeU(b1=1.5, b2=1.6, s1=0.9, s2=0.2, style=style)
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    try:
        got, want = _run_both(ours, ref, x, t, c)
        ours.freeu = FreeU(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # (the other rule: elsewhere)
        other, _ = _run_both(ours, ref, x, t, c)
    finally:
        ours.freeu = None
        ref.disable_freeu()
    assert torch.allclose(got, want, atol=ATOL, rtol=1e-4), (got - want).abs().max()
    assert (got - other).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 16, 16), (1, 1, 1, 1), (1, 2, 5, 7)])
@pytest.mark.parametrize("scale", [0.2, 1.0, 1.7])
def test_fourier_filter_is_diffusers(shape, scale):
    pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import fourier_filter as filter_ref
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    got = fourier_filter(x, scale)
    assert torch.allclose(got, filter_ref(x, threshold=1, scale=scale), atol=1e-6)
    if scale == 1.0:
        assert torch.allclose(got, x, atol=1e-6)
    else:
        assert (got - x).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(b1=1, b2=1, s1=1, s2=1, style="v3"), "FreeU style must be one of diffusers, comfy, "
                                              "comfy_v2, got 'v3'"),
    (dict(b1=11, b2=1, s1=1, s2=1), "FreeU b1 must be a number from 0 to 10, got 11"),
    (dict(b1=1, b2=float("nan"), s1=1, s2=1), "FreeU b2 must be a number from 0 to 10"),
    (dict(b1=1, b2=1, s1=True, s2=1), "FreeU s1 must be a number"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SdrtError, match=message):
        FreeU(**kwargs)


ARGS = dict(height=64, width=64, num_inference_steps=2, sampler="ddim", seed=3,
            output_type="np")


def test_a_static_plan_per_setting():
    from sdrt.engine.tiny import tiny_components
    pipe = Pipeline(tiny_components(), torch.device("cpu"), torch.float32)
    plain = pipe("a fox", **ARGS)
    pipe.enable_freeu(0.9, 0.2, 1.3, 1.4)
    eager = pipe("a fox", **ARGS)
    pipe.compile(height=64, width=64, num_inference_steps=2, sampler="ddim", strict=True)
    assert np.abs(pipe("a fox", **ARGS) - eager).max() <= 1e-6
    assert np.abs(eager - plain).max() > 1e-3
    pipe.disable_freeu()  # another setting: not the plan built
    with pytest.raises(SdrtError, match="static plan"):
        pipe("a fox", **ARGS)


def test_cli_freeu_and_workflow_nodes(tiny_dir, tmp_path, capsys):
    options = ["beautiful scenery nature glass bottle", "--negative", "text, watermark", "--seed",
               "4", "--steps", "3", "--guidance", "6.5", "--sampler", "euler_a_normal",
               "--width", "32", "--height", "24", "--model", tiny_dir]
    outs = {}
    graph = _small(DEFAULT)
    graph["20"] = {"class_type": "FreeU_V2", "inputs": {"model": ["4", 0], "b1": 1.3, "b2": 1.4,
                                                       "s1": 0.9, "s2": 0.2}}
    graph["3"]["inputs"]["model"] = ["20", 0]
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    for name, args in (("plain", options),
                       ("v2", options + ["--freeu", "1.3,1.4,0.9,0.2", "--freeu-style",
                                         "comfy_v2"]),
                       ("diffusers", options + ["--freeu", "1.3,1.4,0.9,0.2"]),
                       ("workflow", ["--workflow", str(tmp_path / "wf.json"), "--model",
                                     tiny_dir])):
        code, _, err = _run(["generate", *args, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outs[name] = _pixels(tmp_path / f"{name}.png").astype(int)
    assert np.array_equal(outs["workflow"], outs["v2"])
    assert np.abs(outs["v2"] - outs["plain"]).max() > 2
    assert np.abs(outs["v2"] - outs["diffusers"]).max() > 2
    code, _, err = _run(["generate", *options, "--freeu", "1.3,1.4", "-o",
                         str(tmp_path / "x.png")], capsys)
    assert code == 2 and "expected B1,B2,S1,S2" in err, err
    code, _, err = _run(["generate", *options, "--freeu", "1.3,1.4,0.9,12", "-o",
                         str(tmp_path / "x.png")], capsys)
    assert code == 2 and "FreeU s2 must be a number from 0 to 10, got 12" in err, err


def test_workflow_freeu_nodes():
    graph = copy.deepcopy(DEFAULT)
    graph["20"] = {"class_type": "FreeU", "inputs": {"model": ["4", 0]}}  # (its defaults)
    graph["3"]["inputs"]["model"] = ["20", 0]
    assert comfy.read(graph).freeu == (1.1, 1.2, 0.9, 0.2, "comfy")
    graph["21"] = {"class_type": "FreeU_V2", "inputs": {"model": ["20", 0], "b1": 1.3}}
    graph["3"]["inputs"]["model"] = ["21", 0]
    with pytest.raises(SdrtError, match="workflow node 20 \\(FreeU\\): sdrt runs one FreeU node "
                                        "on a model"):
        comfy.read(graph)
    graph["3"]["inputs"]["model"] = ["20", 0]
    graph["20"]["inputs"]["b1"] = 20
    with pytest.raises(SdrtError, match="workflow node 20 \\(FreeU\\): FreeU b1 must be a "
                                        "number from 0 to 10, got 20"):
        comfy.read(graph)
