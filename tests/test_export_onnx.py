"""ONNX export of sdrt's own networks, checked against sdrt in onnxruntime (CPU, tiny models).

Each family is exported once per session, in a different mode, so two exports cover both:
- sd1: static shapes (16×24, batch 1; the UNet at batch 2 for guidance), weights inline;
- sd2: dynamic batch/height/width axes, every weight forced into external data (the path a
  3.4 GB SD 1.5 fp32 UNet takes), traced at 16×16 and run at other sizes below.

The folder is Optimum's layout (tests/test_export_optimum.py loads it with Optimum itself, in
its own environment); ONNX Runtime's optimizer is run on it below and its fusions counted
against diffusers' networks exported by the TorchScript exporter.
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
from sdrt.export.onnx_check import reference
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
        return {"sample": randn(2 * batch, 4, h, w, mean=-0.7), "timestep": torch.tensor(417.5),
                "encoder_hidden_states": randn(2 * batch, 77, d, mean=0.3)}
    if name == "vae_decoder":
        return {"latent_sample": randn(batch, 4, h, w, mean=1.3)}
    return {"sample": randn(batch, 3, height, width, mean=-0.2).clamp(-1, 1)}


def _assert_onnx_matches(out, pipe, name, batch, height, width, seed, where):
    session = OrtModel(os.path.join(out, FILES[name]), name, "cpu")
    feeds = _inputs(pipe, name, batch, height, width, seed)
    got = session(**{k: v.clone() for k, v in feeds.items()})
    with torch.no_grad():
        ref = reference(pipe, name, feeds)
    assert session.output_names == list(NAMES[name][1])
    for out_name, o, r in zip(session.output_names, got, ref):
        assert_close_rel(o, r, REL_TOL, f"{where}: {name}.{out_name} at batch {batch}, "
                                        f"{height}×{width}")


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


def test_the_folder_is_optimums_layout(exported):
    # What optimum-cli writes for SD 1.x/2.x and ORTStableDiffusionPipeline reads.
    import json
    from sdrt.engine.tokenizer import ClipTokenizer
    family, folder, out, manifest, ours = exported
    external = MODES[family][4]
    files = _files(out)
    assert [f for f in files if not f.startswith("tokenizer/")] == sorted(
        [MANIFEST, "model_index.json", "scheduler/scheduler_config.json"] +
        [f"{m}/{f}" for m in MODELS for f in ("model.onnx", "config.json")] +
        ([f"{m}/model.onnx.data" for m in MODELS] if external == 0 else [])), family
    # The slow CLIPTokenizer's files (transformers < 5, which Optimum needs), the same tokens.
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(files), files
    exported_tokenizer = ClipTokenizer.from_folder(os.path.join(out, "tokenizer"))
    for text in ("a red fox, (masterpiece)", ""):
        assert torch.equal(exported_tokenizer(text), ours.tokenizer(text)), f"{family}: {text!r}"
    with open(os.path.join(out, "model_index.json")) as fh:
        index = json.load(fh)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"][1] == manifest["scheduler_config"]["_class_name"]
    for m, source in (("unet", "unet"), ("vae_decoder", "vae"), ("vae_encoder", "vae"),
                      ("text_encoder", "text_encoder")):
        with open(os.path.join(out, m, "config.json")) as a, \
                open(os.path.join(folder, source, "config.json")) as b:
            assert json.load(a) == json.load(b), f"{family}: {m}/config.json"


def test_every_file_passes_the_checker(exported):
    family, folder, out, manifest, _ = exported
    h, w, batch, dynamic, external = MODES[family]
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
    assert manifest["models"]["unet"]["inputs"]["timestep"]["shape"] == [], \
        f"{family}: Optimum's UNet takes a scalar timestep"
    if not dynamic:
        image_in = manifest["models"]["vae_encoder"]["inputs"]["sample"]["shape"]
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
    # What changes sdrt's own networks is refused with the ONNX runtime, in one line.
    for option in (["--pag-scale", "3"], ["--freeu", "1.3,1.4,0.9,0.2"], ["--vae-tiling"]):
        rc = main(["generate", "a red fox", "--model", folder, "--runtime", "onnx", "--onnx-dir",
                   out, "--steps", "1", "--height", str(h), "--width", str(w), "--device", "cpu",
                   *option, "-o", str(tmp_path / "refused.png")])
        assert rc == 2, option


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

    def crash(name, module, args, shapes, names, tmp, opset, external_data_bytes, outputs):
        os.makedirs(os.path.join(tmp, name))
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
    batches = {name: args[0].shape[0] for name, (_, args, *_) in specs.items()}
    assert batches == {"text_encoder": 1, "unet": 4, "vae_decoder": 2, "vae_encoder": 1}, batches


def _stub_export(monkeypatch):
    """_export_one writes empty files: for tests of what surrounds the exporter."""
    def stub(name, module, args, shapes, names, tmp, opset, external_data_bytes, outputs):
        os.makedirs(os.path.join(tmp, name))
        open(os.path.join(tmp, FILES[name]), "wb").close()
        return {"file": FILES[name], "external_data": None, "weight_bytes": 0, "inputs": {},
                "outputs": {}}
    monkeypatch.setattr(onnx_export, "_export_one", stub)


def test_single_file_export_takes_config_and_prediction_type(tiny_model, tmp_path, monkeypatch):
    # A single-file checkpoint loads only with the configs of its folder; the prediction type
    # overrides the scheduler config's, and both reach the manifest for check-onnx and the
    # runtime.
    from sdrt.export.onnx_runtime import _tokenizers_and_scheduler
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
        _, scheduler = _tokenizers_and_scheduler(model, manifest)
        assert scheduler["prediction_type"] == "v_prediction", model
    with pytest.raises(SdrtError, match="prediction_type must be"):
        export_onnx(path, tmp_path / "other", config=folder, prediction_type="eps")


def test_malformed_scheduler_config_at_run_time(tiny_sd1, tmp_path):
    # The runtime reads the model folder's scheduler config itself: a malformed one is named.
    import shutil

    from sdrt.export.onnx_runtime import _tokenizers_and_scheduler
    folder, _ = tiny_sd1
    other = shutil.copytree(folder, tmp_path / "model")
    (other / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(SdrtError, match="scheduler_config.json") as err:
        _tokenizers_and_scheduler(str(other), {"scheduler_config": {}, "pad_token": None})
    assert "\n" not in str(err.value)


# ONNX Runtime's optimizer on the export: fusions counted against diffusers' networks exported
# by the TorchScript exporter (what ORT's patterns were written for), and the result checked.

# What ORT's SD fusions produce, and what the issue counted on diffusers' legacy export.
FUSED = {"unet": ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "attention"),
         "vae_decoder": ("GroupNorm", "SkipGroupNorm"),
         "vae_encoder": ("GroupNorm", "SkipGroupNorm")}


def _legacy_diffusers(pipe, name, h, w, path):
    """diffusers' network exported by torch.onnx's TorchScript exporter (dynamo=False) at
    static shapes, with Optimum's names: the baseline ORT's fusions were written against
    (static: its dynamic UNet makes ORT's attention fusion fail on NumPy ≥ 2.4)."""
    import warnings

    class Decoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    class Encoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return self.vae.quant_conv(self.vae.encoder(x))

    g = torch.Generator().manual_seed(0)
    module, args = {
        "unet": lambda: (pipe.unet, (torch.randn(2, 4, h // 2, w // 2, generator=g),
                                     torch.tensor(999.0),
                                     torch.randn(2, 77, pipe.unet.config.cross_attention_dim,
                                                 generator=g))),
        "vae_decoder": lambda: (Decoder(pipe.vae), (torch.randn(1, 4, h // 2, w // 2,
                                                                generator=g),)),
        "vae_encoder": lambda: (Encoder(pipe.vae), (torch.randn(1, 3, h, w, generator=g),)),
    }[name]()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, path, dynamo=False, opset_version=17)
    return path


def _fused(counts):
    return {**counts, "attention": counts["Attention"] + counts["MultiHeadAttention"]}


@pytest.fixture(scope="module")
def optimized_for_cuda(exported, tmp_path_factory):
    """The module's export through ORT's optimizer for the CUDA provider (all its fusions);
    not run: this machine may have no CUDA, and the fusions are counted on the graph."""
    import shutil

    from sdrt.export.onnx_manifest import read_manifest
    from sdrt.export.onnx_optimize import optimize_folder
    family, _, out, _, _ = exported
    copy = str(tmp_path_factory.mktemp(f"ort-cuda-{family}") / "export")
    shutil.copytree(out, copy)
    return copy, optimize_folder(copy, read_manifest(copy), "cuda", fp16=False, check=False)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_ort_fuses_at_least_what_it_fuses_in_diffusers_legacy_export(
        exported, optimized_for_cuda, tiny_model, tmp_path, name):
    # Both exports of both families: sd1 static, sd2 dynamic (and its linear projections and
    # per-level head counts). Every fused operator counts at least as often as in diffusers'
    # legacy export of the same networks, and the UNet's GroupNorm, GEGLU and attention are
    # all fused (none left for ORT's generic kernels).
    from sdrt.export.onnx_optimize import optimize_file
    family, _, _, manifest, _ = exported
    _, _, diffusers_pipe = tiny_model
    ours = _fused(optimized_for_cuda[1]["optimized"]["fused"][name])
    h, w = manifest["height"], manifest["width"]
    legacy = _fused(optimize_file(_legacy_diffusers(diffusers_pipe, name, h, w,
                                                    str(tmp_path / "legacy.onnx")),
                                  "unet" if name == "unet" else "vae", "cuda", False,
                                  external=False))
    short = {op: (ours[op], legacy[op]) for op in FUSED[name] if ours[op] < legacy[op]}
    assert not short, f"{family} {name}: ORT fused fewer (sdrt, diffusers legacy): {short}"
    if name == "unet":
        cfg = diffusers_pipe.unet.config
        blocks = sum(1 for b in cfg.down_block_types if b.startswith("CrossAttn")) * \
            cfg.layers_per_block + sum(1 for b in cfg.up_block_types
                                       if b.startswith("CrossAttn")) * \
            (cfg.layers_per_block + 1) + 1  # + the mid block's
        assert ours["BiasSplitGelu"] == ours["BiasAdd"] == blocks, (family, ours)
        # Float32: the self-attention of each block (ORT fuses cross-attention only with
        # packed K/V, which its float16 path turns on).
        assert ours["Attention"] == blocks, (family, ours)
        assert ours["GroupNorm"] + ours["SkipGroupNorm"] > 0


def test_optimize_ort_for_the_cpu_passes_check_onnx(tiny_sd1, tmp_path, capsys):
    # The CLI path: export, ORT's optimizer for the CPU provider, and check_onnx against sdrt
    # inside the export, which fails past tolerance (1e-4 for float32).
    import json
    folder, _ = tiny_sd1
    out = str(tmp_path / "ort")
    assert main(["export", "onnx", "--model", folder, "--out", out, "--height", "16",
                 "--width", "16", "--optimize", "ort", "--target", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "optimized by ONNX Runtime" in printed and "checked against sdrt" in printed, printed
    with open(os.path.join(out, MANIFEST)) as fh:
        optimized = json.load(fh)["optimized"]
    assert optimized["target"] == "cpu" and optimized["checked"] is True
    unet = optimized["fused"]["unet"]
    assert unet["Attention"] + unet["MultiHeadAttention"] > 0 and unet["GroupNorm"] == 0, unet


def test_optimize_ort_fp16_for_cuda_without_a_gpu_is_not_checked(exported, tmp_path,
                                                                 monkeypatch):
    # Where the CUDA provider cannot run, the manifest says the files were not checked; they
    # hold ORT's CUDA-only operators, float16 inside and float32 at the inputs and outputs.
    import shutil

    from sdrt.export import onnx_optimize
    from sdrt.export.onnx_manifest import read_manifest
    family, _, out, _, _ = exported
    monkeypatch.setattr(onnx_optimize, "can_run", lambda target: target == "cpu")
    copy = str(tmp_path / "export")
    shutil.copytree(out, copy)
    manifest = onnx_optimize.optimize_folder(copy, read_manifest(copy), "cuda", fp16=True)
    assert manifest["optimized"]["checked"] is False and manifest["dtype"] == "fp16"
    assert read_manifest(copy)["optimized"] == manifest["optimized"]
    model = onnx.load(os.path.join(copy, FILES["unet"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupNorm", "BiasSplitGelu", "NhwcConv", "MultiHeadAttention"} <= ops, \
        f"{family}: {sorted(ops)}"
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["sample"] == \
        onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


# -- SDXL ---------------------------------------------------------------------------------------
# The tiny SDXL base (two text encoders, six time ids) and refiner (text encoder 2 only, an
# aesthetic score), written by sdrt's writer, each exported once at a non-square size (a
# height/width swap in the time ids or the latents shows): the base static, as Optimum's test
# exports it too, the refiner with dynamic axes (the UNet's extra inputs take the batch axis
# too; its text encoder is the one fewer to export).
SDXL_H, SDXL_W = 32, 48
SDXL_DYNAMIC = {"sdxl": False, "sdxl-refiner": True}


def tiny_sdxl_config(family):
    """The tiny config with a two-level VAE (scale factor 2): each VAE export takes half the
    time of the four-level one's, and the VAE is not what sets SDXL apart."""
    from sdrt.engine.tiny import tiny_config
    config = tiny_config(family)
    vae = config["vae"]
    config["vae"] = {**vae, "block_out_channels": vae["block_out_channels"][:2],
                     "down_block_types": vae["down_block_types"][:2],
                     "up_block_types": vae["up_block_types"][:2]}
    return config


@pytest.fixture(scope="module", params=["sdxl", "sdxl-refiner"])
def sdxl_exported(request, tmp_path_factory):
    from sdrt.engine.tiny import write_model
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    folder, out = str(root / "model"), str(root / "export")
    write_model(folder, tiny_sdxl_config(request.param))
    manifest = export_onnx(folder, out, height=SDXL_H, width=SDXL_W,
                           dynamic=SDXL_DYNAMIC[request.param])
    ours = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    return request.param, folder, out, manifest, ours


def test_sdxl_folder_is_optimums_sdxl_layout(sdxl_exported):
    # What optimum-cli writes for SDXL and ORTStableDiffusionXL(Img2Img)Pipeline reads: the
    # refiner has no text_encoder/; each encoder gives every layer's states, the UNet takes
    # the pooled text_embeds and the time ids by name.
    import json
    from sdrt.engine.tokenizer import ClipTokenizer
    from sdrt.export.onnx_manifest import models_of
    family, folder, out, manifest, ours = sdxl_exported
    networks = models_of(ours.family)
    assert networks == (("text_encoder", "text_encoder_2") if family == "sdxl" else
                        ("text_encoder_2",)) + ("unet", "vae_decoder", "vae_encoder")
    files = _files(out)
    assert [f for f in files if not f.startswith("tokenizer")] == sorted(
        [MANIFEST, "model_index.json", "scheduler/scheduler_config.json"] +
        [f"{m}/{f}" for m in networks for f in ("model.onnx", "config.json")]), family
    with open(os.path.join(out, "model_index.json")) as fh:
        index = json.load(fh)
    with open(os.path.join(folder, "model_index.json")) as fh:
        source = json.load(fh)
    for key in ("_class_name", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                "force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert index.get(key) == source.get(key, index.get(key)), f"{family}: {key}"
    assert index["requires_aesthetics_score"] is (family == "sdxl-refiner")
    for tokenizer in ours.family.tokenizers:
        exported_tokenizer = ClipTokenizer.from_folder(os.path.join(out, tokenizer))
        for text in ("a red fox, (masterpiece)", ""):
            assert torch.equal(exported_tokenizer(text), getattr(ours, tokenizer)(text)), \
                f"{family} {tokenizer}: {text!r}"
    for name in ours.family.text_encoders:
        head = ["text_embeds", "last_hidden_state"] if name == "text_encoder_2" else \
            ["last_hidden_state", "pooler_output"]
        layers = getattr(ours, name).config.num_hidden_layers
        assert list(manifest["models"][name]["outputs"]) == \
            head + [f"hidden_states.{i}" for i in range(layers + 1)], f"{family} {name}"
    unet = manifest["models"]["unet"]["inputs"]
    time_ids, f = ours.family.num_time_ids, ours.vae_scale_factor
    b, h, w = ("batch", "latent_height", "latent_width") if SDXL_DYNAMIC[family] else \
        (2, SDXL_H // f, SDXL_W // f)
    assert {k: v["shape"] for k, v in unet.items()} == {
        "sample": [b, 4, h, w], "timestep": [],
        "encoder_hidden_states": [b, 77, ours.unet.config.cross_attention_dim],
        "text_embeds": [b, 32], "time_ids": [b, time_ids]}, family


def test_sdxl_onnx_text_encoders_answer_the_pipelines_calls(sdxl_exported):
    # encode_text's calls, answered from the exported layer states: the penultimate layer
    # without the final norm (clip skip 0), the first layer (clip skip 1), and encode's pooled.
    family, folder, out, _, ours = sdxl_exported
    c = onnx_components(out, folder, "cpu")
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(4))
    for name in ours.family.text_encoders:
        onnx_encoder, encoder = getattr(c, name), getattr(ours, name)
        with torch.no_grad():
            for skip in (1, 0):
                assert_close_rel(onnx_encoder(ids, clip_skip=skip, final_norm=False),
                                 encoder(ids, clip_skip=skip, final_norm=False), REL_TOL,
                                 f"{family} {name} clip_skip {skip}")
            for got, ref, what in zip(onnx_encoder.encode(ids, clip_skip=1, final_norm=False),
                                      encoder.encode(ids, clip_skip=1, final_norm=False),
                                      ("states", "pooled")):
                assert_close_rel(got, ref, REL_TOL, f"{family} {name} encode {what}")
            assert_close_rel(onnx_encoder(ids), encoder(ids), REL_TOL, f"{family} {name} final")
        with pytest.raises(SdrtError, match="final layer's states only"):
            onnx_encoder(ids, clip_skip=1)


def test_sdxl_check_onnx_passes(sdxl_exported):
    family, folder, out, manifest, ours = sdxl_exported
    rows = check_onnx(out, folder)
    expected = {(f"{m}.{o}" if len(v["outputs"]) > 1 else m, k)
                for m, v in manifest["models"].items() for o in v["outputs"]
                for k in ("random", "generation")}
    assert {(r.model, r.inputs) for r in rows} == expected, family
    for r in rows:
        assert r.passed and r.rel <= REL_TOL, \
            f"{family} check-onnx: {r.model} on {r.inputs} inputs: relative error {r.rel:.3e}, " \
            f"max abs {r.max_abs:.3e}"


def test_sdxl_image_matches_the_torch_runtime(sdxl_exported):
    # The base (static) text-to-image, without and with a negative prompt (zeros for an absent
    # one); the refiner (dynamic) image-to-image (the VAE encoder, the aesthetic scores) for
    # two images at a size it was not traced at.
    family, folder, out, manifest, ours = sdxl_exported
    onnx_pipe = Pipeline(onnx_components(out, folder, "cpu"), torch.device("cpu"),
                         torch.float32)
    assert onnx_pipe.force_zeros_for_empty_prompt == ours.force_zeros_for_empty_prompt
    kw = dict(num_inference_steps=4, guidance_scale=6.0, output_type="np")
    if family == "sdxl":
        cases = [(["a red fox"], dict(seed=3, height=SDXL_H, width=SDXL_W)),
                 (["a red fox"], dict(seed=4, negative_prompt="blurry", height=SDXL_H,
                                      width=SDXL_W))]
    else:
        h, w = SDXL_W, SDXL_H - 8
        init = np.random.default_rng(3).random((h, w, 3), dtype=np.float32)
        cases = [(["a red fox", "a lighthouse at dusk"],
                  dict(image=init, strength=0.75, seed=7, negative_prompt="blurry",
                       aesthetic_score=7.0, height=h, width=w))]
    for prompts, case in cases:
        expected = ours(prompts, **kw, **case)
        assert expected.std() > 0.01, f"{family}: the reference image is flat"
        got = onnx_pipe(prompts, **kw, **case)
        assert_close_abs(got, expected, IMAGE_ATOL,
                         f"{family} ONNX-run image vs torch-run image, {sorted(case)}")


def test_sdxl_cli_generate_with_onnx_runtime(sdxl_exported, tmp_path):
    from PIL import Image
    family, folder, out, _, _ = sdxl_exported
    if family != "sdxl":
        pytest.skip("the refiner's image-to-image is compared above; one CLI run is enough")
    images = {}
    for runtime in ("torch", "onnx"):
        png = str(tmp_path / f"{runtime}.png")
        extra = ["--onnx-dir", out] if runtime == "onnx" else []
        rc = main(["generate", "a red fox", "--model", folder, "--runtime", runtime, *extra,
                   "--steps", "3", "--seed", "5", "--height", str(SDXL_H), "--width",
                   str(SDXL_W), "--device", "cpu", "-o", png])
        assert rc == 0, f"{family}: generate --runtime {runtime} exited {rc}"
        images[runtime] = np.asarray(Image.open(png), dtype=np.int16)
    diff = np.abs(images["onnx"] - images["torch"]).max()
    assert diff <= 1, f"{family}: PNGs differ by up to {diff} levels between runtimes"


def test_sdxl_optimize_ort_for_the_cpu_passes_check_onnx(sdxl_exported, tmp_path):
    # ORT's optimizer on both text encoders (CLIP and bigG with its projection), SDXL's UNet
    # (text_embeds, time ids) and the VAE, for the CPU provider, then check_onnx against sdrt
    # inside optimize_folder (it raises past tolerance) and here.
    import shutil

    from sdrt.export import onnx_optimize
    from sdrt.export.onnx_manifest import read_manifest
    family, folder, out, _, _ = sdxl_exported
    copy = str(tmp_path / "export")
    shutil.copytree(out, copy)
    manifest = onnx_optimize.optimize_folder(copy, read_manifest(copy), "cpu", fp16=False)
    assert manifest["optimized"]["checked"] is True, family
    unet = manifest["optimized"]["fused"]["unet"]
    assert unet["Attention"] + unet["MultiHeadAttention"] > 0, (family, unet)
    for r in check_onnx(copy, folder):
        assert r.passed and r.rel <= REL_TOL, \
            f"{family} optimized: {r.model} on {r.inputs} inputs: relative error {r.rel:.3e}"


def test_sdxl_fp16_export_within_fp16_tolerance(tmp_path):
    # The base in float16 (CLI --fp16): float16 inputs and outputs but the ids and timestep,
    # compared with sdrt in float32 at check_onnx's fp16 tolerance.
    from sdrt.engine.tiny import write_model
    from sdrt.export.onnx_check import TOLERANCES
    folder, out = str(tmp_path / "model"), str(tmp_path / "fp16")
    write_model(folder, tiny_sdxl_config("sdxl"))
    assert main(["export", "onnx", "--model", folder, "--out", out, "--height", str(SDXL_H),
                 "--width", str(SDXL_W), "--fp16"]) == 0
    from sdrt.export.onnx_manifest import read_manifest
    manifest = read_manifest(out)
    assert manifest["dtype"] == "fp16"
    unet_inputs = manifest["models"]["unet"]["inputs"]
    assert {k: v["dtype"] for k, v in unet_inputs.items()} == {
        "sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
        "text_embeds": "float16", "time_ids": "float16"}, unet_inputs
    rows = check_onnx(out, folder)
    assert rows
    for r in rows:
        assert r.passed and r.tol == TOLERANCES["fp16"], \
            f"sdxl fp16: {r.model} on {r.inputs} inputs: relative error {r.rel:.3e} > {r.tol:.0e}"
