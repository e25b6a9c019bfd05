"""sdrt against diffusers, end to end, on the same random-weight model and the same latents.

For each model (SD 1.5 at 512², SD 2.1 at 768², SD-Turbo-style 1 step without CFG, SDXL base
at 1024² with CFG, SDXL-Turbo at 512² with 4 and 1 steps without CFG, SD 1.5 inpainting at
512²: an image and a mask, strength 1, diffusers' StableDiffusionInpaintPipeline against
sdrt's inpainting plan) a random-weight model
with the real config is written once, in diffusers format, to a cache
folder by sdrt's own writer (``engine.tiny.write_model``; diffusers loads the same folder, and
the sdrt systems run without diffusers installed); then each system runs in a fresh process
(so cold start and peak memory are its own):

- ``diffusers``: StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline), eager, SDPA
  attention;
- ``diffusers-compile``: the same with ``torch.compile`` on the UNet and VAE decoder,
  channels_last (compile time reported);
- ``sdrt-torch``: sdrt's static runtime (CUDA graphs) over the plain-PyTorch ops;
- ``sdrt-triton``: the same over sdrt's Triton kernels;
- ``sdrt-triton-bf16vae``: the same with the VAE in bf16 (``vae_dtype="bf16"``) where the
  others decode as diffusers does (SDXL's ``force_upcast`` VAE in float32): what the float32
  decode costs, and how far bf16's picture is from diffusers'.

Measured per system: UNet iterations per second (from the difference of the 50- and 20-step
latencies, which cancels text encoding and decoding), end-to-end latency at each step count
(median of CUDA-synchronised repeats), time to first image from process start (weights load,
compile or capture included), peak GPU memory, and the max abs difference of the image from
diffusers' on the same latents. Writes JSON + markdown (with an ablation table) and a bar chart
PNG, named after the GPU, under ``--out-dir`` (default benchmarks/results/). Each system's
result and image go to ``<out-dir>/bench_pipeline_parts_<gpu>/`` as soon as that system ends,
and the report, over every result in that folder, is rewritten after every system: a run
stopped part-way keeps what finished, and a later run into the same folder adds to it.

``--dry-run`` runs the same orchestration on the CPU with a tiny model of the same architecture
(64×64, 2 and 1 steps, fp32, host-clock timing): ``tiny`` (SD 1.x) by default, and in place of a
real model its stand-in of the same family and mode (``--models sdxl`` runs ``tiny-sdxl``,
``sdxl-turbo`` runs ``tiny-sdxl-turbo``, ``sd21`` runs ``tiny-sd2``), by default for
``sdrt-torch`` alone (under Triton's interpreter, ``sdrt-triton`` took minutes for one tiny
image on a development CPU; ``--systems diffusers,sdrt-torch`` also runs the diffusers side);
its numbers are labelled "dry run, not a measurement".

    python -m sdrt.benchmarks.bench_pipeline [--models sd15] [--systems ...] [--repeats N]
    sdrt bench --models sdxl,sdxl-turbo          # the same, from the CLI
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYSTEMS = ("diffusers", "diffusers-compile", "sdrt-torch", "sdrt-triton", "sdrt-triton-bf16vae")
MODELS = {
    # name: (config: engine.configs.MODELS name or a tiny one, image side, step counts,
    #        guidance scale)
    "sd15": ("sd15", 512, (50, 20), 7.5),
    "sd21": ("sd21", 768, (50, 20), 7.5),
    "sd-turbo": ("sd-turbo", 512, (1,), 0.0),
    # SDXL base at 1024² (128² latents, guidance 5 as diffusers' examples); SDXL-Turbo at 512²,
    # 4 and 1 steps without guidance (its Euler ancestral sampler, from its scheduler config).
    "sdxl": ("sdxl", 1024, (50, 20), 5.0),
    "sdxl-turbo": ("sdxl-turbo", 512, (4, 1), 0.0),
    # SD 1.5 inpainting at 512² (diffusers' StableDiffusionInpaintPipeline on the same
    # random-weight SD 1.5 UNet, which keeps the unmasked latents after every step): a
    # centred mask, strength 1, so every step runs on both sides.
    "sd15-inpaint": ("sd15", 512, (50, 20), 7.5),
    # SD 1.5 512² with one random-weight ControlNet of SD 1.5's architecture (its hint
    # encoder's real widths) on a seeded control image: diffusers' ControlNet pipeline
    # against sdrt's plan with the ControlNet inside the captured loop.
    "sd15-controlnet": ("sd15", 512, (50, 20), 7.5),
    # SD 1.5 512² with a random-weight plain IP-Adapter and a random-weight OpenCLIP ViT-H/14
    # image encoder (h94's sizes) on a seeded reference image: diffusers' load_ip_adapter
    # against sdrt's plan with the image tokens in its captured loop.
    "sd15-ip-adapter": ("sd15", 512, (50, 20), 7.5),
    # Tiny models with the real architectures, for dry runs on the CPU: SD 1.x and 2.x
    # (engine.tiny), SDXL (``tiny_sdxl_config``), and the Turbo ones with their schedulers.
    "tiny": ("tiny", 64, (2, 1), 7.5),
    "tiny-sd2": ("tiny-sd2", 64, (2, 1), 7.5),
    "tiny-sd-turbo": ("tiny-sd-turbo", 64, (2, 1), 0.0),
    "tiny-sdxl": ("tiny-sdxl", 64, (2, 1), 5.0),
    "tiny-sdxl-turbo": ("tiny-sdxl-turbo", 64, (2, 1), 0.0),
    "tiny-inpaint": ("tiny", 64, (2, 1), 7.5),
    "tiny-controlnet": ("tiny", 64, (2, 1), 7.5),
    "tiny-ip-adapter": ("tiny", 64, (2, 1), 7.5),
}
INPAINT_MODELS = ("sd15-inpaint", "tiny-inpaint")
CONTROLNET_MODELS = ("sd15-controlnet", "tiny-controlnet")
IP_ADAPTER_MODELS = ("sd15-ip-adapter", "tiny-ip-adapter")
# The image encoders the IP-Adapter benchmark writes: OpenCLIP ViT-H/14 (h94's
# models/image_encoder) and a tiny one of the same kind, as transformers' config.json has them.
IP_ENCODERS = {
    "real": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                 hidden_act="gelu"),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=1, image_size=28, patch_size=14, projection_dim=32,
                 hidden_act="gelu"),
}
# What a dry run runs in place of each real model: the tiny model of its family and mode.
DRY_RUN_STANDINS = {"sd15": "tiny", "sd21": "tiny-sd2", "sd-turbo": "tiny-sd-turbo",
                    "sdxl": "tiny-sdxl", "sdxl-turbo": "tiny-sdxl-turbo",
                    "sd15-inpaint": "tiny-inpaint", "sd15-controlnet": "tiny-controlnet",
                    "sd15-ip-adapter": "tiny-ip-adapter"}
DRY_RUN_MODELS = ("tiny", "tiny-sd2", "tiny-sd-turbo", "tiny-sdxl", "tiny-sdxl-turbo")
PARTS = "bench_pipeline_parts"  # + _<gpu>: per-system results and images, as each ends
PROMPT = "a photograph of a red fox in the snow, highly detailed"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt-bench"


# -- the random-weight models -----------------------------------------------------------------

def tiny_sdxl_config() -> dict:
    """SDXL base's architecture at toy widths: both text encoders (CLIP ViT-L-like, and
    OpenCLIP bigG-like with its projection), the "text_time" added embedding of the pooled
    text and six time ids, per-level transformer depths, the 4-level VAE with
    ``force_upcast``, Euler on leading timesteps. A fresh copy."""
    from sdrt.engine.configs import model_config
    cfg = model_config("sdxl")
    text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_hidden_layers=2)
    cfg["text_encoder"].update(text, projection_dim=64)
    cfg["text_encoder_2"].update(text, projection_dim=64)
    cfg["unet"].update(block_out_channels=[32, 64], attention_head_dim=[2, 4],
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                       transformer_layers_per_block=[1, 2], cross_attention_dim=128,
                       addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=64 + 6 * 8, sample_size=8)
    cfg["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
    return cfg


def model_family(name: str) -> str:
    """The family (``engine.families``) of a benchmark model: "sd1", "sd2", "sdxl"."""
    from sdrt.engine.tiny import config_family
    return config_family(_config(name)).name


def _tiny_configs() -> dict:
    """{tiny model: its config}, fresh copies: the Turbo ones are their family's tiny model
    with the real Turbo scheduler (SD-Turbo: Euler; SDXL-Turbo: Euler ancestral; trailing)."""
    from sdrt.engine.configs import model_config
    from sdrt.engine.tiny import tiny_config
    return {"tiny": tiny_config("sd1"), "tiny-sd2": tiny_config("sd2"),
            "tiny-sd-turbo": {**tiny_config("sd2"),
                              "scheduler": model_config("sd-turbo")["scheduler"]},
            "tiny-sdxl": tiny_sdxl_config(),
            "tiny-sdxl-turbo": {**tiny_sdxl_config(),
                                "scheduler": model_config("sdxl-turbo")["scheduler"]}}


def _config(name: str) -> dict:
    """The config of a benchmark model: the real one (``engine.configs``) or a tiny one."""
    from sdrt.engine.configs import model_config
    config_name = MODELS[name][0]
    if config_name in DRY_RUN_MODELS:
        return _tiny_configs()[config_name]
    return model_config(config_name)


def _written_once(target: Path, marker: str, name: str, write) -> Path:
    """``target``, unless it holds ``marker`` already written by ``write(folder)`` into a
    temporary folder beside it and renamed, so a run stopped half-way leaves nothing half
    written there."""
    if (target / marker).is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        write(tmp / "out")
        (tmp / "out").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _weights(name: str, device: str) -> dict:
    """How a model's random weights are written: fp16 drawn on ``device`` (the GPU) for the
    real models, fp32 on the CPU for the tiny ones."""
    import torch
    tiny = MODELS[name][0] in DRY_RUN_MODELS
    return dict(dtype=None if tiny else torch.float16, device="cpu" if tiny else device)


def write_model(cache: Path, name: str, device: str = "cuda") -> Path:
    """The model's diffusers folder, written once by sdrt's own writer with random weights and
    the real config (fp16; fp32 for the tiny model); speed does not depend on the weights'
    values. The real models' weights are drawn on ``device`` (the GPU), not on the CPU."""
    from sdrt.engine.tiny import write_model as write_folder
    # One folder per config: sd15-inpaint uses sd15's.
    return _written_once(cache / MODELS[name][0], "model_index.json", name,
                         lambda out: write_folder(out, _config(name), **_weights(name, device)))


def controlnet_folder(folder: Path) -> Path:
    """Where the ControlNet of the model in ``folder`` is (``write_controlnet``)."""
    return folder.parent / f"{folder.name}-controlnet"


def write_controlnet(folder: Path, name: str, device: str = "cuda") -> Path:
    """The model's random-weight ControlNet, beside its folder, written once."""
    from sdrt.engine.tiny import controlnet_config
    from sdrt.engine.tiny import write_controlnet as write_net
    cfg = _config(name)
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    return _written_once(controlnet_folder(folder), "config.json", name, lambda out: write_net(
        out, controlnet_config(cfg["unet"], factor), seed=1, **_weights(name, device)))


def ip_adapter_folder(folder: Path) -> Path:
    """Where the IP-Adapter of the model in ``folder`` is (``write_ip_adapter``): h94's layout,
    ``ip-adapter.safetensors`` beside ``image_encoder/``."""
    return folder.parent / f"{folder.name}-ip-adapter"


def write_ip_adapter(folder: Path, name: str, device: str = "cuda") -> Path:
    """The model's random-weight plain IP-Adapter and its image encoder, written once: every
    weight drawn from N(0, 0.02²), LayerNorms at 1 and 0."""
    import torch
    from safetensors.torch import save_file

    from sdrt.engine.clip_vision import CLIPVisionModelWithProjection, VisionConfig
    from sdrt.engine.ip_adapter import cross_attentions
    from sdrt.engine.unet import UNet2DConditionModel, UNetConfig
    w = _weights(name, device)
    dtype, dev = w["dtype"] or torch.float32, w["device"]
    encoder = IP_ENCODERS["tiny" if MODELS[name][0] in DRY_RUN_MODELS else "real"]
    unet_cfg = UNetConfig.from_dict(_config(name)["unet"])

    def draw(module):
        g = torch.Generator(dev).manual_seed(2)
        norms = {f"{m}.{p}" if m else p for m, mod in module.named_modules()
                 if isinstance(mod, torch.nn.LayerNorm) for p in ("weight", "bias")}
        return {k: (torch.ones if k.endswith("weight") else torch.zeros)(
                    p.shape, dtype=dtype, device=dev) if k in norms else
                (torch.randn(p.shape, generator=g, device=dev) * 0.02).to(dtype)
                for k, p in module.named_parameters()}

    def write(out):
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(VisionConfig.from_dict(encoder))
            unet = UNet2DConditionModel(unet_cfg)
        (out / "image_encoder").mkdir(parents=True)
        save_file(draw(model), str(out / "image_encoder" / "model.safetensors"))
        (out / "image_encoder" / "config.json").write_text(json.dumps(
            {"architectures": ["CLIPVisionModelWithProjection"],
             "model_type": "clip_vision_model", **encoder}, indent=1))
        cross = unet_cfg.cross_attention_dim
        adapter = torch.nn.Module()
        adapter.image_proj = torch.nn.Module()
        adapter.image_proj.proj = torch.nn.Linear(encoder["projection_dim"], 4 * cross,
                                                  device="meta")
        adapter.image_proj.norm = torch.nn.LayerNorm(cross, device="meta")
        adapter.ip_adapter = torch.nn.ModuleDict()
        for i, attn in enumerate(cross_attentions(unet)):
            layer = adapter.ip_adapter[str(2 * i + 1)] = torch.nn.Module()
            width = attn.to_q.out_features
            layer.to_k_ip = torch.nn.Linear(cross, width, bias=False, device="meta")
            layer.to_v_ip = torch.nn.Linear(cross, width, bias=False, device="meta")
        save_file(draw(adapter), str(out / "ip-adapter.safetensors"))
    return _written_once(ip_adapter_folder(folder), "ip-adapter.safetensors", name, write)


def reference_image(side):
    """The IP-Adapter benchmark's reference image: seeded noise with a coloured block."""
    from PIL import Image
    a = np.random.default_rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8)
    a[: side // 2, : side // 3] = (250, 40, 10)
    return Image.fromarray(a)


# -- one system, in its own process -------------------------------------------------------------

def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


# The diffusers pipeline of each family, and what its from_pretrained is given (SD 1.x/2.x:
# no safety checker, which the folder does not have; SDXL has none).
DIFFUSERS_PIPELINES = {"sd1": ("StableDiffusionPipeline", {"safety_checker": None}),
                       "sd2": ("StableDiffusionPipeline", {"safety_checker": None}),
                       "sdxl": ("StableDiffusionXLPipeline", {})}
DIFFUSERS_INPAINT = "StableDiffusionInpaintPipeline"


def control_image(side):
    """The ControlNet benchmark's control image: seeded noise with a bright band (edges)."""
    from PIL import Image
    a = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    a[side // 3:side // 2] = 255
    return Image.fromarray(a)


def inpaint_inputs(side):
    """The inpainting benchmark's init image (seeded noise) and mask (its centre half)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[side // 4:3 * side // 4, side // 4:3 * side // 4] = 255
    return image, Image.fromarray(mask)


def _load(system, family, folder, side, steps, guidance, compile_mode, device, dtype,
          inpaint=False, controlnet=None, ip_adapter=None):
    """The system's pipeline as ``run(steps, latents, output_type) -> images`` and the seconds
    spent compiling or capturing (None where nothing is). With ``inpaint``, both sides inpaint
    ``inpaint_inputs`` at strength 1 (the init image and the masked one encoded, then the
    latents as the noise).

    Both sides get the same latents and the same seed for a sampler's own noise (SDXL-Turbo's
    Euler ancestral): diffusers a CPU generator seeded 0, sdrt ``seed=0``, which draws as
    that generator does. ``controlnet`` (a ControlNet folder): both sides run it on
    ``control_image`` at scale 1 (sdrt's inside its static plan); ``ip_adapter`` (an
    IP-Adapter folder): both sides prompt with ``reference_image`` at scale 1 (sdrt's tokens
    in its plan's buffers). An SDXL pipeline takes its defaults for the second prompt (the
    first), the micro-conditioning (original and target size = the image's, no crop) and the
    empty negative prompt (zeros, ``force_zeros_for_empty_prompt``) on both sides."""
    import torch
    image = dict(zip(("image", "mask_image"), inpaint_inputs(side)), strength=1.0) \
        if inpaint else {}
    if system.startswith("diffusers"):
        import diffusers
        name, extra = DIFFUSERS_PIPELINES[family]
        pipe = getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype,
                                                        **extra).to(device)
        if inpaint:  # the same components (from_pretrained wants diffusers' own version tag)
            pipe = getattr(diffusers, DIFFUSERS_INPAINT)(**pipe.components)
        if controlnet is not None:
            net = diffusers.ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)
            pipe = diffusers.StableDiffusionControlNetPipeline(**pipe.components,
                                                               controlnet=net.to(device))
            image = {"image": control_image(side)}
        if ip_adapter is not None:
            pipe.load_ip_adapter(str(ip_adapter), subfolder="",
                                 weight_name="ip-adapter.safetensors",
                                 image_encoder_folder="image_encoder")
            image = {"ip_adapter_image": reference_image(side)}
        pipe.set_progress_bar_config(disable=True)
        build = None
        if system == "diffusers-compile":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)

        def run(n, latents, output_type="np"):
            out = pipe(PROMPT, height=side, width=side, num_inference_steps=n,
                       guidance_scale=guidance, latents=latents, output_type=output_type,
                       generator=torch.Generator().manual_seed(0), **image)
            return out.images
        if system == "diffusers-compile":
            t0 = time.perf_counter()
            for n in steps:  # compile (and autotune) before anything is timed
                run(n, None)
            _sync(device)
            build = time.perf_counter() - t0
        return run, build

    # On the CPU (dry runs) "sdrt-triton" runs the kernels under Triton's interpreter, which
    # the parent switched on in this process's environment.
    os.environ["SDRT_BACKEND"] = ("torch" if system == "sdrt-torch" else
                                  "auto" if device == "cuda" else "triton")
    from sdrt.engine import Pipeline
    pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype,
                                    vae_dtype="bf16" if system.endswith("-bf16vae") else None)
    if controlnet is not None:
        image = {"control_image": control_image(side),
                 "controlnet": pipe.load_controlnet(controlnet, name="controlnet")}
    if ip_adapter is not None:
        image = {"ip_adapter_image": reference_image(side), "ip_adapter": pipe.load_ip_adapter(
            Path(ip_adapter) / "ip-adapter.safetensors",
            image_encoder=Path(ip_adapter) / "image_encoder", name="ip")}
    t0 = time.perf_counter()
    for n in steps:
        pipe.compile(side, side, batch_size=1, num_inference_steps=n, guidance=guidance > 1,
                     strength=1.0 if inpaint else None, masked=inpaint,
                     controlnet=image.get("controlnet"), ip_adapter=image.get("ip_adapter"))
    _sync(device)
    build = time.perf_counter() - t0

    def run(n, latents, output_type="np"):
        return pipe(PROMPT, height=side, width=side, num_inference_steps=n,
                    guidance_scale=guidance, latents=latents, seed=0, output_type=output_type,
                    **image)
    return run, build


def _part(parts: Path, model: str, system: str, suffix: str) -> Path:
    return parts / f"{model}_{system}{suffix}"


def read_parts(parts: Path) -> list:
    """Every system's row found in ``parts`` (from this run and earlier ones into the same
    folder), in MODELS and SYSTEMS order."""
    rows = [json.loads(p.read_text()) for p in parts.glob("*.json")]
    order = {(m, s): i for i, (m, s) in enumerate((m, s) for m in MODELS for s in SYSTEMS)}
    return sorted(rows, key=lambda r: order.get((r["model"], r["system"]), len(order)))


def worker(system, model, folder, parts, repeats, compile_mode, device):
    """Measure one system on one model; writes ``{model}_{system}.json`` and ``.npy`` into
    ``parts``. Timed with CUDA events on a GPU, with the host clock on the CPU (dry runs)."""
    import torch

    from sdrt.benchmarks.common import time_on
    _, side, steps, guidance = MODELS[model]
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        # Dry runs: tiny tensors gain nothing from a second thread, and on a shared CPU its
        # spin-waits made one tiny pipeline call take seconds instead of 0.2 s.
        torch.set_num_threads(1)
    cfg = _config(model)
    run, build = _load(system, model_family(model), folder, side, steps, guidance,
                       compile_mode, device, dtype, inpaint=model in INPAINT_MODELS,
                       controlnet=(controlnet_folder(Path(folder)) if model in CONTROLNET_MODELS
                                   else None),
                       ip_adapter=(ip_adapter_folder(Path(folder)) if model in IP_ADAPTER_MODELS
                                   else None))
    # (1, 4, side/8, side/8): SDXL's VAE has SD's 4 latent channels and factor 8 too.
    channels, factor = cfg["unet"]["in_channels"], 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    latents = torch.randn(1, channels, side // factor, side // factor,
                          generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    image = np.asarray(run(steps[0], latents), dtype=np.float32)
    _sync(device)
    first_image_at = time.time()
    np.save(_part(parts, model, system, ".npy"), image)
    latency = {str(n): time_on(device, lambda n=n: run(n, latents), warmup=2 if device == "cuda"
                               else 0, repeats=repeats).median_ms for n in steps}
    result = {"system": system, "model": model, "side": side, "latency_ms": latency,
              "build_s": build, "first_image_at": first_image_at,
              "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2 ** 30
                                  if device == "cuda" else None)}
    if len(steps) == 2:  # UNet calls per second, with text encoding and decode cancelled out
        (a, b) = steps
        result["unet_it_s"] = (a - b) / ((latency[str(a)] - latency[str(b)]) * 1e-3)
    _part(parts, model, system, ".json").write_text(json.dumps(result))


# -- the parent: orchestration and report ---------------------------------------------------------

def _text(output) -> str:
    """A child's captured output: TimeoutExpired may carry bytes even with ``text=True``."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def run_system(model, system, folder, parts, repeats, compile_mode, timeout, device):
    """One system in a fresh process. Its row (an ``error`` row if it failed or timed out) is
    also left in ``parts`` as ``{model}_{system}.json`` at once, so a run stopped later keeps it."""
    from sdrt.benchmarks.common import run_group
    path = _part(parts, model, system, ".json")
    for stale in (path, _part(parts, model, system, ".npy")):
        stale.unlink(missing_ok=True)
    started = time.time()
    cmd = [sys.executable, "-m", "sdrt.benchmarks.bench_pipeline", "--worker", system,
           "--models", model, "--folder", str(folder), "--out-dir", str(parts),
           "--repeats", str(repeats), "--compile-mode", compile_mode, "--device", device]
    env = dict(os.environ)
    if device != "cuda" and system.startswith("sdrt-triton"):
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: before the child starts
    status, out, err = run_group(cmd, timeout, env=env)
    if status is None:  # the child was killed; keep the other rows
        tail = _text(err or out).strip().splitlines()[-2:]
        r = {"model": model, "system": system,
             "error": " / ".join([f"timed out after {timeout} s"] + tail)}
    elif status != 0 or not path.is_file():
        tail = _text(err or out).strip().splitlines()[-3:]
        r = {"model": model, "system": system, "error": " / ".join(tail)}
    else:
        r = json.loads(path.read_text())
        r["first_image_s"] = r.pop("first_image_at") - started
    path.write_text(json.dumps(r))
    return r


def image_differences(rows, parts):
    """Each row's max abs image difference from diffusers' image of the same model."""
    for r in rows:
        ref = _part(parts, r["model"], "diffusers", ".npy")
        image = _part(parts, r["model"], r["system"], ".npy")
        if "error" not in r and ref.is_file() and image.is_file():
            r["max_abs_diff_vs_diffusers"] = float(np.abs(np.load(image) - np.load(ref)).max())


def flatten(rows):
    """One markdown/JSON row per system, with the latencies as columns and ratios to diffusers."""
    base = {r["model"]: r for r in rows if r["system"] == "diffusers" and "error" not in r}
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "latency_ms"}
        for n, ms in r.get("latency_ms", {}).items():
            row[f"{n} steps ms"] = ms
        b = base.get(r["model"])
        if b and "unet_it_s" in r and "unet_it_s" in b:
            row["it/s vs diffusers"] = r["unet_it_s"] / b["unet_it_s"]
        out.append(row)
    return out


def ablation(rows):
    """Each optimisation's gain in end-to-end latency at the first step count, in the order
    they stack: diffusers eager → torch.compile; eager → sdrt graphs (torch ops) → Triton."""
    by = {(r["model"], r["system"]): r for r in rows if "error" not in r}
    steps = {m: MODELS[m][2][0] for m, _ in by}
    chain = [("diffusers", "diffusers-compile", "torch.compile (max-autotune), channels_last"),
             ("diffusers", "sdrt-torch", "sdrt modules, static shapes, CUDA graphs"),
             ("sdrt-torch", "sdrt-triton", "sdrt Triton kernels"),
             ("sdrt-triton", "sdrt-triton-bf16vae", "VAE in bf16 (not diffusers' choice)")]
    out = []
    for model in sorted(steps):
        n = steps[model]
        for a, b, what in chain:
            if (model, a) in by and (model, b) in by:
                ta = by[(model, a)]["latency_ms"][str(n)]
                tb = by[(model, b)]["latency_ms"][str(n)]
                out.append({"model": model, "from": a, "to": b, "change": what,
                            "ms before": ta, "ms after": tb, "speed-up": ta / tb})
    return out


def bar_chart(rows, path):
    """A horizontal bar per (model, system): end-to-end latency at its first step count."""
    from PIL import Image, ImageDraw
    bars = [(f"{r['model']} {r['system']} ({MODELS[r['model']][2][0]} steps)",
             next(iter(r["latency_ms"].values()))) for r in rows if "error" not in r]
    if not bars:
        return None
    width, row_h, label_w = 900, 28, 330
    img = Image.new("RGB", (width, row_h * len(bars) + 40), "white")
    draw = ImageDraw.Draw(img)
    top = max(v for _, v in bars)
    draw.text((10, 8), "end-to-end latency, ms (shorter is better)", fill="black")
    for i, (label, v) in enumerate(bars):
        y = 34 + i * row_h
        draw.text((10, y + 6), label, fill="black")
        length = int((width - label_w - 90) * v / top)
        color = (214, 96, 44) if "sdrt" in label else (90, 120, 170)
        draw.rectangle([label_w, y + 4, label_w + length, y + row_h - 6], fill=color)
        draw.text((label_w + length + 6, y + 6), f"{v:.1f}", fill="black")
    img.save(path)
    return path


def report(rows, info, ceiling, results_dir=None, notes=()):
    from sdrt.benchmarks.common import default_results_dir, gpu_slug, write_report
    results_dir = Path(results_dir or default_results_dir())
    flat = flatten(rows)
    columns = ["model", "system"] + sorted({k for r in flat for k in r if k.endswith("steps ms")},
                                           key=lambda k: -int(k.split()[0])) + \
        ["unet_it_s", "it/s vs diffusers", "first_image_s", "build_s", "peak_memory_gib",
         "max_abs_diff_vs_diffusers", "error"]
    abl = ablation(rows)
    paths = write_report("bench_pipeline", info, ceiling, {
        "Side by side (fp16, batch 1, same latents)": (flat, columns),
        "Ablation": (abl, ["model", "change", "from", "to", "ms before", "ms after",
                           "speed-up"]),
    }, notes=["UNet it/s = (a − b) / (t_a − t_b) for the model's two step counts a > b "
              "(50 and 20; SDXL-Turbo 4 and 1): one 'it' is one UNet call (a batch of 2 with "
              "CFG, 1 without).",
              "first_image_s: from process start to the first image (imports, weights load, "
              "compile or capture included).", *notes], results_dir=results_dir)
    png = bar_chart(rows, results_dir / f"bench_pipeline_{gpu_slug(info['gpu'])}.png")
    return paths + ((png,) if png else ())


def main(argv=None):
    p = argparse.ArgumentParser(prog="sdrt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: sd15,sd21,"
                        "sd-turbo; tiny with --dry-run, which runs each real model's tiny "
                        "stand-in)")
    p.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEMS)} "
                   "(default: all; sdrt-torch with --dry-run)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the models are written")
    p.add_argument("--out-dir", default=None, help="report folder (default benchmarks/results, "
                   "or $SDRT_RESULTS_DIR)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; 1 dry)")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--timeout", type=int, default=540, help="seconds per system")
    p.add_argument("--dry-run", action="store_true",
                   help="the same run on the CPU with the tiny model; measures nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = (a.models or ("tiny" if a.dry_run else "sd15,sd21,sd-turbo")).split(",")
    if a.dry_run and not a.worker:  # a real model's code path, at its tiny stand-in's size
        models = list(dict.fromkeys(DRY_RUN_STANDINS.get(m, m) for m in models))
    systems = (a.systems or ("sdrt-torch" if a.dry_run else ",".join(SYSTEMS))).split(",")
    repeats = a.repeats or (1 if a.dry_run else 5)
    unknown = [m for m in models if m not in MODELS] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown model or system: {', '.join(unknown)}")
    if a.worker:
        worker(a.worker, models[0], a.folder, Path(a.out_dir), repeats, a.compile_mode, a.device)
        return 0
    from sdrt.benchmarks import common
    if a.dry_run:
        device, notes = "cpu", [f"{common.DRY_RUN_LABEL}: the CPU, the tiny model, host-clock "
                                "timing; checks the benchmark's code path only."]
        info, ceiling = common.host_info(), common.ceilings("cpu", 1 << 20, 128)
    else:
        common.require_cuda("bench_pipeline")
        device, notes = "cuda", []
        info, ceiling = common.device_info(), common.ceilings()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out_dir) if a.out_dir else common.default_results_dir()
    # One parts folder per GPU: a later run into the same folder adds its systems to the report.
    parts = out_dir / f"{PARTS}_{common.gpu_slug(info['gpu'])}"
    parts.mkdir(parents=True, exist_ok=True)
    for model in models:
        folder = write_model(cache, model, device)
        if model in CONTROLNET_MODELS:
            write_controlnet(folder, model, device)
        if model in IP_ADAPTER_MODELS:
            write_ip_adapter(folder, model, device)
        for system in systems:
            row = run_system(model, system, folder, parts, repeats, a.compile_mode, a.timeout,
                             device)
            print(f"{model} {system}: " + (row.get("error") or "done"), flush=True)
            rows = read_parts(parts)
            image_differences(rows, parts)
            paths = report(rows, info, ceiling, out_dir, notes)  # rewritten after every system
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
