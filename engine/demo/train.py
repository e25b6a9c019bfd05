"""Train the demo model: ``python -m sdrt.engine.demo.train --out engine/data``.

Three stages on scenes rendered on the fly by ``world``: the VAE (a weighted reconstruction loss
+ a small KL term); the UNet and the text encoder together on the frozen VAE's latents with the
SD 1.x noise schedule (scaled_linear betas, epsilon prediction); then the VAE decoder alone,
sharpened with the encoder (so the latent space) frozen. 10% of the captions are replaced by
the empty prompt, so the model also learns the unconditional prediction that classifier-free
guidance and negative prompts use. Everything is seeded. ``--resume`` runs more UNet steps on a
saved model, ``--decoder-only`` the last stage alone.

The shipped weights (``engine/data/demo.*``; ``demo.json`` records the steps run):

    python -m sdrt.engine.demo.train --out engine/data --vae-steps 1000 --unet-steps 1100 \
        --decoder-steps 0 --time-limit 2640
    python -m sdrt.engine.demo.train --out engine/data --decoder-only --decoder-steps 500
    python -m sdrt.engine.demo.train --out engine/data --resume --unet-steps 380 --lr 5e-4 \
        --time-limit 660
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import SD15
from ..loading import build
from ..tokenizer import ClipTokenizer
from . import world

LATENT_SIDE = world.SIDE // 4

DEMO = {
    "unet": {**SD15["unet"], "block_out_channels": [64, 128], "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 64, "layers_per_block": 1, "sample_size": LATENT_SIDE},
    "vae": {**SD15["vae"], "block_out_channels": [16, 32, 32], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "norm_num_groups": 8,
            "sample_size": world.SIDE},
    "text_encoder": {**SD15["text_encoder"], "hidden_size": 64, "intermediate_size": 128,
                     "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 64},
    "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "trained_betas": None,
                  "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "linspace", "use_karras_sigmas": True,
                  "algorithm_type": "dpmsolver++", "solver_order": 2,
                  "solver_type": "midpoint", "lower_order_final": True},
    "pad_token": SD15["pad_token"],
    # What the CLI uses when the demo model runs without explicit settings.
    "demo_defaults": {"sampler": "dpmpp_2m_karras", "num_inference_steps": 20,
                      "guidance_scale": 5.0, "height": world.SIDE, "width": world.SIDE},
}


def _init_(module, seed):
    """PyTorch's default initialisation, seeded per network."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
    return module


def _alphas_cumprod(sched):
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5,
                           sched["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def train_vae(vae, steps, batch_size, rng, log, lr=3e-3):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
    vae.train()
    for step in range(steps):
        images, _ = world.batch(rng, batch_size)
        x = torch.from_numpy(images)
        mean, std = vae.encode(x)
        z = mean + std * torch.randn_like(std)
        recon = vae.decode(z)
        kl = 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * torch.log(std)).mean()
        loss = _weighted_error(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} mse {F.mse_loss(recon, x).item():.5f} kl {kl.item():.3f}")
    return vae.eval()


def _pixel_weights(x, edge):
    """Loss weights of images x (B, 3, H, W): 1 on the background, 10 on the shapes, and
    ``edge`` more next to a shape's edge. The shapes cover a tenth of the pixels; without the
    weights an autoencoder settles on the background alone (and, without the edge weight,
    rounds the corners). The median colour of each image is its background."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    shape = ((x - background).abs().sum(1, keepdim=True) > 0.1).float()
    # A pixel is at an edge when its 3×3 neighbourhood holds both kinds of pixel.
    near = F.max_pool2d(shape, 3, 1, 1)
    inside = -F.max_pool2d(-shape, 3, 1, 1)
    return 1 + 9 * shape + edge * (near - inside)


def _weighted_error(recon, x, edge=0.0):
    error = recon - x
    return (_pixel_weights(x, edge) * (error.abs() + error ** 2)).mean()


def finetune_decoder(vae, steps, batch_size, rng, log, lr=1e-3):
    """Sharpen the decoder with the encoder frozen: the latent space the UNet learned stays
    the same, so this stage may run after the UNet's. It starts from the weights rounded to
    fp16, as ``save`` stores them, so that it gives the same result on a saved model."""
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p.half().float())
    params = list(vae.decoder.parameters()) + (
        list(vae.post_quant_conv.parameters()) if vae.post_quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    vae.train()
    for step in range(steps):
        images, _ = world.batch(rng, batch_size)
        x = torch.from_numpy(images)
        with torch.no_grad():
            mean, std = vae.encode(x)
        recon = vae.decode(mean + std * torch.randn(std.shape, generator=gen))
        loss = _weighted_error(recon, x, edge=20.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step} mse {F.mse_loss(recon, x).item():.5f}")
    for p in params:
        p.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def latent_scale(vae, rng, n=256):
    images, _ = world.batch(rng, n)
    mean, _ = vae.encode(torch.from_numpy(images))
    return float(1.0 / mean.std())


def train_unet(unet, text_encoder, vae, tokenizer, scheduler, steps, batch_size, rng, log,
               lr=1e-3, drop=0.1, deadline=None, checkpoint=None):
    """Returns the number of steps run: ``steps``, or fewer when ``time.perf_counter()``
    passes ``deadline``. ``checkpoint(step)`` is called every 100 steps."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.05)
    alphas = _alphas_cumprod(scheduler)
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    step = -1
    for step in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            log(f"unet stage stopped by the time limit after {step} steps")
            return step
        images, captions = world.batch(rng, batch_size)
        captions = ["" if rng.random() < drop else c for c in captions]
        with torch.no_grad():
            mean, std = vae.encode(torch.from_numpy(images))
            latents = (mean + std * torch.randn(std.shape, generator=gen)) * scale
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        states = text_encoder(tokenizer(captions))
        loss = F.mse_loss(unet(noisy, t, states), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
        if checkpoint is not None and step % 100 == 99:
            checkpoint(step + 1)
    return step + 1


def save(out, config, text_encoder, unet, vae):
    """``demo.safetensors`` (fp16, one file, keys prefixed by component) and ``demo.json``."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().to(torch.float16).contiguous()
               for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))
               for k, v in module.state_dict().items()}
    save_file(tensors, os.path.join(out, "demo.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "demo.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def train(out, vae_steps=1000, unet_steps=1100, decoder_steps=500, batch_size=64,
          vae_batch_size=32, seed=0, threads=1, log=print, time_limit=None):
    """Train the demo model and save it under ``out``. ``time_limit`` (seconds from the start)
    stops the UNet stage early, with the learning-rate schedule as if all steps ran; the steps
    actually run are recorded in the config's ``training``. Returns the config.

    One thread by default: on a shared machine, two threads that wait on each other run the
    small ops of these networks an order of magnitude slower than one thread does."""
    torch.set_num_threads(threads)
    config = json.loads(json.dumps(DEMO))
    rng = np.random.default_rng(seed)
    tokenizer = ClipTokenizer.bundled(pad_token=config["pad_token"])
    text_encoder = _init_(build("text_encoder", config["text_encoder"], "cpu"), seed)
    unet = _init_(build("unet", config["unet"], "cpu"), seed + 1)
    vae = _init_(build("vae", config["vae"], "cpu"), seed + 2)
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    train_vae(vae, vae_steps, vae_batch_size, rng, log)
    for p in vae.parameters():
        p.requires_grad_(False)
    config["vae"]["scaling_factor"] = round(latent_scale(vae, rng), 5)
    vae.config.scaling_factor = config["vae"]["scaling_factor"]
    log(f"vae done in {time.perf_counter() - start:.0f} s, scaling_factor "
        f"{config['vae']['scaling_factor']}")

    def record(done):
        config["training"] = {"seed": seed, "vae_steps": vae_steps, "vae_batch_size": vae_batch_size,
                              "unet_steps_planned": unet_steps, "unet_steps": done,
                              "batch_size": batch_size, "threads": threads,
                              "torch": torch.__version__,
                              "wall_seconds": round(time.perf_counter() - start, 1)}
        save(out, config, text_encoder, unet, vae)

    done = train_unet(unet, text_encoder, vae, tokenizer, config["scheduler"], unet_steps,
                      batch_size, rng, log, deadline=deadline, checkpoint=record)
    unet.eval()
    text_encoder.eval()
    record(done)
    finetune_decoder(vae, decoder_steps, vae_batch_size, np.random.default_rng(seed + 3), log)
    config["training"]["decoder_steps"] = decoder_steps
    config["training"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    save(out, config, text_encoder, unet, vae)
    log(f"saved to {out} after {time.perf_counter() - start:.0f} s")
    return config


def finetune_saved_decoder(folder, decoder_steps=500, vae_batch_size=32, seed=0, threads=1,
                           log=print):
    """The decoder stage alone, on a model ``train`` saved (its networks and config in
    ``folder``), seeded as ``train`` seeds it: a run stopped after the UNet stage, then this,
    gives the same weights as one ``train`` call."""
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    start = time.perf_counter()
    config = demo_config(os.path.join(folder, "demo.json"))
    c = demo_components(folder)
    finetune_decoder(c.vae, decoder_steps, vae_batch_size, np.random.default_rng(seed + 3), log)
    config["training"]["decoder_steps"] = decoder_steps
    config["training"]["wall_seconds"] = round(config["training"]["wall_seconds"]
                                               + time.perf_counter() - start, 1)
    save(folder, config, c.text_encoder, c.unet, c.vae)
    log(f"saved to {folder}")
    return config


def resume_unet(folder, unet_steps, batch_size=64, seed=0, threads=1, lr=5e-4, log=print,
                time_limit=None):
    """More UNet and text-encoder steps, with a fresh one-cycle schedule peaking at ``lr``, on
    a model ``train`` saved in ``folder`` (the VAE is untouched); seeded by ``seed``."""
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    config = demo_config(os.path.join(folder, "demo.json"))
    c = demo_components(folder)
    for p in c.vae.parameters():
        p.requires_grad_(False)
    done = train_unet(c.unet, c.text_encoder, c.vae, c.tokenizer, config["scheduler"],
                      unet_steps, batch_size, np.random.default_rng(seed + 4), log, lr=lr,
                      deadline=deadline)
    config["training"].setdefault("resumed", []).append(
        {"unet_steps_planned": unet_steps, "unet_steps": done, "lr": lr, "seed": seed + 4,
         "wall_seconds": round(time.perf_counter() - start, 1)})
    save(folder, config, c.text_encoder.eval(), c.unet.eval(), c.vae)
    log(f"saved to {folder}")
    return config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data"))
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=1100)
    p.add_argument("--decoder-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; the UNet stage stops when they have passed")
    p.add_argument("--decoder-only", action="store_true",
                   help="run only the decoder stage, on the model already saved in --out")
    p.add_argument("--resume", action="store_true",
                   help="run --unet-steps more UNet steps (peak learning rate --lr) on the "
                        "model already saved in --out")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of --resume")
    a = p.parse_args(argv)
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)
    if a.resume:
        resume_unet(a.out, a.unet_steps, a.batch_size, a.seed, a.threads, a.lr, log,
                    a.time_limit)
    elif a.decoder_only:
        finetune_saved_decoder(a.out, a.decoder_steps, a.vae_batch_size, a.seed, a.threads, log)
    else:
        train(a.out, a.vae_steps, a.unet_steps, a.decoder_steps, a.batch_size,
              a.vae_batch_size, a.seed, a.threads, log=log, time_limit=a.time_limit)


if __name__ == "__main__":
    main()
