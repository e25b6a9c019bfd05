"""ONNX export of sdrt's own networks, checked against sdrt in onnxruntime (CPU, tiny models).

Each family is exported once per session, in a different mode, so two exports cover both:
- sd1: static shapes (16×24, batch 1; the UNet at batch 2 for guidance), weights inline;
- sd2: dynamic batch/height/width axes, every weight forced into external data (the path a
  3.4 GB SD 1.5 fp32 UNet takes), traced at 16×16 and run at other sizes below.
"""
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_close_abs, assert_close_rel
from sdrt.engine import Pipeline, SdrtError
from sdrt.engine.cli import main
from sdrt.export import check_onnx, export_onnx, onnx_components
from sdrt.export import onnx_export
from sdrt.export.onnx_manifest import FILES, MANIFEST, MODELS, NAMES
from sdrt.export.onnx_runtime import OrtModel

REL_TOL = 1e-4  # float32 ONNX vs float32 sdrt: reordered float32 sums, ~1e-6 in practice
IMAGE_ATOL = 2e-3  # images in [0, 1], after a few denoising steps
MODES = {
    # family: (height, width, batch, dynamic, external_data_bytes)
    "sd1": (16, 24, 1, False, onnx_export.EXTERNAL_DATA_BYTES),  # non-square: catches a h/w swap
    "sd2": (16, 16, 1, True, 0),  # 0 bytes: every network takes the > 2 GB external-data path
}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    family, folder, _ = tiny_model
    h, w, batch, dynamic, external = MODES[family]
    out = str(tmp_path_factory.mktemp(f"onnx-{family}") / "export")
    manifest = export_onnx(folder, out, height=h, width=w, batch=batch, dynamic=dynamic,
                           external_data_bytes=external)
    ours = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    return family, folder, out, manifest, ours


def _sdrt(pipe, name, feeds):
    if name == "text_encoder":
        return [pipe.text_encoder(feeds["input_ids"])]
    if name == "unet":
        return [pipe.unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])]
    if name == "vae_decoder":
        return [pipe.vae.decode(feeds["latent"])]
    return list(pipe.vae.encode(feeds["image"]))


def _inputs(pipe, name, batch, height, width, seed):
    """Fresh non-zero-mean inputs (a dropped bias or offset cannot hide behind zero means)."""
    g = torch.Generator().manual_seed(seed)
    f = pipe.vae_scale_factor
    h, w = height // f, width // f
    randn = lambda *s, mean: mean + 0.8 * torch.randn(s, generator=g)
    if name == "text_encoder":
        return {"input_ids": torch.randint(0, 49408, (batch, 77), generator=g)}
    if name == "unet":
        d = pipe.unet.config.cross_attention_dim
        return {"sample": randn(2 * batch, 4, h, w, mean=-0.7), "timestep": torch.tensor([417.5]),
                "encoder_hidden_states": randn(2 * batch, 77, d, mean=0.3)}
    if name == "vae_decoder":
        return {"latent": randn(batch, 4, h, w, mean=1.3)}
    return {"image": randn(batch, 3, height, width, mean=-0.2).clamp(-1, 1)}


def _assert_onnx_matches(out, pipe, name, batch, height, width, seed, where):
    session = OrtModel(os.path.join(out, FILES[name]), name, "cpu")
    feeds = _inputs(pipe, name, batch, height, width, seed)
    got = session(**{k: v.clone() for k, v in feeds.items()})
    with torch.no_grad():
        ref = _sdrt(pipe, name, feeds)
    for out_name, o, r in zip(NAMES[name][1], got, ref):
        assert_close_rel(o, r, REL_TOL, f"{where}: {name}.{out_name} at batch {batch}, "
                                        f"{height}×{width}")


def test_every_file_passes_the_checker(exported):
    family, folder, out, manifest, _ = exported
    h, w, batch, dynamic, external = MODES[family]
    assert sorted(os.listdir(out)) == sorted(
        [MANIFEST] + [FILES[m] for m in MODELS] +
        ([FILES[m] + ".data" for m in MODELS] if external == 0 else []))
    for name in MODELS:
        path = os.path.join(out, FILES[name])
        onnx.checker.check_model(path)  # the path form: it follows external data
        model = onnx.load(path)  # with its external data, when it has some
        assert [i.name for i in model.graph.input] == list(NAMES[name][0]), f"{family} {name}"
        assert [o.name for o in model.graph.output] == list(NAMES[name][1]), f"{family} {name}"
        weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert weights == manifest["models"][name]["weight_bytes"] > 0, \
            f"{family} {name}: {weights} bytes of initializers loaded, expected the weights"
        opset = {o.domain: o.version for o in model.opset_import}[""]
        assert opset == manifest["opset"] == onnx_export.DEFAULT_OPSET, f"{family} {name}"
    assert (manifest["height"], manifest["width"], manifest["batch"]) == (h, w, batch)
    assert manifest["dynamic"] is dynamic and manifest["dtype"] == "fp32"
    assert manifest["source"] == os.path.abspath(folder) and manifest["sdrt_version"]
    unet_in = manifest["models"]["unet"]["inputs"]["sample"]["shape"]
    assert unet_in == (["batch", 4, "latent_height", "latent_width"] if dynamic else
                       [2 * batch, 4, h // 2, w // 2]), f"{family}: UNet sample shape {unet_in}"
    if not dynamic:
        image_in = manifest["models"]["vae_encoder"]["inputs"]["image"]["shape"]
        assert image_in == [1, 3, h, w], f"{family}: VAE encoder image shape {image_in}"
    assert manifest["config"] is None and manifest["prediction_type"] is None


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_matches_sdrt(exported, name):
    family, _, out, manifest, ours = exported
    _assert_onnx_matches(out, ours, name, manifest["batch"], manifest["height"],
                         manifest["width"], seed=11, where=family)


def test_shapes_follow_the_export_mode(exported):
    family, _, out, manifest, ours = exported
    if manifest["dynamic"]:
        # Two sizes (one non-square, one odd in latent pixels) × two batches, none traced.
        for batch, h, w in [(1, 24, 40), (3, 16, 16), (3, 24, 40), (1, 8, 32)]:
            for name in MODELS:
                _assert_onnx_matches(out, ours, name, batch, h, w, seed=batch * h + w,
                                     where=f"{family} dynamic")
    else:
        # A multiple of the exported batch runs as exported-size calls; other shapes are refused.
        h, w = manifest["height"], manifest["width"]
        _assert_onnx_matches(out, ours, "vae_decoder", 2, h, w, seed=5, where=family)
        unet = OrtModel(os.path.join(out, FILES["unet"]), "unet", "cpu")
        feeds = _inputs(ours, "unet", 1, h, w + 8, seed=6)
        with pytest.raises(SdrtError, match=r"exported for sample of shape \(2, 4, 8, 12\)"):
            unet(**feeds)


def test_check_onnx_passes(exported):
    family, folder, out, _, _ = exported
    rows = check_onnx(out, folder)
    assert {(r.model.split(".")[0], r.inputs) for r in rows} == \
        {(m, k) for m in MODELS for k in ("random", "generation")}
    for r in rows:
        assert r.passed and r.rel <= REL_TOL and r.tol == REL_TOL, \
            f"{family} check-onnx: {r.model} on {r.inputs} inputs: relative error {r.rel:.3e}, " \
            f"max abs {r.max_abs:.3e}"


def test_check_onnx_exits_1_past_tolerance(exported, tmp_path, capsys):
    # The same export against a model whose UNet weights are 1% off: only the UNet fails.
    import shutil

    from safetensors.torch import load_file, save_file
    family, folder, out, _, _ = exported
    other = str(tmp_path / "model")
    shutil.copytree(folder, other)
    f = os.path.join(other, "unet", "diffusion_pytorch_model.safetensors")
    save_file({k: v * 1.01 for k, v in load_file(f).items()}, f)
    assert main(["check-onnx", out, "--model", other]) == 1
    table = capsys.readouterr().out
    failed = [line.split()[0] for line in table.splitlines() if line.endswith("FAIL")]
    assert failed == ["unet", "unet"], f"{family}: failing rows {failed} in\n{table}"


def test_image_matches_the_torch_runtime(exported):
    family, folder, out, manifest, ours = exported
    onnx_pipe = Pipeline(onnx_components(out, folder, "cpu"), torch.device("cpu"),
                         torch.float32)
    # Static: the exported shapes. Dynamic: two prompts at a size it was not traced at.
    prompts, h, w = (["a red fox"], manifest["height"], manifest["width"]) if \
        not manifest["dynamic"] else (["a red fox", "a lighthouse at dusk"], 24, 16)
    latents = torch.randn(len(prompts), 4, h // 2, w // 2,
                          generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt="blurry", height=h, width=w, num_inference_steps=4,
              guidance_scale=7.5, latents=latents, output_type="np")
    expected = ours(prompts, **kw)
    assert expected.std() > 0.01, f"{family}: the reference image is flat"
    got = onnx_pipe(prompts, **kw)
    assert_close_abs(got, expected, IMAGE_ATOL, f"{family} ONNX-run image vs torch-run image")


def test_cli_generate_with_onnx_runtime(exported, tmp_path):
    from PIL import Image
    family, folder, out, manifest, _ = exported
    h, w = manifest["height"], manifest["width"]
    images = {}
    for runtime in ("torch", "onnx"):
        png = str(tmp_path / f"{runtime}.png")
        extra = ["--onnx-dir", out] if runtime == "onnx" else []
        rc = main(["generate", "a red fox", "--model", folder, "--runtime", runtime, *extra,
                   "--steps", "3", "--seed", "5", "--height", str(h), "--width", str(w),
                   "--device", "cpu", "-o", png])
        assert rc == 0, f"{family}: generate --runtime {runtime} exited {rc}"
        images[runtime] = np.asarray(Image.open(png), dtype=np.int16)
    diff = np.abs(images["onnx"] - images["torch"]).max()
    assert diff <= 1, f"{family}: PNGs differ by up to {diff} levels between runtimes"


def _bad_input_cases(folder, tmp):
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    full = os.path.join(tmp, "full")
    os.makedirs(full)
    open(os.path.join(full, "x"), "w").close()
    bad_manifests = {}
    for kind, content in (("malformed", "{not json"), ("not an object", "[]"),
                          ("without fields", '{"dtype": "fp32"}')):
        bad_manifests[kind] = os.path.join(tmp, kind.replace(" ", "-"))
        os.makedirs(bad_manifests[kind])
        with open(os.path.join(bad_manifests[kind], MANIFEST), "w") as fh:
            fh.write(content)
    out = os.path.join(tmp, "export")
    export = ["export", "onnx", "--model", folder, "--out", out]
    # Each case: (argv, words the one-line message must hold).
    return {
        "missing model": (["export", "onnx", "--model", os.path.join(tmp, "nope"), "--out", out],
                          "does not exist"),
        # The parent is a file: fails even for root, which ignores permission bits.
        "unwritable output folder": (["export", "onnx", "--model", folder, "--out",
                                      os.path.join(blocker, "export")], "cannot write"),
        "output folder not empty": (["export", "onnx", "--model", folder, "--out", full],
                                    "not an empty folder"),
        "opset below the exporter's": (export + ["--opset", "13"], "unsupported opset 13"),
        "opset past the exporter's": (export + ["--opset", "99"], "unsupported opset 99"),
        "opset not a number": (export + ["--opset", "x"], "invalid int"),
        "height not a multiple of 8": (export + ["--height", "20"], "multiple of 8"),
        "unknown dtype": (export + ["--dtype", "bf16"], "invalid choice"),
        "check-onnx of a folder that is not an export": (["check-onnx", full, "--model", folder],
                                                         MANIFEST),
        **{f"check-onnx of a manifest {kind}": (["check-onnx", d, "--model", folder], MANIFEST)
           for kind, d in bad_manifests.items()},
        "onnx runtime without a folder": (["generate", "x", "--model", folder, "--runtime",
                                           "onnx"], "--onnx-dir"),
    }


BAD_INPUT_CASES = ["missing model", "unwritable output folder", "output folder not empty",
                   "opset below the exporter's", "opset past the exporter's", "opset not a number",
                   "height not a multiple of 8", "unknown dtype",
                   "check-onnx of a folder that is not an export",
                   "check-onnx of a manifest malformed", "check-onnx of a manifest not an object",
                   "check-onnx of a manifest without fields", "onnx runtime without a folder"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_and_exit_2(tiny_sd1, tmp_path, capsys, case):
    folder, _ = tiny_sd1
    argv, words = _bad_input_cases(folder, str(tmp_path))[case]
    before = set(os.listdir(tmp_path))
    assert main(argv) == 2, f"{case}: exit status"
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrt: error:") and "\n" not in err and words in err, \
        f"{case}: stderr was {err!r}"
    assert set(os.listdir(tmp_path)) == before, f"{case}: left {set(os.listdir(tmp_path)) - before}"


def test_a_failed_export_leaves_nothing(tiny_sd1, tmp_path, monkeypatch):
    # The exporter dies after writing part of a file: neither the target nor a temporary
    # folder may remain.
    folder, _ = tiny_sd1

    def crash(name, module, args, shapes, tmp, opset, external_data_bytes):
        with open(os.path.join(tmp, FILES[name]), "wb") as fh:
            fh.write(b"half a protobuf")
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(onnx_export, "_export_one", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(folder, tmp_path / "export")
    assert os.listdir(tmp_path) == [], f"left behind: {os.listdir(tmp_path)}"


def test_fp16_export_within_fp16_tolerance(tiny_sd1, tmp_path):
    # Half-precision files: float16 inputs and outputs (ids stay int64, the timestep float32),
    # compared with sdrt in float32 at check_onnx's fp16 tolerance.
    from sdrt.export.onnx_check import TOLERANCES
    folder, _ = tiny_sd1
    manifest = export_onnx(folder, tmp_path / "fp16", height=16, width=16, dtype="fp16")
    types = {(m, k): v["dtype"] for m in MODELS
             for k, v in {**manifest["models"][m]["inputs"],
                          **manifest["models"][m]["outputs"]}.items()}
    assert types[("text_encoder", "input_ids")] == "int64"
    assert types[("unet", "timestep")] == "float32"
    assert {v for (m, k), v in types.items() if k not in ("input_ids", "timestep")} == \
        {"float16"}, f"fp16 export dtypes: {types}"
    for r in check_onnx(tmp_path / "fp16", folder):
        assert r.passed and r.tol == TOLERANCES["fp16"], \
            f"fp16 check-onnx: {r.model} on {r.inputs} inputs: relative error {r.rel:.3e} " \
            f"> {r.tol:.0e}, max abs {r.max_abs:.3e}"


def test_static_batch_exports_the_encoders_at_batch_1(tiny_sd1):
    # The pipeline encodes the prompts and one init image before repeating them per image: a
    # static --batch 2 export must take them one at a time (OrtModel splits larger batches),
    # while the UNet takes both guidance halves of both images and the decoder both images.
    from sdrt.engine.loading import load
    folder, _ = tiny_sd1
    c = load(folder, "cpu", torch.float32)
    specs = onnx_export._specs(c, 16, 24, 2, torch.float32, dynamic=False)
    batches = {name: args[0].shape[0] for name, (_, args, _) in specs.items()}
    assert batches == {"text_encoder": 1, "unet": 4, "vae_decoder": 2, "vae_encoder": 1}, batches


def _stub_export(monkeypatch):
    """_export_one writes empty files: for tests of what surrounds the exporter."""
    def stub(name, module, args, shapes, tmp, opset, external_data_bytes):
        open(os.path.join(tmp, FILES[name]), "wb").close()
        return {"file": FILES[name], "external_data": None, "weight_bytes": 0, "inputs": {},
                "outputs": {}}
    monkeypatch.setattr(onnx_export, "_export_one", stub)


def test_single_file_export_takes_config_and_prediction_type(tiny_model, tmp_path, monkeypatch):
    # A single-file checkpoint loads only with the configs of its folder; the prediction type
    # overrides the scheduler config's, and both reach the manifest for check-onnx and the
    # runtime.
    from sdrt.export.onnx_runtime import _tokenizer_and_scheduler
    from test_loading import _write_ldm_file
    _, folder, _ = tiny_model
    path = _write_ldm_file(tiny_model, tmp_path)
    _stub_export(monkeypatch)
    manifest = export_onnx(path, tmp_path / "export", height=16, width=16, config=folder,
                           prediction_type="v_prediction")
    assert manifest["config"] == os.path.abspath(folder)
    assert manifest["prediction_type"] == "v_prediction"
    assert manifest["scheduler_config"]["prediction_type"] == "v_prediction"
    for model in (path, folder):  # the file, or the folder the configs came from
        _, scheduler = _tokenizer_and_scheduler(model, manifest)
        assert scheduler["prediction_type"] == "v_prediction", model
    with pytest.raises(SdrtError, match="prediction_type must be"):
        export_onnx(path, tmp_path / "other", config=folder, prediction_type="eps")


def test_malformed_scheduler_config_at_run_time(tiny_sd1, tmp_path):
    # The runtime reads the model folder's scheduler config itself: a malformed one is named.
    import shutil

    from sdrt.export.onnx_runtime import _tokenizer_and_scheduler
    folder, _ = tiny_sd1
    other = shutil.copytree(folder, tmp_path / "model")
    (other / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(SdrtError, match="scheduler_config.json") as err:
        _tokenizer_and_scheduler(str(other), {"scheduler_config": {}, "pad_token": None})
    assert "\n" not in str(err.value)
