"""Checkpoint layouts end to end: a single-file LDM checkpoint and fp16 variant files load to
the same model as the diffusers folder they came from."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.engine import Pipeline, SdrtError
from test_convert_ldm import to_ldm


def _image(pipe, **kw):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return pipe("a red fox", negative_prompt="blur", latents=latents, num_inference_steps=4,
                height=16, width=16, output_type="np", **kw)


def _write_ldm_file(tiny_model, folder):
    """The tiny reference model's weights as one LDM-layout .safetensors file."""
    family, _, ref = tiny_model
    cfgs = {"unet": dict(ref.unet.config), "vae": dict(ref.vae.config),
            "text_encoder": ref.text_encoder.config.to_dict()}
    ldm, _ = to_ldm(family, (ref.unet, ref.vae, ref.text_encoder), cfgs)
    path = str(folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    return path


def test_single_file_checkpoint_loads_to_the_same_outputs(tiny_model, tmp_path):
    family, folder, _ = tiny_model
    path = _write_ldm_file(tiny_model, tmp_path)

    from_folder = Pipeline.from_pretrained(folder, device="cpu")
    from_file = Pipeline.from_pretrained(path, device="cpu", config=folder)
    for name in ("unet", "vae", "text_encoder"):
        a = dict(getattr(from_folder, name).named_parameters())
        b = dict(getattr(from_file, name).named_parameters())
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{family} {name}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert np.array_equal(_image(from_folder), _image(from_file))


def test_single_file_without_config_uses_the_real_sd_config(tiny_model, tmp_path):
    # Tiny weights do not fit the real SD 1.5 / 2.1 config: the error names key and both shapes.
    path = _write_ldm_file(tiny_model, tmp_path)
    with pytest.raises(SdrtError, match="has no place in|has shape .* the config expects"):
        Pipeline.from_pretrained(path, device="cpu")


def test_fp16_variant_files(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    folder, _ = tiny_sd1
    half = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16,
                                                   safety_checker=None)
    variant_dir = str(tmp_path / "fp16")
    half.save_pretrained(variant_dir, variant="fp16")
    full = Pipeline.from_pretrained(folder, device="cpu")
    ours = Pipeline.from_pretrained(variant_dir, device="cpu", dtype=torch.float32, variant="fp16")
    # The fp16 file's values, widened: exactly the fp32 weights rounded to fp16.
    for name, p in full.unet.named_parameters():
        q = dict(ours.unet.named_parameters())[name]
        assert q.dtype == torch.float32 and torch.equal(q, p.half().float()), name
    assert np.abs(_image(full) - _image(ours)).max() < 2e-2


def test_pickle_checkpoints_are_refused(tmp_path):
    for name in ("model.ckpt", "model.bin"):
        (tmp_path / name).write_bytes(b"\x80\x04pickle")
        with pytest.raises(SdrtError, match="convert it to .safetensors"):
            Pipeline.from_pretrained(str(tmp_path / name), device="cpu")


def test_sharded_weights(tiny_sd1, tmp_path):
    # diffusers' own sharding: *.safetensors.index.json naming several shard files.
    from diffusers import UNet2DConditionModel
    folder, _ = tiny_sd1
    sharded = tmp_path / "sharded"
    import shutil
    shutil.copytree(folder, sharded)
    shutil.rmtree(sharded / "unet")
    UNet2DConditionModel.from_pretrained(f"{folder}/unet").save_pretrained(
        sharded / "unet", max_shard_size="200KB")
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1, "no shards were written"
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    whole = Pipeline.from_pretrained(folder, device="cpu")
    parts = Pipeline.from_pretrained(str(sharded), device="cpu")
    for name, p in whole.unet.named_parameters():
        assert torch.equal(p, dict(parts.unet.named_parameters())[name]), name
