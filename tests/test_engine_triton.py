"""The whole engine on the Triton kernels against the whole engine on the PyTorch ops.

On a CPU the kernels run under Triton's interpreter, on the tiny built-in model (small
latents keep it to seconds). The measure: in fp16, the Triton path's error against the fp32
reference must stay within twice the PyTorch fp16 path's own error (plus a small floor), so
the test cannot pass by both paths being equally wrong, nor fail on fp16 rounding alone.
"""
import numpy as np
import pytest
import torch

from sdrt.engine import Pipeline
from sdrt.engine.tiny import tiny_components

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 2e-3  # relative error fp16 rounding alone can reach on these outputs


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(module_fn, backend, monkeypatch):
    monkeypatch.setenv("SDRT_BACKEND", backend)
    with torch.no_grad():
        return module_fn().float()


def _assert_triton_as_good_as_torch(make_call, monkeypatch, what):
    ref = _run(make_call(torch.float32), "torch", monkeypatch)
    torch16 = _run(make_call(torch.float16), "torch", monkeypatch)
    triton16 = _run(make_call(torch.float16), "triton", monkeypatch)
    assert torch.isfinite(triton16).all(), f"{what}: non-finite output"
    e_torch, e_triton = _rel(torch16, ref), _rel(triton16, ref)
    assert e_triton <= 2 * e_torch + FLOOR, (f"{what}: Triton fp16 relative error {e_triton:.2e} "
                                            f"vs PyTorch fp16 {e_torch:.2e}")


@pytest.fixture(scope="module")
def tiny():
    return tiny_components()


def test_unet_on_triton_kernels(tiny, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(2, 4, 8, 8, generator=g)  # 8×8: attention at 64 and 16 tokens
    ctx = torch.randn(2, 77, 64, generator=g)        # T = 77: the cross-attention path
    t = torch.tensor(421)

    def make_call(dtype):
        unet = tiny.unet.to(DEVICE, dtype)
        return lambda: unet(x.to(DEVICE, dtype), t.to(DEVICE), ctx.to(DEVICE, dtype))
    _assert_triton_as_good_as_torch(make_call, monkeypatch, "tiny UNet")


def test_vae_decoder_on_triton_kernels(tiny, monkeypatch):
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(1))

    def make_call(dtype):
        vae = tiny.vae.to(DEVICE, dtype)
        return lambda: vae.decode(z.to(DEVICE, dtype))
    _assert_triton_as_good_as_torch(make_call, monkeypatch, "tiny VAE decoder")


def test_text_encoder_on_triton_kernels(tiny, monkeypatch):
    ids = tiny.tokenizer(["a red fox in the snow", "a lighthouse"])

    def make_call(dtype):
        text = tiny.text_encoder.to(DEVICE, dtype)
        return lambda: text(ids.to(DEVICE))
    _assert_triton_as_good_as_torch(make_call, monkeypatch, "tiny text encoder")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["sd15", "sd21"])
def test_full_size_unet_and_vae_on_triton_kernels(config, monkeypatch):
    # The real SD sizes, random weights: every kernel at every production shape.
    from sdrt.engine.configs import model_config
    from sdrt.engine.loading import build
    from sdrt.engine.tiny import _init_
    cfg = model_config(config)
    unet = _init_(build("unet", cfg["unet"], device="cpu"), 0)
    vae = _init_(build("vae", cfg["vae"], device="cpu"), 1)
    side = cfg["unet"]["sample_size"]
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(2, 4, side, side, generator=g)
    ctx = torch.randn(2, 77, cfg["unet"]["cross_attention_dim"], generator=g)

    def unet_call(dtype):
        m = unet.to("cuda", dtype)
        return lambda: m(x.to("cuda", dtype), torch.tensor(500, device="cuda"),
                         ctx.to("cuda", dtype))

    def vae_call(dtype):
        m = vae.to("cuda", dtype)
        return lambda: m.decode(x[:1].to("cuda", dtype))
    _assert_triton_as_good_as_torch(unet_call, monkeypatch, f"{config} UNet")
    _assert_triton_as_good_as_torch(vae_call, monkeypatch, f"{config} VAE decoder")


@pytest.mark.gpu
def test_images_on_triton_kernels_equal_torch_ops(tiny_sd1_folder, monkeypatch):
    folder = tiny_sd1_folder  # written by sdrt's own writer: no diffusers on the GPU machine
    images = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SDRT_BACKEND", backend)
        pipe = Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float16)
        images[backend] = pipe(["a red fox", "a boat"], negative_prompt="blur", seed=3,
                               num_inference_steps=10, output_type="np")
    assert np.abs(images["triton"] - images["torch"]).max() <= 1e-2
