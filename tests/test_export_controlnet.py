"""ControlNets and T2I-Adapters inside the exported UNet (``sdrt export onnx --controlnet``),
in onnxruntime on the CPU, tiny models:

- the UNet file, fed as ONNX Runtime's Stable Diffusion demo feeds its UNet with ControlNets
  (``controlnet_images`` (N, 2B, 3, H, W), ``controlnet_scales`` (N,); an adapter's alike),
  against diffusers' UNet, ControlNets and T2I-Adapters with the same weights;
- ``--runtime onnx`` with them against sdrt's own networks: several nets with their scales
  and shares of the schedule, one of two, none; the CLI;
- check-onnx, ONNX Runtime's optimizer, and the refusals.

sd1 is exported static (16×24, batch 1) with two ControlNets; sd2 dynamic with one ControlNet
and a one-channel T2I-Adapter, and run at a batch and size it was not traced at.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import assert_close_abs, assert_close_rel
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.cli import main
from sdrt.export import check_onnx, export_onnx, onnx_components
from test_adapter import _adapter
from test_controlnet import _controlnet, _hint

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4  # float32 ONNX vs float32 reference, as test_export_onnx
IMAGE_ATOL = 2e-3  # images in [0, 1]
# family: (height, width, dynamic, nets (name, seed; "sketch": a one-channel T2I-Adapter))
MODES = {"sd1": (16, 24, False, (("edges", 1), ("depth", 2))),
         "sd2": (16, 16, True, (("edges", 3), ("sketch", 4)))}


def _net(ref, name, seed):
    if name == "sketch":  # the tiny VAE halves the size: an unshuffle by 2 meets the latents
        return _adapter(seed, in_channels=1, channels=[32, 64], num_res_blocks=1,
                        downscale_factor=2)
    return _controlnet(ref.unet, seed)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """(family, model folder, export folder, manifest, diffusers pipeline, {name: diffusers
    ControlNet}, {name: its folder})."""
    family, folder, ref = tiny_model
    h, w, dynamic, specs = MODES[family]
    root = tmp_path_factory.mktemp(f"onnx-controlnet-{family}")
    nets, folders = {}, {}
    for name, seed in specs:
        nets[name] = _net(ref, name, seed)
        folders[name] = str(root / name)
        nets[name].save_pretrained(folders[name], safe_serialization=True)
    out = str(root / "export")
    manifest = export_onnx(folder, out, height=h, width=w, dynamic=dynamic,
                           controlnets=list(folders.values()))
    return family, folder, out, manifest, ref, nets, folders


def _diffusers_unet(ref, nets, sample, t, states, images, scales):
    """diffusers' UNet with the residuals of the ControlNets of ``nets``, each times its
    scale, summed (what ONNX Runtime's demo exports as its UNet with ControlNets), and the
    adapters' features alike (as diffusers' adapter pipelines add them, a one-channel
    adapter reading the image's grey)."""
    down = mid = features = None
    for net, image, scale in zip(nets, images, scales):
        if net.config.get("adapter_type"):
            if net.config.in_channels == 1:
                image = (image * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(
                    dim=1, keepdim=True)
            f = [a * float(scale) for a in net(image)]
            features = f if features is None else [a + b for a, b in zip(features, f)]
            continue
        d, m = net(sample, t, states, controlnet_cond=image, conditioning_scale=float(scale),
                   return_dict=False)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return ref.unet(sample, t, states, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                    down_intrablock_additional_residuals=features, return_dict=False)[0]


def _kinds(nets):
    """{kind: names} of the nets, in the export's input order."""
    return {kind: [n for n, net in nets.items()
                   if bool(net.config.get("adapter_type")) == (kind == "adapter")]
            for kind in ("controlnet", "adapter")}


def test_the_unet_takes_the_demos_controlnet_inputs(exported):
    family, _, out, manifest, _, nets, _ = exported
    h, w, dynamic, _ = MODES[family]
    session = ort.InferenceSession(os.path.join(out, "unet", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    kinds = _kinds(nets)
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states",
                            "controlnet_images", "controlnet_scales"] + (
                                ["adapter_images", "adapter_scales"] if kinds["adapter"] else [])
    assert [o.name for o in session.get_outputs()] == ["out_sample"]
    for kind, names in kinds.items():
        assert [e["name"] for e in manifest[f"{kind}s"]] == names
        if not names:
            continue
        images, scales, n = inputs[f"{kind}_images"], inputs[f"{kind}_scales"], len(names)
        if dynamic:
            assert images[0] == n and scales == [n]
            assert all(isinstance(d, str) for d in images[1:2] + images[3:])
        else:
            assert images == [n, 2, 3, h, w]
    with open(os.path.join(out, "model_index.json")) as fh:
        assert json.load(fh)["_class_name"] == "StableDiffusionControlNetPipeline"


def test_the_unet_file_matches_diffusers(exported):
    family, _, out, _, ref, nets, _ = exported
    h, w, dynamic, _ = MODES[family]
    rows, (h, w) = (4, (24, 16)) if dynamic else (2, (h, w))  # dynamic: not the traced shapes
    session = ort.InferenceSession(os.path.join(out, "unet", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(rows, 4, h // 2, w // 2, generator=g) - 0.7
    states = torch.randn(rows, 77, ref.unet.config.cross_attention_dim, generator=g) + 0.3
    images = torch.rand(len(nets), rows, 3, h, w, generator=g)
    t = torch.tensor(417.5)
    kinds = _kinds(nets)
    order = kinds["controlnet"] + kinds["adapter"]  # the export's, by kind
    outs = {}
    for scales in ([0.7, 1.3][:len(nets)], [0.0, 1.3][:len(nets)], [0.0] * len(nets)):
        feeds = {"sample": sample.numpy(), "timestep": t.numpy(),
                 "encoder_hidden_states": states.numpy()}
        for kind, names in kinds.items():
            at = [order.index(n) for n in names]
            if at:
                feeds[f"{kind}_images"] = images[at].numpy()
                feeds[f"{kind}_scales"] = np.array([scales[i] for i in at], dtype=np.float32)
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            expected = _diffusers_unet(ref, [nets[n] for n in order], sample, t, states,
                                       images, scales)
        assert_close_rel(got, expected, REL_TOL, f"{family} UNet with ControlNets at {scales}")
        outs[tuple(scales)] = got
    # The residuals matter, and a zero scale turns a net off.
    on, off = outs[tuple([0.7, 1.3][:len(nets)])], outs[tuple([0.0] * len(nets))]
    assert np.abs(on - off).max() > 1e-2, f"{family}: the ControlNets change nothing"


def _pipelines(exported):
    family, folder, out, _, _, _, folders = exported
    ours = Pipeline.from_pretrained(folder, device="cpu")
    onnx_pipe = Pipeline(onnx_components(out, folder, "cpu"), torch.device("cpu"), torch.float32)
    for name, path in folders.items():
        assert ours.load_controlnet(path) == name
        # The export's nets by name, or by their files (which the runtime does not read).
        assert onnx_pipe.load_controlnet(name if name == "edges" else path) == name
    return ours, onnx_pipe


def test_onnx_runtime_matches_the_torch_runtime(exported):
    family, _, _, _, _, nets, _ = exported
    h, w, dynamic, _ = MODES[family]
    # Two prompts: the static export (batch 1) runs them as two exported-size calls, each
    # with its rows of the control images; the dynamic one at a size it was not traced at.
    prompts, (h, w) = ["a red fox", "a lighthouse"], ((24, 16) if dynamic else (h, w))
    ours, onnx_pipe = _pipelines(exported)
    names = list(nets)
    latents = torch.randn(len(prompts), 4, h // 2, w // 2,
                          generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt="blurry", height=h, width=w, num_inference_steps=4,
              guidance_scale=7.5, latents=latents, output_type="np", sampler="euler")
    cases = {"all": dict(control_image=[_hint(5 + i, h, w) for i in range(len(names))]
                         if len(names) > 1 else _hint(5, h, w),
                         controlnet=names, controlnet_conditioning_scale=[0.6, 1.3][:len(names)],
                         control_guidance_start=[0.0, 0.3][:len(names)],
                         control_guidance_end=[0.7, 1.0][:len(names)]),
             "none": {}}
    if len(names) > 1:  # one of the two: the other runs at scale 0
        cases["one"] = dict(control_image=_hint(7, h, w), controlnet=names[1],
                            controlnet_conditioning_scale=0.9)
    images = {}
    for case, control in cases.items():
        expected = ours(prompts, **kw, **control)
        got = onnx_pipe(prompts, **kw, **control)
        assert_close_abs(got, expected, IMAGE_ATOL, f"{family} {case}: ONNX vs torch runtime")
        images[case] = got
    assert np.abs(images["all"] - images["none"]).max() > 20 * IMAGE_ATOL, \
        f"{family}: the ControlNets change nothing"


def test_settings_the_exported_unet_cannot_follow_are_refused(exported):
    family, _, _, _, _, nets, folders = exported
    h, w, _, _ = MODES[family]
    _, onnx_pipe = _pipelines(exported)
    name = list(nets)[0]
    kw = dict(height=h, width=w, num_inference_steps=2, output_type="np",
              control_image=_hint(5, h, w), controlnet=name)
    for extra, message in ((dict(guess_mode=True), "guess_mode needs"),
                           (dict(control_mode="prompt"), "control_mode needs"),
                           (dict(control_mask=np.ones((h, w), np.float32)),
                            "control_mask needs")):
        with pytest.raises(SdrtError, match=message):
            onnx_pipe("a red fox", **kw, **extra)
    with pytest.raises(SdrtError, match="not one the exported UNet runs"):
        onnx_pipe.load_controlnet("canny")
    onnx_pipe.load_controlnet(folders[name], name="again")
    with pytest.raises(SdrtError, match="names one of them twice"):
        onnx_pipe("a red fox", **{**kw, "controlnet": [name, "again"],
                                  "control_image": [_hint(5, h, w)] * 2})


def test_check_onnx_passes(exported):
    family, folder, out, _, _, _, _ = exported
    rows = check_onnx(out, folder)
    unet = [r for r in rows if r.model == "unet"]
    assert {r.inputs for r in unet} == {"random", "generation"}
    for r in rows:
        assert r.passed and r.rel <= REL_TOL, \
            f"{family} check-onnx: {r.model} on {r.inputs}: relative error {r.rel:.3e}"


def test_ort_optimizer_keeps_the_controlnets(exported, tmp_path):
    # ONNX Runtime's optimizer for the CPU on the UNet with ControlNets, checked against sdrt.
    import copy
    import shutil

    from sdrt.export.onnx_optimize import optimize_folder
    family, _, out, manifest, _, _, _ = exported
    if family != "sd1":
        pytest.skip("one family covers the optimizer")
    folder = str(tmp_path / "optimized")
    shutil.copytree(out, folder)
    optimized = optimize_folder(folder, copy.deepcopy(manifest), "cpu", fp16=False)
    assert optimized["optimized"]["checked"]
    assert sum(optimized["optimized"]["fused"]["unet"].values()) > 0
    assert list(optimized["models"]["unet"]["inputs"])[-2:] == ["controlnet_images",
                                                                "controlnet_scales"]


def test_cli_generate_with_exported_controlnets(exported, tmp_path, capsys):
    family, folder, out, _, _, nets, folders = exported
    if family != "sd1":
        pytest.skip("one family covers the command line")
    h, w, _, _ = MODES[family]
    hint = str(tmp_path / "hint.png")
    _hint(9, h, w).save(hint)
    name = list(nets)[1]
    args = ["generate", "a red fox", "--steps", "3", "--seed", "5", "--height", str(h),
            "--width", str(w), "--device", "cpu", "--controlnet", f"{folders[name]}:0.8",
            "--control-image", hint]
    images = {}
    for runtime in ("torch", "onnx"):
        png = str(tmp_path / f"{runtime}.png")
        extra = ["--onnx-dir", out] if runtime == "onnx" else []
        assert main([*args, "--model", folder, "--runtime", runtime, *extra, "-o", png]) == 0
        images[runtime] = np.asarray(Image.open(png), dtype=np.int16)
    diff = np.abs(images["onnx"] - images["torch"]).max()
    assert diff <= 1, f"PNGs differ by up to {diff} levels between runtimes"
    capsys.readouterr()
    for extra, message in ((["--controlnet", "canny", "--control-image", hint],
                            "'canny' is not one the exported UNet runs"),
                           (["--guess-mode"], "guess_mode needs --runtime torch")):
        rc = main([*args, *extra, "--model", folder, "--runtime", "onnx", "--onnx-dir", out,
                   "-o", str(tmp_path / "refused.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (rc, err)
    assert not os.path.exists(tmp_path / "refused.png")


def test_export_refuses_what_it_cannot_export(tiny_sd1, tmp_path, capsys):
    from safetensors.torch import save_file
    folder, ref = tiny_sd1
    style = tmp_path / "t2iadapter_style.safetensors"
    save_file({"style_embedding": torch.zeros(1, 8, 4)}, str(style))
    wide = _controlnet(ref.unet, 4, block_out_channels=[48, 64])
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)
    for net, message in ((tmp_path / "missing", "does not exist"),
                         (style, "a T2I style adapter"),
                         (tmp_path / "wide", "for another model")):
        out = tmp_path / "out"
        rc = main(["export", "onnx", "--model", folder, "--out", str(out), "--controlnet",
                   str(net)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (net, rc, err)
        assert not out.exists()
    with pytest.raises(SdrtError, match="controlnets must be a list"):
        export_onnx(folder, tmp_path / "out", controlnets=str(tmp_path / "wide"))


def test_sdxl_controlled_unet_matches_diffusers(sdxl_base_folder, tmp_path):
    # The wrapper the export traces, on SDXL (its ControlNet reads the pooled text and the
    # time ids too), against diffusers' SDXL UNet and ControlNet as ONNX Runtime's demo
    # combines them.
    from sdrt.engine.loading import load
    from sdrt.export.onnx_controlnet import ControlledUNet, load_controlnets
    folder, ref = sdxl_base_folder
    net = _controlnet(ref.unet, 31)
    net.save_pretrained(tmp_path / "xl", safe_serialization=True)
    c = load(folder, "cpu", torch.float32)
    nets, _, _ = load_controlnets([tmp_path / "xl"], c.unet, torch.float32, 8)
    ours = ControlledUNet(c.unet, nets, ("text_embeds", "time_ids"))
    g = torch.Generator().manual_seed(32)
    sample = torch.randn(2, 4, 8, 8, generator=g) + 0.2
    states = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=g) - 0.1
    pooled = torch.randn(2, ref.text_encoder_2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 4.0, 16.0, 16.0]] * 2)
    images, t = torch.rand(1, 2, 3, 16, 16, generator=g), torch.tensor(613.0)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        down, mid = net(sample, t, states, controlnet_cond=images[0], conditioning_scale=0.8,
                        added_cond_kwargs=added, return_dict=False)
        expected = ref.unet(sample, t, states, added_cond_kwargs=added,
                            down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
        got = ours(sample, t, states, pooled, time_ids, images, torch.tensor([0.8]))
        plain = c.unet(sample, t, states, text_embeds=pooled, time_ids=time_ids)
    assert_close_rel(got, expected, REL_TOL, "SDXL UNet with a ControlNet")
    assert (got - plain).abs().max() > 1e-3, "the ControlNet changes nothing"


def test_an_inpainting_unets_controlnets_read_the_latents_only(tmp_path):
    # diffusers' ControlNet inpainting pipeline hands its ControlNets the latents and the
    # UNet the latents, the mask and the masked image's latents: the wrapper slices them.
    pytest.importorskip("diffusers")
    from sdrt.engine.loading import load
    from sdrt.export.onnx_controlnet import ControlledUNet, load_controlnets
    from tiny_models import save_diffusers_folder
    ref = save_diffusers_folder(str(tmp_path / "inpaint"), "sd1", seed=4, in_channels=9)
    net = _controlnet(ref.unet, 33, in_channels=4)
    net.save_pretrained(tmp_path / "net", safe_serialization=True)
    c = load(str(tmp_path / "inpaint"), "cpu", torch.float32)
    nets, _, _ = load_controlnets([tmp_path / "net"], c.unet, torch.float32, 2)
    ours = ControlledUNet(c.unet, nets, ())
    g = torch.Generator().manual_seed(34)
    sample = torch.randn(2, 9, 8, 12, generator=g) - 0.3
    states = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=g)
    images, t = torch.rand(1, 2, 3, 16, 24, generator=g), torch.tensor(301.0)
    with torch.no_grad():
        down, mid = net(sample[:, :4], t, states, controlnet_cond=images[0],
                        conditioning_scale=1.2, return_dict=False)
        expected = ref.unet(sample, t, states, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
        got = ours(sample, t, states, images, torch.tensor([1.2]))
    assert_close_rel(got, expected, REL_TOL, "inpainting UNet with a ControlNet")
