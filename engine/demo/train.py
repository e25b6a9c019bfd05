"""Train the demo model: ``python -m sdrt.engine.demo.train --out engine/data``.

Stages on scenes rendered on the fly by ``world``, each seeded on its own (``seed``,
``seed + 1``, ``seed + 3``) and each saving the model, so a run may be split into stages
(``--stages vae``, then ``--stages unet``) and give the same weights as one run:

1. ``vae``: the VAE (a reconstruction loss weighted towards the shapes and their edges + a
   small KL term), stored rounded to fp16 as it ships;
2. ``unet``: the UNet and the text encoder together, from their seeded initialisation, on the
   frozen VAE's latents with the SD 1.x noise schedule (scaled_linear betas), predicting v.
   10% of the captions are replaced by the empty prompt, so the model also learns the
   unconditional prediction that classifier-free guidance and negative prompts use;
3. ``decoder`` (not run by default, not in the shipped weights): the VAE decoder alone,
   sharpened with the encoder (so the latent space) frozen.

``--resume`` runs more UNet steps on a saved model (a fresh one-cycle schedule). Either UNet
run may weight the loss towards the shapes and their edges (``--shape-weighted``), name
neither size nor position in more one-shape captions (``--plain``) and draw the shape of a
caption naming no position in the centre (``--unplaced centre``).

The VAE downsamples 2× (16×16×4 latents for 32×32 images): with 4× (8×8 latents) even a
perfect reconstruction rounds the corners of 8-pixel shapes; with 2×, the checker finds the
described shape in 96% of the VAE's reconstructions of the held-out scenes. The UNet's 16×16
level has no attention (256-token attention, measured, doubles a training step);
cross-attention works at 8×8 and 4×4.

Why v-prediction: an earlier model predicting the noise (ε), as SD 1.x does, drew the
background's colour right in 1 of 18 held-out pictures; with ε-prediction the colour of the
whole picture, decided at high noise, weighs almost nothing in the loss. Why the shape-weighted
resumption: after the ``unet`` stage the colours, background and position were right on nearly
every held-out prompt, but the shape on about 70% (squares drawn round, circles square), and
2400 more unweighted steps did not change that (68.5%); 2400 shape-weighted steps gave 81.5%
(both at guidance 3, 20 steps, measured during development on the held-out prompts; the
shipped figures are in ``benchmarks/results/demo_quality.md``).

Why the centre: with the shape of a caption naming no position drawn in any cell, "a red circle
on a blue background" drew not one red region but mostly two or three red circles at 28 of
seeds 1–32 (guidance 4, 20 DPM++ 2M Karras steps), and at 11 to 28 of them over guidance 1–4,
20 or 50 steps and four samplers (measured during development): the model hedged between
places. Whoever names no position usually means the middle; trained so, the model draws one.

The shipped weights (``engine/data/demo.*``; ``demo.json`` records each stage's and each
resumption's steps, seed and wall time), each command on one thread of a 2-core machine
shared with other work (another training ran on the second core), 8629 s (144 minutes) in all:

    python -m sdrt.engine.demo.train --out engine/data --stages vae --vae-steps 600
    python -m sdrt.engine.demo.train --out engine/data --stages unet --unet-steps 4600 \
        --batch-size 32 --time-limit 4500
    python -m sdrt.engine.demo.train --out engine/data --resume --unet-steps 2400 \
        --batch-size 32 --lr 3e-4 --shape-weighted
    python -m sdrt.engine.demo.train --out engine/data --resume --unet-steps 2400 \
        --batch-size 32 --lr 3e-4 --shape-weighted --plain 0.25
    python -m sdrt.engine.demo.train --out engine/data --resume --unet-steps 2400 \
        --batch-size 32 --lr 3e-4 --shape-weighted --plain 0.25 --unplaced centre --seed 1
    python -m sdrt.engine.demo.quality --choose-defaults

(No time limit was reached. The last command picks the default guidance scale on
training-distribution prompts, then measures the held-out ones.) One run of the last recipe
from scratch, ``--stages unet --shape-weighted --plain 0.25 --unplaced centre`` after the same
VAE stage, took 63 minutes in all and falls two held-out prompts short on the shape
(``benchmarks/results/demo_one_hour/``).
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

LATENT_SIDE = world.SIDE // 2

DEMO = {
    "unet": {**SD15["unet"], "block_out_channels": [32, 64, 128], "attention_head_dim": 8,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": 64, "layers_per_block": 1, "sample_size": LATENT_SIDE},
    "vae": {**SD15["vae"], "block_out_channels": [16, 32], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8,
            "sample_size": world.SIDE},
    "text_encoder": {**SD15["text_encoder"], "hidden_size": 64, "intermediate_size": 128,
                     "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 64},
    "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "trained_betas": None,
                  "prediction_type": "v_prediction", "steps_offset": 1,
                  "timestep_spacing": "linspace", "use_karras_sigmas": True,
                  "algorithm_type": "dpmsolver++", "solver_order": 2,
                  "solver_type": "midpoint", "lower_order_final": True,
                  # As SD 1.x's scheduler configs say: without them diffusers' (and sdrt's) DDIM
                  # clips its x0 estimates to [-1, 1], which wrecks these latents.
                  "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True},
    "pad_token": SD15["pad_token"],
    # What the CLI uses when the demo model runs without explicit settings.
    "demo_defaults": {"sampler": "dpmpp_2m_karras", "num_inference_steps": 20,
                      "guidance_scale": 5.0, "height": world.SIDE, "width": world.SIDE},
}
STAGES = ("vae", "unet", "decoder")
# Which seed offset initialises which network, and which one draws each stage's scenes.
_INIT_SEEDS = {"text_encoder": 0, "unet": 1, "vae": 2}
_STAGE_SEEDS = {"vae": 0, "unet": 1, "decoder": 3, "resume": 4}


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


def _round_fp16_(module):
    """Round the weights to fp16, as ``save`` stores them, so that the next stage starts from
    what a saved model holds (a run split into stages gives the same weights as one run)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def _fit(name, params, steps, lr, pct_start, step_loss, log, clip=None, deadline=None,
         checkpoint=None):
    """The training loop every stage shares: AdamW (no weight decay) on ``params`` with a
    one-cycle learning rate peaking at ``lr``; ``step_loss()`` draws a batch and returns (loss,
    a function giving the log line's figures). The gradient norm is clipped to ``clip`` when
    given. Stops early when ``time.perf_counter()`` passes ``deadline`` (the schedule stays
    the one planned for ``steps``); calls ``checkpoint(steps done)`` every 100 steps. Returns
    the number of steps run."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1),
                                                pct_start=pct_start)
    for step in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            log(f"{name} stage stopped by the time limit after {step} steps")
            return step
        loss, figures = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step} {figures()}")
        if checkpoint is not None and step % 100 == 99:
            checkpoint(step + 1)
    return steps


def train_vae(vae, steps, batch_size, rng, log, lr=3e-3, edge=20.0):
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))

    def step_loss():
        images, _ = world.batch(rng, batch_size)
        x = torch.from_numpy(images)
        mean, std = vae.encode(x)
        z = mean + std * torch.randn(std.shape, generator=gen)
        recon = vae.decode(z)
        kl = 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * torch.log(std)).mean()
        return _weighted_error(recon, x, edge) + 1e-6 * kl, \
            lambda: f"mse {F.mse_loss(recon, x).item():.5f} kl {kl.item():.3f}"

    vae.train()
    _fit("vae", list(vae.parameters()), steps, lr, 0.1, step_loss, log)
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


def finetune_decoder(vae, steps, batch_size, rng, log, lr=1e-3, latent_noise=0.3):
    """Sharpen the decoder with the encoder frozen: the latent space the UNet learned stays
    the same, so this stage may run after the UNet's. The latents get extra Gaussian noise, of
    a standard deviation drawn per image up to ``latent_noise`` (in the UNet's scaled units):
    the UNet's latents are never exact, and a decoder that maps nearby latents to the same flat
    picture turns the UNet's small errors into nothing instead of texture."""
    params = list(vae.decoder.parameters()) + (
        list(vae.post_quant_conv.parameters()) if vae.post_quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))

    def step_loss():
        images, _ = world.batch(rng, batch_size)
        x = torch.from_numpy(images)
        with torch.no_grad():
            mean, std = vae.encode(x)
            sigma = latent_noise / vae.config.scaling_factor * torch.rand(
                (batch_size, 1, 1, 1), generator=gen)
            z = mean + (std ** 2 + sigma ** 2).sqrt() * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(z)
        return _weighted_error(recon, x, edge=20.0), \
            lambda: f"mse {F.mse_loss(recon, x).item():.5f}"

    vae.train()
    _fit("decoder", params, steps, lr, 0.1, step_loss, log)
    for p in params:
        p.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def latent_scale(vae, rng, n=256):
    images, _ = world.batch(rng, n)
    mean, _ = vae.encode(torch.from_numpy(images))
    return float(1.0 / mean.std())


def train_unet(unet, text_encoder, vae, tokenizer, scheduler, steps, batch_size, rng, log,
               lr=1e-3, drop=0.1, deadline=None, checkpoint=None, shape_weighted=False,
               plain=0.0, unplaced="anywhere"):
    """Returns the number of steps run: ``steps``, or fewer when ``time.perf_counter()``
    passes ``deadline``. ``checkpoint(step)`` is called every 100 steps. ``shape_weighted``
    weights each latent pixel's error by the VAE loss's pixel weights (``_pixel_weights``: the
    shapes and their edges above the background) pooled to the latents' size, normalised to a
    mean of 1 per image: the shapes cover a tenth of the picture, and their outlines decide
    what they are. ``plain`` is the share of one-shape captions that name neither size nor
    position, beyond the templates' own (``world.caption``); ``unplaced`` says where such a
    caption's shape is drawn (``world.random_scene``)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    alphas = _alphas_cumprod(scheduler)
    scale = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))

    def step_loss():
        images, captions = world.batch(rng, batch_size, plain, unplaced)
        captions = ["" if rng.random() < drop else c for c in captions]
        x = torch.from_numpy(images)
        with torch.no_grad():
            mean, std = vae.encode(x)
            latents = (mean + std * torch.randn(std.shape, generator=gen)) * scale
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        # v-prediction (v = √ᾱ ε − √(1−ᾱ) x0) asks, at high noise, for the picture itself: with
        # ε-prediction the background's colour, decided there, weighs almost nothing in the loss.
        target = noise if scheduler["prediction_type"] == "epsilon" else \
            a.sqrt() * noise - (1 - a).sqrt() * latents
        states = text_encoder(tokenizer(captions))
        error = (unet(noisy, t, states) - target).pow(2)
        if shape_weighted:
            w = F.adaptive_avg_pool2d(_pixel_weights(x, edge=20.0), error.shape[-2:])
            error = error * (w / w.mean(dim=(1, 2, 3), keepdim=True))
        loss = error.mean(dim=(1, 2, 3)).mean()
        return loss, lambda: f"loss {loss.item():.4f}"

    unet.train()
    text_encoder.train()
    done = _fit("unet", params, steps, lr, 0.05, step_loss, log, clip=1.0, deadline=deadline,
                checkpoint=checkpoint)
    unet.eval()
    text_encoder.eval()
    return done


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


def _fresh(config, name, seed):
    return _init_(build(name, config[name], "cpu"), seed + _INIT_SEEDS[name])


def train(out, stages=STAGES, vae_steps=600, unet_steps=4600, decoder_steps=200, batch_size=32,
          vae_batch_size=32, seed=0, threads=1, log=print, time_limit=None, lr=1e-3,
          shape_weighted=False, plain=0.0, unplaced="anywhere"):
    """Run ``stages`` (in the order of ``STAGES``) and save the model under ``out`` after each;
    a stage after the first of a run reads the model the earlier stages saved there. The text
    encoder and UNet always start from their seeded initialisation. ``time_limit`` (seconds from
    the start) stops the UNet stage early, with the learning-rate schedule as if all steps ran.
    ``shape_weighted``, ``plain`` and ``unplaced`` are the UNet stage's (``train_unet``).
    Each stage's steps, seed and wall time go into the config's ``training``. Returns the
    config.

    One thread by default: on a shared machine, two threads that wait on each other run the
    small ops of these networks an order of magnitude slower than one thread does."""
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    stages = [s for s in STAGES if s in stages]
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    tokenizer = ClipTokenizer.bundled(pad_token=DEMO["pad_token"])
    if stages[0] == "vae":
        config = json.loads(json.dumps(DEMO))
        config["training"] = {"seed": seed, "threads": threads, "torch": torch.__version__,
                              "stages": {}}
        vae = _fresh(config, "vae", seed)
        text_encoder, unet = _fresh(config, "text_encoder", seed), _fresh(config, "unet", seed)
    else:
        config = demo_config(os.path.join(out, "demo.json"))
        c = demo_components(out)
        text_encoder, unet, vae = c.text_encoder, c.unet, c.vae
    for p in vae.parameters():
        p.requires_grad_(False)

    def record(stage, **fields):
        config["training"]["stages"][stage] = {
            "seed": seed + _STAGE_SEEDS[stage], **fields,
            "wall_seconds": round(time.perf_counter() - stage_start, 1)}
        config["training"]["wall_seconds"] = round(sum(
            s["wall_seconds"] for s in config["training"]["stages"].values()), 1)
        save(out, config, text_encoder, unet, vae)

    for stage in stages:
        stage_start = time.perf_counter()
        rng = np.random.default_rng(seed + _STAGE_SEEDS[stage])
        if stage == "vae":
            for p in vae.parameters():
                p.requires_grad_(True)
            train_vae(vae, vae_steps, vae_batch_size, rng, log)
            for p in vae.parameters():
                p.requires_grad_(False)
            _round_fp16_(vae)
            config["vae"]["scaling_factor"] = round(latent_scale(vae, rng), 5)
            vae.config.scaling_factor = config["vae"]["scaling_factor"]
            record("vae", steps=vae_steps, batch_size=vae_batch_size)
        elif stage == "unet":
            text_encoder, unet = _fresh(config, "text_encoder", seed), _fresh(config, "unet", seed)
            # A fresh UNet: what earlier resumptions of the saved one did no longer applies.
            config["training"].pop("resumed", None)
            config["scheduler"]["prediction_type"] = DEMO["scheduler"]["prediction_type"]
            fields = dict(steps_planned=unet_steps, batch_size=batch_size, lr=lr,
                          prediction_type=config["scheduler"]["prediction_type"])
            mix = dict(shape_weighted=shape_weighted, plain=plain, unplaced=unplaced)
            if mix != dict(shape_weighted=False, plain=0.0, unplaced="anywhere"):
                fields.update(mix)  # recorded where they differ from the shipped stage's
            done = train_unet(
                unet, text_encoder, vae, tokenizer, config["scheduler"], unet_steps, batch_size,
                rng, log, lr=lr, deadline=deadline,
                checkpoint=lambda n: record("unet", steps=n, **fields), **mix)
            record("unet", steps=done, **fields)
        else:
            finetune_decoder(vae, decoder_steps, vae_batch_size, rng, log)
            record("decoder", steps=decoder_steps, batch_size=vae_batch_size)
        log(f"{stage} stage done in {time.perf_counter() - stage_start:.0f} s, saved to {out}")
    return config


def resume_unet(folder, unet_steps, batch_size=32, seed=0, threads=1, lr=5e-4, log=print,
                time_limit=None, prediction_type=None, shape_weighted=False, plain=0.0,
                unplaced="anywhere"):
    """More UNet and text-encoder steps, with a fresh one-cycle schedule peaking at ``lr``, on
    a model ``train`` saved in ``folder`` (the VAE is untouched); seeded by ``seed``. A
    ``prediction_type`` other than the model's switches what the UNet learns to predict."""
    from .model import demo_components, demo_config
    torch.set_num_threads(threads)
    start = time.perf_counter()
    deadline = None if time_limit is None else start + time_limit
    config = demo_config(os.path.join(folder, "demo.json"))
    if prediction_type is not None:
        config["scheduler"]["prediction_type"] = prediction_type
    c = demo_components(folder)
    for p in c.vae.parameters():
        p.requires_grad_(False)
    done = train_unet(c.unet, c.text_encoder, c.vae, c.tokenizer, config["scheduler"],
                      unet_steps, batch_size,
                      np.random.default_rng(seed + _STAGE_SEEDS["resume"]), log, lr=lr,
                      deadline=deadline, shape_weighted=shape_weighted, plain=plain,
                      unplaced=unplaced)
    config["training"].setdefault("resumed", []).append(
        {"unet_steps_planned": unet_steps, "unet_steps": done, "lr": lr,
         "prediction_type": config["scheduler"]["prediction_type"],
         "shape_weighted": shape_weighted, "plain": plain,
         "unplaced": unplaced, "seed": seed + _STAGE_SEEDS["resume"],
         "wall_seconds": round(time.perf_counter() - start, 1)})
    save(folder, config, c.text_encoder, c.unet, c.vae)
    log(f"saved to {folder}")
    return config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data"))
    p.add_argument("--stages", default="vae,unet",
                   help="comma-separated, of " + ", ".join(STAGES) + "; a run that does not "
                        "start with vae continues the model saved in --out")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--unet-steps", type=int, default=4600)
    p.add_argument("--decoder-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; the UNet stage stops when they have passed")
    p.add_argument("--resume", action="store_true",
                   help="run --unet-steps more UNet steps (peak learning rate --lr) on the "
                        "model already saved in --out")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the UNet stage (default 1e-3) or of --resume "
                        "(default 5e-4)")
    p.add_argument("--shape-weighted", action="store_true",
                   help="weight the UNet's loss towards the shapes and their edges")
    p.add_argument("--plain", type=float, default=0.0, metavar="P",
                   help="the share (0 to 1) of the UNet's one-shape captions that name "
                        "neither size nor position, beyond the templates' own")
    p.add_argument("--unplaced", choices=world.UNPLACED, default="anywhere",
                   help="where the shape of a one-shape caption naming no position is drawn: "
                        "in any cell (as the shipped unet stage) or the centre")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="with --resume: what the UNet learns to predict from now on")
    a = p.parse_args(argv)
    if not 0.0 <= a.plain <= 1.0:
        p.error(f"--plain: {a.plain} is not between 0 and 1")
    log = lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)
    if a.resume:
        resume_unet(a.out, a.unet_steps, a.batch_size, a.seed, a.threads,
                    5e-4 if a.lr is None else a.lr, log, a.time_limit, a.prediction_type,
                    a.shape_weighted, a.plain, a.unplaced)
        return
    stages = a.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    train(a.out, stages, a.vae_steps, a.unet_steps, a.decoder_steps, a.batch_size,
          a.vae_batch_size, a.seed, a.threads, log=log, time_limit=a.time_limit,
          lr=1e-3 if a.lr is None else a.lr, shape_weighted=a.shape_weighted, plain=a.plain,
          unplaced=a.unplaced)


if __name__ == "__main__":
    main()
