"""LoRAs merged into an ONNX export (``sdrt export onnx --lora PATH:SCALE``), tiny SD 1.x model
exported static, in onnxruntime on the CPU:

- the exported text encoder and UNet against diffusers' with the same kohya file loaded and
  fused at the same scale (``load_lora_weights`` + ``fuse_lora``), read as a real client
  reads the files;
- check-onnx (which merges the manifest's LoRAs into its reference) and ``--runtime onnx``
  against ``--runtime torch --lora``, PNG for PNG;
- the refusals: a missing or bad LoRA at export, ``--lora`` with ``--runtime onnx``.
"""
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import assert_close_rel
from sdrt.engine.cli import main
from sdrt.export import check_onnx
from test_lora import diffusers_pipe, make_inputs, random_lora, sdrt_models, write_kohya

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4  # float32 ONNX vs float32 diffusers: reordered float32 sums
H, W, SCALE = 16, 24, 0.8


@pytest.fixture(scope="module")
def exported(tiny_sd1, tmp_path_factory):
    """(model folder, export folder, the LoRA file)."""
    folder, _ = tiny_sd1
    root = tmp_path_factory.mktemp("onnx-lora")
    # One alpha for every layer: diffusers applies a kohya file's alphas right only then
    # (tests/test_lora.py checks per-layer alphas against sdrt).
    lora = write_kohya(random_lora(sdrt_models(folder), seed=21, alpha=3.0),
                       root / "style.safetensors")
    out = str(root / "export")
    assert main(["export", "onnx", "--model", folder, "--out", out, "--height", str(H),
                 "--width", str(W), "--lora", f"{lora}:{SCALE}"]) == 0
    return folder, out, lora


def test_the_files_match_diffusers_with_the_lora_fused(exported):
    folder, out, lora = exported
    x = make_inputs(sdrt_models(folder))
    x["sample"] = -0.3 + torch.randn(2, 4, H // 2, W // 2,  # the static export's size
                                     generator=torch.Generator().manual_seed(22))
    ref = diffusers_pipe(folder)
    with torch.no_grad():
        plain = ref.unet(x["sample"], x["timestep"], x["context"]).sample
        ref.load_lora_weights(lora, adapter_name="style")
        ref.fuse_lora(lora_scale=SCALE)
        states = ref.text_encoder(x["ids"])[0]
        noise = ref.unet(x["sample"], x["timestep"], x["context"]).sample
    text = ort.InferenceSession(os.path.join(out, "text_encoder", "model.onnx"),
                                providers=["CPUExecutionProvider"])
    got_states = np.concatenate([text.run(["last_hidden_state"], {"input_ids": ids[None].numpy()})
                                 [0] for ids in x["ids"]])  # the export's batch is 1
    unet = ort.InferenceSession(os.path.join(out, "unet", "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (got_noise,) = unet.run(None, {"sample": x["sample"].numpy(),
                                   "timestep": np.array(417.0, dtype=np.float32),
                                   "encoder_hidden_states": x["context"].numpy()})
    assert_close_rel(got_states, states, REL_TOL, "text encoder with the LoRA")
    assert_close_rel(got_noise, noise, REL_TOL, "UNet with the LoRA")
    assert (noise - plain).abs().max() > 1e-2, "the LoRA changes nothing"


def test_check_onnx_merges_the_manifests_loras(exported, tmp_path):
    import json
    import shutil
    folder, out, lora = exported
    with open(os.path.join(out, "sdrt_export.json")) as fh:
        manifest = json.load(fh)
    assert manifest["loras"] == [{"name": "style", "source": lora, "scale": SCALE}]
    rows = check_onnx(out, folder)
    for r in rows:
        assert r.passed and r.rel <= REL_TOL, f"check-onnx: {r.model} on {r.inputs}: {r.rel:.2e}"
    # Without the LoRA file the comparison cannot be made: said, not passed.
    moved = str(tmp_path / "export")
    shutil.copytree(out, moved)
    manifest["loras"][0]["source"] = str(tmp_path / "gone.safetensors")
    with open(os.path.join(moved, "sdrt_export.json"), "w") as fh:
        json.dump(manifest, fh)
    assert main(["check-onnx", moved, "--model", folder]) == 2


def test_onnx_runtime_draws_what_the_torch_runtime_draws_with_the_lora(exported, tmp_path,
                                                                       capsys):
    folder, out, lora = exported
    args = ["generate", "a red fox", "--model", folder, "--steps", "3", "--seed", "5",
            "--height", str(H), "--width", str(W), "--device", "cpu"]
    images = {}
    for runtime, extra in (("torch", ["--lora", f"{lora}:{SCALE}"]),
                           ("onnx", ["--runtime", "onnx", "--onnx-dir", out]), ("plain", [])):
        png = str(tmp_path / f"{runtime}.png")
        assert main([*args, *extra, "-o", png]) == 0
        images[runtime] = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(images["onnx"] - images["torch"]).max() <= 1
    assert np.abs(images["plain"] - images["torch"]).max() > 2, "the LoRA changed nothing"
    capsys.readouterr()
    for option, message in (("--lora", "export the model with --lora"),
                            ("--embedding", "it is not in the export")):
        rc = main([*args, "--runtime", "onnx", "--onnx-dir", out, option, lora,
                   "-o", str(tmp_path / "refused.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (option, err)
    assert not os.path.exists(tmp_path / "refused.png")


def test_export_refuses_a_bad_lora(tiny_sd1, tmp_path, capsys):
    from safetensors.torch import save_file
    folder, _ = tiny_sd1
    sdxl = str(tmp_path / "xl.safetensors")  # an SDXL LoRA: weights for a second encoder
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               torch.ones(2, 32), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
               torch.ones(37, 2)}, sdxl)
    for lora, message in ((str(tmp_path / "missing.safetensors"), "does not exist"),
                          (str(tmp_path), "is a folder"), (f"{sdxl}:0.5", "SDXL")):
        out = tmp_path / "out"
        rc = main(["export", "onnx", "--model", folder, "--out", str(out), "--lora", lora])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (lora, rc, err)
        assert not out.exists()
