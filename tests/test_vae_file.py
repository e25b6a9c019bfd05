"""A VAE of its own (A1111's "SD VAE", ComfyUI's VAELoader): ``Pipeline.load_vae`` with a file
in the original LDM layout, in diffusers' layout, a whole checkpoint's VAE and a diffusers
folder, each decoding as diffusers' AutoencoderKL with the same weights does; and the files
that do not fit, refused by name with the model's VAE left as it was."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file
from sgm_checkpoints import vae_to_ldm

from sdrt.engine import Pipeline
from sdrt.engine.errors import SdrtError

VAE = "first_stage_model."


@pytest.fixture(scope="module")
def reference(tiny_sd1_folder, tmp_path_factory):
    """diffusers' VAE of the tiny model with other (seeded, non-zero) weights, and files of
    those weights in each layout."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(tiny_sd1_folder, "vae"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 + 0.1 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("vae")
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    ldm = vae_to_ldm(sd, dict(vae.config))
    files = {
        "ldm": (root / "vae-ft.safetensors", {k[len(VAE):]: v for k, v in ldm.items()}),
        "checkpoint": (root / "whole.safetensors", {**ldm, "model.x": torch.zeros(1)}),
        "diffusers": (root / "diffusers-layout.safetensors", sd),
    }
    for path, tensors in files.values():
        save_file(tensors, str(path))
    vae.save_pretrained(root / "folder")
    paths = {name: str(path) for name, (path, _) in files.items()}
    return vae, {**paths, "folder": str(root / "folder")}


def _decode(vae, latents):
    with torch.no_grad():
        out = vae.decode(latents)
    return out.sample if hasattr(out, "sample") else out


@pytest.mark.parametrize("layout", ["ldm", "checkpoint", "diffusers", "folder"])
def test_load_vae_decodes_as_diffusers(tiny_sd1_folder, reference, layout):
    ref, paths = reference
    pipe = Pipeline.from_pretrained(tiny_sd1_folder)
    latents = -0.2 + torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    before = _decode(pipe.vae, latents)
    pipe.load_vae(paths[layout])
    ours, theirs = _decode(pipe.vae, latents), _decode(ref, latents)
    assert (ours - before).abs().max() > 1e-2, "the VAE's weights did not change"
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * max(1.0, theirs.abs().max().item()), f"max abs diff {err:.3g}"


def test_vae_files_that_do_not_fit_are_refused(tiny_sd1_folder, reference, tmp_path):
    ref, paths = reference
    pipe = Pipeline.from_pretrained(tiny_sd1_folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    before = _decode(pipe.vae, latents)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    wide = dict(sd)
    key = "decoder.conv_out.weight"
    wide[key] = torch.cat([sd[key], sd[key]], 1)  # another architecture
    save_file(wide, str(tmp_path / "wide.safetensors"))
    short = {k: v for k, v in sd.items() if not k.startswith("decoder.mid_block")}
    save_file(short, str(tmp_path / "short.safetensors"))
    save_file({"model.x": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    (tmp_path / "vae.pt").write_bytes(b"\x80\x02")
    for name, message in (("wide.safetensors", r"decoder.conv_out.weight has shape \(3, "),
                          ("short.safetensors", r"does not fit the model's VAE: \d+ weights "
                                                r"missing \(decoder.mid_block"),
                          ("unet.safetensors", "does not fit the model's VAE"),
                          ("vae.pt", "pickle checkpoints are not loaded"),
                          ("none.safetensors", "expected a .safetensors file or a diffusers "
                                               "VAE folder")):
        with pytest.raises(SdrtError, match=message):
            pipe.load_vae(str(tmp_path / name))
    assert torch.equal(_decode(pipe.vae, latents), before), "a refused file changed the VAE"


def test_cli_vae_option_and_png_info(tiny_sd1_folder, reference, tmp_path, capsys):
    # --vae FILE draws what the model with that VAE in its folder draws, and the PNG names the
    # VAE as A1111 does; --from-png warns when it is not given again.
    import shutil

    import numpy as np
    from PIL import Image
    from test_cli import _parameters, _run, _warnings

    _, paths = reference
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_sd1_folder, swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(paths["folder"], swapped / "vae")
    args = ["generate", "a red fox", "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "3", "--sampler", "euler"]
    outs = {}
    for name, extra in (("option", ["--model", tiny_sd1_folder, "--vae", paths["ldm"]]),
                        ("folder", ["--model", str(swapped)]),
                        ("own", ["--model", tiny_sd1_folder])):
        out = tmp_path / f"{name}.png"
        code, _, err = _run([*args, *extra, "-o", str(out)], capsys)
        assert code == 0, err
        with Image.open(out) as im:
            outs[name] = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(outs["option"] - outs["folder"]).max() <= 1
    assert np.abs(outs["option"] - outs["own"]).max() > 10, "--vae changed nothing"
    sha = hashlib.sha256(open(paths["ldm"], "rb").read()).hexdigest()
    assert _parameters(tmp_path / "option.png").endswith(
        f"Model: model, VAE hash: {sha[:10]}, VAE: vae-ft.safetensors")
    code, _, err = _run(["generate", "--from-png", str(tmp_path / "option.png"), "--model",
                         tiny_sd1_folder, "-o", str(tmp_path / "again.png")], capsys)
    assert code == 0 and any("was decoded with VAE vae-ft.safetensors: pass --vae" in w
                             for w in _warnings(err)), err
    code, _, err = _run([*args, "--model", tiny_sd1_folder, "--vae", str(tmp_path / "no.pt"),
                         "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--vae" in err and "does not exist" in err, err


def test_cli_workflow_vae_loader(tiny_sd1_folder, reference, tmp_path, capsys):
    # A ComfyUI workflow decoding with a VAELoader's VAE needs --vae, and then draws what the
    # options with --vae draw.
    import json

    import numpy as np
    from test_cli import _run
    from test_comfy import DEFAULT, SMALL_OPTIONS, _small, _with_vae, draw

    _, paths = reference
    (tmp_path / "wf.json").write_text(json.dumps(_with_vae(_small(DEFAULT))))
    base = ["--model", tiny_sd1_folder]
    code, _, err = _run(["generate", "--workflow", str(tmp_path / "wf.json"), *base, "-o",
                         str(tmp_path / "x.png")], capsys)
    assert code == 2 and "decodes with VAE 'vae-ft-mse.safetensors': pass --vae PATH" in err
    outs = draw({"json": ["--workflow", str(tmp_path / "wf.json")], "options": SMALL_OPTIONS},
                [*base, "--vae", paths["ldm"]], tmp_path, capsys)
    assert np.array_equal(outs["json"], outs["options"])


def test_server_sd_vae(tiny_sd1_folder, reference, tmp_path):
    # A1111's sd_vae (override_settings, or the server's option) and ComfyUI's VAELoader name
    # a --vae-dir VAE; the picture is the library's with that VAE, and the model's own
    # comes back for "Automatic"; a name --vae-dir lacks is a 400 naming the field.
    import base64
    import io
    import shutil

    import numpy as np
    from PIL import Image
    from test_comfy import DEFAULT, _with_vae
    from test_serve import config

    from sdrt.serve.local import LocalServer
    httpx = pytest.importorskip("httpx")
    _, paths = reference
    folder = tmp_path / "vaes"
    folder.mkdir()
    shutil.copy(paths["ldm"], folder / "vae-ft.safetensors")
    shutil.copytree(paths["folder"], folder / "vae-folder")
    pipe = Pipeline.from_pretrained(tiny_sd1_folder)

    def library(vae):
        if vae is not None:
            pipe.load_vae(vae)
        return np.asarray(pipe("a fox", height=32, width=32, num_inference_steps=2,
                               guidance_scale=7.0, seed=5, sampler="euler")[0]).astype(int)

    def picture(response):
        assert response.status_code == 200, response.text
        im = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        return np.asarray(im.convert("RGB")).astype(int), im.text["parameters"]

    own, swapped = library(None), library(paths["ldm"])
    body = {"prompt": "a fox", "seed": 5, "steps": 2, "width": 32, "height": 32,
            "cfg_scale": 7, "sampler_name": "Euler"}
    with LocalServer(config(model=tiny_sd1_folder, vae_dir=str(folder))) as url:
        post = lambda **kw: httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, **kw},  # noqa
                                       timeout=120)
        listed = httpx.get(f"{url}/sdapi/v1/sd-vae").json()
        assert [v["model_name"] for v in listed] == ["vae-folder", "vae-ft.safetensors"]
        got, text = picture(post(override_settings={"sd_vae": "vae-ft.safetensors"}))
        assert np.abs(got - swapped).max() <= 1
        sha = hashlib.sha256(open(paths["ldm"], "rb").read()).hexdigest()[:10]
        assert f"VAE hash: {sha}, VAE: vae-ft.safetensors" in text, text
        got, text = picture(post())
        assert np.abs(got - own).max() <= 1 and "VAE" not in text
        assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "vae-folder"}
                          ).status_code == 200
        assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_vae"] == "vae-folder"
        got, _ = picture(post())
        assert np.abs(got - swapped).max() <= 1
        got, _ = picture(post(override_settings={"sd_vae": "Automatic"}))
        assert np.abs(got - own).max() <= 1
        for r, field in ((post(override_settings={"sd_vae": "other.pt"}), "override_settings"),
                         (httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": 3}),
                          "sd_vae")):
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == field and "sd_vae must be Automatic, None or one of " \
                "--vae-dir's VAEs (vae-folder, vae-ft.safetensors)" in error["message"]
        assert httpx.get(f"{url}/models/vae").json() == ["vae-folder", "vae-ft.safetensors"]
        graph = _with_vae(DEFAULT)
        graph["4"]["inputs"]["ckpt_name"] = "model"
        graph["3"]["inputs"].update(steps=2, cfg=7, seed=5, sampler_name="euler",
                                    scheduler="karras")
        graph["5"]["inputs"].update(width=32, height=32)
        graph["30"]["inputs"]["vae_name"] = "missing.safetensors"
        r = httpx.post(f"{url}/prompt", json={"prompt": graph})
        assert r.status_code == 400 and "which --vae-dir does not have" in r.text, r.text
        graph["30"]["inputs"]["vae_name"] = "vae-ft.safetensors"
        from test_serve_comfy import _history, _queue, _view
        entry = _history(url, _queue(url, graph)["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        png = Image.open(io.BytesIO(_view(url, entry["outputs"]["9"]["images"][0])))
        assert "VAE: vae-ft.safetensors" in png.text["parameters"]
        want = np.asarray(pipe("beautiful scenery nature glass bottle",
                               negative_prompt="text, watermark", height=32, width=32,
                               num_inference_steps=2, guidance_scale=7.0, seed=5,
                               sampler="euler_karras")[0]).astype(int)
        assert np.abs(np.asarray(png.convert("RGB")).astype(int) - want).max() <= 1


def test_a_vae_run_in_another_dtype_decodes_with_the_loaded_weights(tiny_sd1_folder, reference):
    # A VAE run in another dtype than the pipeline's (vae_dtype, SDXL's float32 upcast) is a
    # copy; a load_vae after that copy was made reaches it too (the server swaps VAEs per
    # request after its first decode).
    _, paths = reference
    latents = -0.2 + torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = Pipeline.from_pretrained(tiny_sd1_folder, vae_dtype="bf16")
    own = pipe.decode_latents(latents)  # (makes the bfloat16 copy)
    weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pipe.load_vae(paths["ldm"])
    fresh = Pipeline.from_pretrained(tiny_sd1_folder, vae_dtype="bf16")
    fresh.load_vae(paths["ldm"])
    want = fresh.decode_latents(latents)
    got = pipe.decode_latents(latents)
    assert abs(want - own).max() > 1e-2
    assert abs(got - want).max() == 0
    pipe.load_vae(weights)  # (the model's own again, as the server goes back to them)
    assert abs(pipe.decode_latents(latents) - own).max() == 0
