"""LoRAs merged into an ONNX export (``sdrt export onnx --lora PATH:SCALE``) and
textual-inversion embeddings added to it (``--embedding PATH``), tiny SD 1.x model exported
static (one export holds both), in onnxruntime on the CPU:

- the exported text encoder and UNet against diffusers' with the same kohya file loaded and
  fused at the same scale (``load_lora_weights`` + ``fuse_lora``), read as a real client
  reads the files;
- the exported tokenizer folder read by transformers' ``CLIPTokenizer``, a prompt with the
  embedding's token converted by diffusers' ``maybe_convert_prompt``, and the exported text
  encoder's states for it against diffusers' with the same embedding loaded
  (``load_textual_inversion``);
- check-onnx (which merges the manifest's LoRAs into its reference and adds its embeddings)
  and ``--runtime onnx`` against ``--runtime torch --lora --embedding``, PNG for PNG, with
  the source's tokenizers and with the export's own;
- the refusals: a missing or bad LoRA or embedding at export, ``--lora`` and ``--embedding``
  with ``--runtime onnx``.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_close_rel
from sdrt.engine.cli import main
from sdrt.export import check_onnx
from test_lora import diffusers_pipe, make_inputs, random_lora, sdrt_models, write_kohya

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4  # float32 ONNX vs float32 diffusers: reordered float32 sums
H, W, SCALE = 16, 24, 0.8
TOKEN = "sdrtstyle"


@pytest.fixture(scope="module")
def exported(tiny_sd1, tmp_path_factory):
    """(model folder, export folder, the LoRA file, the embedding file)."""
    folder, _ = tiny_sd1
    root = tmp_path_factory.mktemp("onnx-lora")
    # One alpha for every layer: diffusers applies a kohya file's alphas right only then
    # (tests/test_lora.py checks per-layer alphas against sdrt).
    lora = write_kohya(random_lora(sdrt_models(folder), seed=21, alpha=3.0),
                       root / "style.safetensors")
    # A three-vector A1111 embedding, its token the file's stem
    embedding = str(root / f"{TOKEN}.safetensors")
    save_file({"emb_params": -0.3 + 0.8 * torch.randn(3, 32, generator=torch.Generator()
                                                      .manual_seed(23))}, embedding)
    out = str(root / "export")
    assert main(["export", "onnx", "--model", folder, "--out", out, "--height", str(H),
                 "--width", str(W), "--lora", f"{lora}:{SCALE}", "--embedding", embedding]) == 0
    return folder, out, lora, embedding


def test_the_files_match_diffusers_with_the_lora_fused(exported):
    folder, out, lora, embedding = exported
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


def test_the_exported_tokenizer_and_text_encoder_match_diffusers_with_the_embedding(exported):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer
    folder, out, lora, embedding = exported
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    prompt = TextualInversionLoaderMixin().maybe_convert_prompt(f"a {TOKEN} fox", tokenizer)
    assert prompt == f"a {TOKEN} {TOKEN}_1 {TOKEN}_2 fox"
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids
    vocab = 49408  # CLIP's: the embedding's rows follow it
    assert ids[0, :6].tolist() == [49406, 320, vocab, vocab + 1, vocab + 2, 3240]  # "fox"
    ref = diffusers_pipe(folder)
    ref.load_lora_weights(lora, adapter_name="style")
    ref.fuse_lora(lora_scale=SCALE)
    ref.load_textual_inversion(embedding, token=TOKEN)
    with torch.no_grad():
        states = ref.encode_prompt(f"a {TOKEN} fox", "cpu", 1, False)[0]
    text = ort.InferenceSession(os.path.join(out, "text_encoder", "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (got,) = text.run(["last_hidden_state"], {"input_ids": ids.astype(np.int64)})
    assert_close_rel(got, states, REL_TOL, "text encoder with the embedding")
    with open(os.path.join(out, "text_encoder", "config.json")) as fh:
        assert json.load(fh)["vocab_size"] == vocab + 3


def test_check_onnx_merges_the_manifests_loras(exported, tmp_path):
    import shutil
    folder, out, lora, embedding = exported
    with open(os.path.join(out, "sdrt_export.json")) as fh:
        manifest = json.load(fh)
    assert manifest["loras"] == [{"name": "style", "source": lora, "scale": SCALE}]
    assert manifest["embeddings"] == [{"token": TOKEN, "vectors": 3, "source": embedding}]
    rows = check_onnx(out, folder)
    for r in rows:
        assert r.passed and r.rel <= REL_TOL, f"check-onnx: {r.model} on {r.inputs}: {r.rel:.2e}"
    # Without the LoRA file the comparison cannot be made: said, not passed.
    moved = str(tmp_path / "export")
    shutil.copytree(out, moved)
    for field in ("loras", "embeddings"):
        gone = json.loads(json.dumps(manifest))
        gone[field][0]["source"] = str(tmp_path / "gone.safetensors")
        with open(os.path.join(moved, "sdrt_export.json"), "w") as fh:
            json.dump(gone, fh)
        assert main(["check-onnx", moved, "--model", folder]) == 2, field


def test_onnx_runtime_draws_what_the_torch_runtime_draws_with_the_lora(exported, tmp_path,
                                                                       capsys):
    folder, out, lora, embedding = exported
    args = ["generate", f"a {TOKEN} fox", "--steps", "3", "--seed", "5",
            "--height", str(H), "--width", str(W), "--device", "cpu"]
    images = {}
    # The ONNX runtime with the source's tokenizers (the export's tokens added to them) and
    # with the export's own (which hold them)
    for runtime, extra in (("torch", ["--model", folder, "--lora", f"{lora}:{SCALE}",
                                      "--embedding", embedding]),
                           ("onnx", ["--model", folder, "--runtime", "onnx", "--onnx-dir", out]),
                           ("onnx_own", ["--model", out, "--runtime", "onnx", "--onnx-dir", out]),
                           ("plain", ["--model", folder, "--embedding", embedding])):
        png = str(tmp_path / f"{runtime}.png")
        assert main([*args, *extra, "-o", png]) == 0
        images[runtime] = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(images["onnx"] - images["torch"]).max() <= 1
    assert np.abs(images["onnx_own"] - images["torch"]).max() <= 1
    assert np.abs(images["plain"] - images["torch"]).max() > 2, "the LoRA changed nothing"
    args += ["--model", folder]
    capsys.readouterr()
    for option, message in (("--lora", "export the model with --lora"),
                            ("--embedding", "export the model with --embedding")):
        rc = main([*args, "--runtime", "onnx", "--onnx-dir", out, option, lora,
                   "-o", str(tmp_path / "refused.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (option, err)
    assert not os.path.exists(tmp_path / "refused.png")


def test_export_refuses_a_bad_lora_or_embedding(tiny_sd1, tmp_path, capsys):
    from safetensors.torch import save_file
    folder, _ = tiny_sd1
    sdxl = str(tmp_path / "xl.safetensors")  # an SDXL LoRA: weights for a second encoder
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               torch.ones(2, 32), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
               torch.ones(37, 2)}, sdxl)
    save_file({"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 32)},
              str(tmp_path / "xlemb.safetensors"))
    for option, lora, message in (
            ("--lora", str(tmp_path / "missing.safetensors"), "does not exist"),
            ("--lora", str(tmp_path), "is a folder"), ("--lora", f"{sdxl}:0.5", "SDXL"),
            ("--embedding", str(tmp_path / "missing.safetensors"), "does not exist"),
            ("--embedding", str(tmp_path / "xlemb.safetensors"), "SDXL")):
        out = tmp_path / "out"
        rc = main(["export", "onnx", "--model", folder, "--out", str(out), option, lora])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (lora, rc, err)
        assert not out.exists()


def test_export_refuses_a_bad_lora_scale_before_exporting(tiny_sd1, tmp_path):
    # (the Python API takes one number or a (UNet, text encoders) pair, as load_lora does)
    from sdrt.engine.errors import SdrtError
    from sdrt.export import export_onnx
    folder, _ = tiny_sd1
    lora = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(1)}, str(lora))
    for scale in ("big", (0.5, float("nan")), (1, 2, 3)):
        with pytest.raises(SdrtError, match="LoRA scale must be a number from -100 to 100 or a"):
            export_onnx(folder, tmp_path / "out", loras=[(lora, scale)])
        assert not (tmp_path / "out").exists()
