"""The pieces of a request that the eager pipeline and the static runtime both run."""
import functools
import itertools
from dataclasses import dataclass

import torch

from .adapter import T2IAdapter, adapter_input
from .conditioning import Conditioning
from .controlnet import FUSED_INPUTS, FusedControlNet
from .errors import SdrtError
from .layers import grid_slice


# The UNet inputs a ControlNet reads besides the latents and the timestep.
CONTROLNET_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids")


@dataclass
class Control:
    """ControlNets and T2I-Adapters applied on every UNet call (diffusers' ControlNet and
    adapter pipelines; several as its ``MultiControlNetModel``/``MultiAdapter``: their
    residuals and features summed).

    ``images``: per net, its control image (B, 3, H, W) in [0, 1], in the UNet's dtype;
    ``scales`` (calls, nets, 2, n + 1) float32: for UNet call i of the request and net k, the
    factors of its residuals (an adapter's features: its first ones) for the unconditional
    and the conditional half of the CFG batch (``controlnet.residual_scales``,
    ``adapter.adapter_scales``; zero where call i is outside the net's part of the schedule:
    ``control_scales``). In guess mode (with CFG) the ControlNets see only the conditional
    half and the unconditional half gets no residuals. An adapter's features do not depend
    on the latents: computed on the first call, reused on the others.

    ``regions``: per net, None or its region mask's weights (1, Σ h·w) at every grid of
    ``grids`` (the UNet's levels; ``layers.grid_weights``); a net with one has its residuals
    (features) weighed by it, position by position, as the A1111 ControlNet extension's
    ``effective_region_mask``."""
    nets: list
    images: list
    scales: torch.Tensor
    guess_mode: bool = False
    regions: tuple = ()
    grids: tuple = ()
    _features: dict = None  # per adapter: its features of this request's images

    def residuals(self, call, x, t, inputs, rows, parts=None):
        """The UNet's extra inputs for UNet call ``call`` on latents ``x`` (rows·B, C, h, w),
        ``rows`` the CFG halves in ``x`` and in ``inputs`` (the UNet's conditioning): the
        ControlNets' summed residuals, the adapters' summed features. With ``parts`` (A1111's
        composable diffusion) the conditional half holds one row per part, ``parts`` the
        image each one belongs to (a (P,) device tensor), after the B unconditional rows."""
        if call >= self.scales.shape[0]:
            raise SdrtError(f"ControlNet scales cover {self.scales.shape[0]} UNet calls; the "
                            f"sampler made more")
        out = {}
        nets = [(k, n) for k, n in enumerate(self.nets) if not isinstance(n, T2IAdapter)]
        adapters = [(k, n) for k, n in enumerate(self.nets) if isinstance(n, T2IAdapter)]
        if nets:
            out.update(self._controlnets(nets, call, x, t, inputs, rows, parts))
        if adapters:
            if call == 0:  # the features of this request's images
                self._features = {k: a(adapter_input(a.config, self.images[k]))
                                  for k, a in adapters}
            summed = None
            for k, _ in adapters:
                scales = self._row_scales(call, k, rows, x.shape[0], parts).expand(x.shape[0], -1)
                scales = scales.to(x.dtype)[:, :, None, None, None]  # (rows·B, n + 1, 1, 1, 1)
                f = [self._in_region(k, self._rows(feature, rows, parts) * scales[:, i])
                     for i, feature in enumerate(self._features[k])]
                summed = f if summed is None else [a + b for a, b in zip(summed, f)]
            out["adapter_features"] = summed
        return out

    def _in_region(self, k, t):
        """A residual (or feature) ``t`` (B, C, h, w) of net ``k`` weighed by its region."""
        if not self.regions or self.regions[k] is None:
            return t
        h, w = t.shape[2:]
        weights = self.regions[k][:, grid_slice(self.grids, h * w)]
        return t * weights.view(1, 1, h, w).to(t.dtype)

    def _row_scales(self, call, k, rows, batch, parts=None):
        """Net k's factors on call ``call``: (n + 1,) for one half, else per sample."""
        if rows == 1:
            return self.scales[call, k, 1]
        if parts is not None:  # B unconditional rows, then one per part
            factors = self.scales[call, k]
            return torch.cat([factors[:1].expand(batch - len(parts), -1),
                              factors[1:].expand(len(parts), -1)])
        return self.scales[call, k].repeat_interleave(batch // 2, dim=0)

    @staticmethod
    def _rows(t, rows, parts=None, conditional=False):
        """Per-image ``t`` (B, ...) for each row of a UNet call of ``rows`` halves (only the
        conditional one: ``conditional``), or of composable ``parts``."""
        if parts is not None:
            return t[parts] if conditional else torch.cat([t, t[parts]])
        return t if conditional else t.repeat(rows, *(1,) * (t.dim() - 1))

    def _controlnets(self, nets, call, x, t, inputs, rows, parts=None):
        if isinstance(nets[0][1], FusedControlNet):
            return self._fused(nets, call, x, rows, parts)
        half = rows == 2 and self.guess_mode
        uncond = self.images[0].shape[0]  # the unconditional rows come first, one per image
        if half:  # the conditional rows only (of what a ControlNet reads: not image tokens)
            x = x[uncond:]
            inputs = {k: inputs[k][uncond:] for k in CONTROLNET_INPUTS
                      if inputs.get(k) is not None}
        copies = 1 if half else rows
        down = mid = None
        for k, net in nets:
            scales = self._row_scales(call, k, copies, x.shape[0], None if half else parts)
            n = net.num_residuals + 1
            d, m = net(x, t, inputs["encoder_hidden_states"],
                       self._rows(self.images[k], copies, parts, half), scales[..., :n],
                       text_embeds=inputs.get("text_embeds"), time_ids=inputs.get("time_ids"))
            d, m = [self._in_region(k, r) for r in d], self._in_region(k, m)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if half:
            down = [torch.cat([d.new_zeros((uncond, *d.shape[1:])), d]) for d in down]
            mid = torch.cat([mid.new_zeros((uncond, *mid.shape[1:])), mid])
        return {"down_residuals": down, "mid_residual": mid}

    def _fused(self, nets, call, x, rows, parts=None):
        """The inputs of a UNet that runs its ControlNets and T2I-Adapters itself
        (``FusedControlNet``), per kind of net (``FUSED_INPUTS``): the images (count, rows·B,
        3, H, W), each net's for every row, and the scales (count,), each one's on this call;
        a net of that UNet the request does not run gets a zero scale (and a blank image)."""
        out = {}
        for kind, (images_name, scales_name) in FUSED_INPUTS.items():
            of_kind = [(k, n) for k, n in nets if n.kind == kind]
            if not of_kind:
                continue
            count, image = of_kind[0][1].count, self.images[of_kind[0][0]]
            images = image.new_zeros((count, x.shape[0], *image.shape[1:]))
            scales = torch.zeros(count, dtype=image.dtype, device=image.device)
            for k, net in of_kind:
                factors = self._row_scales(call, k, rows, x.shape[0], parts)
                factors = factors[..., :net.factors]
                if not bool((factors == factors.reshape(-1)[0]).all()):
                    raise SdrtError(f"{net.name!r} runs inside the exported UNet at one scale "
                                    "for every output and row; these settings need another "
                                    "per row or output: use --runtime torch")
                images[net.index] = self._rows(self.images[k], rows, parts)
                scales[net.index] = factors.reshape(-1)[0]
            out.update({images_name: images, scales_name: scales})
        return out


def check_fused(nets, guess_mode, modes, masks):
    """A request's settings fit ControlNets that run inside the UNet (``FusedControlNet``):
    one image and one scale per net for the whole batch, each net at most once."""
    fused = [n for n in nets if isinstance(n, FusedControlNet)]
    if not fused:
        return
    why = ("guess_mode" if guess_mode else
           "control_mode" if any(m != "balanced" for m in modes) else
           "control_mask" if any(m is not None for m in masks) else None)
    if why:
        raise SdrtError(f"{why} needs --runtime torch: the exported UNet runs each ControlNet "
                        "at one scale on every row and position")
    indices = [(n.kind, n.index) for n in fused]
    if len(set(indices)) != len(indices):
        raise SdrtError("a ControlNet of the exported UNet runs once per call: the request "
                        "names one of them twice")


def guided(unet, cond, guidance_scale, cfg, dtype, timestep_cond=None, image_cond=None,
           control: Control = None, combine=None, pag_scale=0.0, rescale=None):
    """The model a sampler calls: the UNet on the ``Conditioning`` ``cond`` (its fields as the
    UNet's named inputs; for A1111's prompt editing a list with one per UNet call, or a
    function of the call's index), with classifier-free guidance when ``cfg``.

    A guidance-distilled UNet (LCM) instead takes its scales as ``timestep_cond``, the
    (B, time_cond_proj_dim) ``guidance_embedding``, and runs without ``cfg``.

    An inpainting UNet also takes ``image_cond``, (B, C, h, w) in ``dtype``: the mask and the
    masked image's latents (``inpaint_conditioning``), joined to the sampler's (scaled) input
    along the channels on every call, as diffusers' inpainting pipeline joins them.

    ``control``: ControlNets whose residuals the UNet adds on every call (``Control``); they
    see the latents without ``image_cond``. Its calls are counted from this model's first,
    as are those of the IP-Adapters' scale table (``cond.image_scales``, (B, calls, layers,
    adapters)):
    call i gets its column.

    With guidance, one UNet call runs the unconditional and conditional halves of ``cond``
    (``[negative..., positive...]``, diffusers' order) and combines them as
    ``uncond + scale · (cond − uncond)``. ``combine`` (A1111's composable diffusion): the
    conditional rows are parts, ``(image, weight)`` device tensors of one entry per part, and
    image i gets ``uncond_i + scale_i · Σ weight · (part − uncond_i)`` over its parts (one
    UNet call runs the unconditional rows and every part). ``guidance_scale`` is a float32
    device tensor of shape (B, 1, 1, 1), one scale per image (the static runtime's buffer, so
    a new scale needs no recapture); the combination is computed in float32.

    ``model(x, t, uncond=True)`` (for the CFG++ samplers) returns (the guided output, the
    unconditional rows' output); it needs ``cfg``.

    ``pag_scale`` above 0: perturbed-attention guidance (Ahn et al. 2024), as diffusers' PAG
    pipelines and ComfyUI's PerturbedAttentionGuidance run it: the call also runs the
    conditional rows again with the mid block's self-attentions giving their values
    (``perturbed``), and adds ``pag_scale · (cond − perturbed)``. The call's inputs (the
    IP-Adapters' image tokens too), and its ControlNets' and adapters' (with guidance), are
    the conditional rows' once more (no composable parts with it).

    ``rescale`` (with ``cfg``): ``guidance_rescaler``'s function, applied to the guided output
    and the conditional one (with ``combine``: the parts' sum at scale 1); diffusers' PAG
    pipelines rescale after adding PAG's term, ComfyUI's nodes before (``rescale.after_pag``).
    """
    fixed = cond.unet_inputs() if isinstance(cond, Conditioning) else None
    calls = itertools.count()

    def run(x, t, rows, parts=None, perturb=0, **extra):
        x = x.to(dtype)
        call = next(calls)
        if isinstance(cond, list) and call >= len(cond):
            raise SdrtError(f"prompt editing covers {len(cond)} UNet calls; the sampler made "
                            f"more")
        inputs = dict(fixed if fixed is not None else
                      (cond[call] if isinstance(cond, list) else cond(call)).unet_inputs())
        if perturb:  # (the ``perturb`` conditional rows again, mid self-attentions perturbed)
            inputs = {k: _last_rows_again(v, perturb) for k, v in inputs.items()}
            extra["perturbed"] = torch.arange(x.shape[0], device=x.device) >= \
                x.shape[0] - perturb
        table = inputs.pop("image_scales", None)
        if table is not None:
            if call >= table.shape[1]:
                raise SdrtError(f"IP-Adapter scales cover {table.shape[1]} UNet calls; the "
                                f"sampler made more")
            extra["image_scales"] = table[:, call]
        if control is not None:
            extra.update(control.residuals(call, x, t, inputs, rows, parts))
        if image_cond is not None:
            x = torch.cat([x, Control._rows(image_cond, rows, parts)], dim=1)
        return unet(x, t, **inputs, **extra)

    def model(x, t, uncond=False):
        if uncond and (timestep_cond is not None or not cfg):
            raise SdrtError("a CFG++ sampler needs the unconditional pass; this model runs "
                            "none (a guidance-distilled UNet, or no guidance)")
        if timestep_cond is not None:
            return run(x, t, 1, timestep_cond=timestep_cond)
        if pag_scale:
            b = x.shape[0]
            if not cfg:
                positive, perturbed = run(torch.cat([x, x]), t, 2, perturb=b).chunk(2)
                return positive + pag_scale * (positive.float() - perturbed.float())
            # (the conditional rows twice: composable parts of their own images, which a
            # ControlNet's residuals follow)
            twice = torch.arange(b, device=x.device).repeat(2)
            negative, positive, perturbed = run(torch.cat([x, x, x]), t, 2, parts=twice,
                                                perturb=b).float().chunk(3)
            out = negative + guidance_scale * (positive - negative)
            if rescale is not None and not rescale.after_pag:
                out = rescale(out, positive, x, t)
            out = out + pag_scale * (positive - perturbed)
            if rescale is not None and rescale.after_pag:
                out = rescale(out, positive, x, t)
            return (out, negative) if uncond else out
        if not cfg:
            return run(x, t, 1)
        if combine is not None:
            image, weight = combine
            out = run(torch.cat([x, x[image]]), t, 2, parts=image).float()
            negative, parts = out[:x.shape[0]], out[x.shape[0]:]
            summed = torch.zeros_like(negative).index_add_(0, image,
                                                           (parts - negative[image]) * weight)
        else:
            negative, positive = run(torch.cat([x, x]), t, 2).chunk(2)
            summed = positive - negative
        out = negative + guidance_scale * summed
        if rescale is not None:
            out = rescale(out, negative + summed if combine is not None else positive, x, t)
        return (out, negative) if uncond else out
    return model


def guidance_rescaler(schedule, factor, style="diffusers"):
    """The rescale of classifier-free guidance's output (Lin et al. 2023, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", section 3.4) for ``guided``, None for a
    ``factor`` of 0: the guided output scaled by ``factor · std(cond) / std(guided) + 1 −
    factor``, each std over one image's values (Bessel-corrected).

    ``style`` "diffusers" (its pipelines' ``guidance_rescale``): the stds of the UNet's own
    outputs (noise or velocity). "comfy" (ComfyUI's RescaleCFG node): of the velocities the
    outputs predict, whatever the model predicts, so a noise (x0) prediction ``o`` is shifted
    by ``c·x`` first (c = −σ_t, −α_t at the call's timestep; alpha-bar interpolated in log
    sigma between the training levels, as the samplers place fractional timesteps) and back
    after: v = (o + c·x)/α_t for noise. The same as "diffusers" for a v-prediction UNet.
    """
    if not factor:
        return None
    cfg = schedule.config
    shift = None
    if style == "comfy" and cfg.prediction_type != "v_prediction":
        if schedule.sigma_data is not None or cfg.timestep_type == "continuous":
            raise SdrtError("guidance_rescale_style 'comfy' needs a model on discrete training "
                            "timesteps (not an EDM or continuous-time one)")
        shift = _velocity_shift(cfg, schedule.timesteps.device)

    def rescale(out, cond, x, t):
        if shift is not None:
            c = shift(t) * x.float()
            out, cond = out + c, cond + c
        dims = tuple(range(1, out.ndim))
        out = out * (factor * cond.std(dims, keepdim=True) / out.std(dims, keepdim=True)
                     + (1 - factor))
        return out if shift is None else out - c
    rescale.after_pag = style == "diffusers"
    return rescale


def _velocity_shift(cfg, device):
    """t → c, the factor of x that turns this config's UNet output into a multiple of the
    velocity it predicts: −σ_t (noise) or −α_t (clean latents), for fractional t too."""
    from .schedules import train_alphas_cumprod
    a = train_alphas_cumprod(cfg).double().clamp(min=2**-24)
    log_sigma = (0.5 * ((1 - a) / a).log()).float().to(device)
    last = len(log_sigma) - 2
    noise = cfg.prediction_type == "epsilon"

    def shift(t):
        # (one timestep or one per row; indexed by a tensor, so nothing waits on the device)
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        low = t.floor().clamp(0, last)
        w = (t - low).clamp(0, 1)
        low = low.long()
        # alpha_t² = sigmoid(−2 log σ), σ_t² = sigmoid(2 log σ) (x_vp = α_t x0 + σ_t eps)
        two_log = 2 * ((1 - w) * log_sigma[low] + w * log_sigma[low + 1])
        return -torch.sigmoid(two_log if noise else -two_log).sqrt().view(-1, 1, 1, 1)
    return shift


def _last_rows_again(value, k):
    """A UNet input with its last ``k`` rows appended once more: a tensor, or each tensor of
    a tuple (the IP-Adapters' image tokens and region weights, one per adapter)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value[-k:]])
    if isinstance(value, tuple):
        return tuple(_last_rows_again(v, k) for v in value)
    return value


def inpainting_unet(unet):
    """Whether ``unet`` takes a mask and masked-image latents besides the latents."""
    return unet.config.in_channels != unet.config.out_channels


def starts_from_noise(strength, masked):
    """Whether denoising starts from pure noise: text to image (``strength`` None), or
    inpainting (``masked``) at full strength, as diffusers' inpainting pipelines start."""
    return strength is None or (masked and strength == 1.0)


def inpaint_conditioning(mask, masked_latents):
    """An inpainting UNet's extra input: the (B, 1, h, w) mask (1 where the image is
    repainted) at the latents' size, then the (B, C, h, w) latents of the masked image."""
    return torch.cat([mask.to(masked_latents.dtype), masked_latents], dim=1)


def keep_unmasked(schedule, x0, noise, mask, step_end):
    """The sampler's per-step hook for inpainting with a UNet that sees no mask (diffusers'
    4-channel path): after step i, where ``mask`` is 0 the latents become the init image's
    ``x0`` noised along ``noise`` to step i + 1's level (the clean ``x0`` after the last
    step); then ``step_end``, the caller's hook, sees them."""
    def keep(i, t, x):
        known = schedule.noise_to(x0, noise, i + 1).float()
        x = (1 - mask) * known + mask * x
        out = None if step_end is None else step_end(i, t, x)
        return x if out is None else out
    return keep


def row_scales(scales, device):
    """Per-image guidance scales → the (B, 1, 1, 1) float32 tensor ``guided`` takes."""
    return torch.tensor(scales, dtype=torch.float32).reshape(-1, 1, 1, 1).to(device)


def guidance_embedding(scales, dim):
    """Per-image guidance scales → the (B, dim) float32 embedding a guidance-distilled UNet
    takes as ``timestep_cond``: sinusoidal features of w = 1000 (scale - 1) (diffusers'
    ``get_guidance_scale_embedding``, after the VDM code), computed on the CPU as diffusers
    does, so both give the same numbers."""
    # scale - 1 in double precision, then float32: diffusers' torch.tensor(guidance_scale - 1)
    w = torch.tensor([s - 1 for s in scales], dtype=torch.float32) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32)
                     * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))  # an odd dim gets a zero column


def blank_inpaint_conditioning(vae, vae_dtype, device, batch, height, width, dtype):
    """An inpainting UNet's ``image_cond`` when nothing is given to inpaint (text to image, as
    A1111 runs such a model): everything masked, and the latents of a mid-grey image (0 in
    [-1, 1]; the VAE posterior's mean, so no draw), (batch, 1 + C, h, w) in ``dtype``."""
    mean, _ = vae.encode(torch.zeros(1, 3, height, width, dtype=vae_dtype, device=device))
    latents = scale_latents(vae, mean)
    mask = torch.ones(1, 1, *latents.shape[2:], device=device)
    return inpaint_conditioning(mask, latents).to(dtype).repeat(batch, 1, 1, 1)


def _latent_stats(vae, like):
    """The VAE's (shift, scale) of its latents, broadcastable over ``like`` (B, C, h, w):
    per channel with latents_mean/latents_std (as diffusers' SDXL pipelines apply them),
    else the shift_factor and scaling_factor."""
    cfg = vae.config
    if cfg.latents_mean is None:
        return cfg.shift_factor or 0.0, cfg.scaling_factor
    return _channel_stats(cfg.latents_mean, cfg.latents_std, cfg.scaling_factor, like.dtype,
                          like.device)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean, std, scaling_factor, dtype, device):
    """(mean, scaling_factor / std) as (1, C, 1, 1) tensors, made once per dtype and device:
    a static plan's warm-up makes them, so its CUDA graph capture copies nothing in."""
    stats = torch.tensor([mean, std], dtype=torch.float64).view(2, 1, -1, 1, 1)
    return stats[0].to(device, dtype), (scaling_factor / stats[1]).to(device, dtype)


def scale_latents(vae, z):
    """The VAE's latents (a posterior sample or mean) → the scaled latents the UNet denoises."""
    shift, scale = _latent_stats(vae, z)
    return (z - shift) * scale


def vae_decode(vae, latents):
    """Scaled latents → image (B, 3, H, W), nominally in [-1, 1]."""
    shift, scale = _latent_stats(vae, latents)
    return vae.decode(latents / scale + shift)


def to_unit_images(image):
    """(B, 3, H, W) in [-1, 1] → float32 (B, H, W, 3) in [0, 1], as diffusers' ``"np"``."""
    return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def slerp_a1111(val, low, high):
    """A1111's ``slerp`` of two noise tensors of one image (C, H, W), as its variation seed
    runs it: spherical interpolation by ``val`` (0: ``low``, 1: ``high``) of each column's
    vector along H (the norms and angles are taken along dim 1, as A1111 takes them on an
    unbatched tensor); where the mean cosine is above 0.9995, A1111's linear blend, whose
    weights run the other way: ``low · val + high · (1 − val)``."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(val * omega) / so).unsqueeze(1) * high


def vary_noise(noise, subseeds, strength):
    """A1111's variation seed on float32 unit noise (B, C, h, w): image i's slerped
    (``slerp_a1111``) by ``strength`` towards the noise a fresh CPU generator seeded
    ``subseeds[i]`` draws."""
    return torch.stack([slerp_a1111(strength, n, torch.randn(
        n.shape, generator=torch.Generator("cpu").manual_seed(s))) for n, s in
        zip(noise, subseeds)])


def centred_noise(noise, small):
    """A1111's "Resize seed from" (``ImageRNG.first``): ``noise`` (B, C, H, W) with ``small``
    (B, C, h, w), the noise the same seed drew at another size, pasted over its centre, the
    offsets floored as A1111 floors them (a side larger than this one is cut to fit, an odd
    difference one row or column short of filling it)."""
    (height, width), (h, w) = noise.shape[2:], small.shape[2:]
    dx, dy = (width - w) // 2, (height - h) // 2
    w, h = (w if dx >= 0 else w + 2 * dx), (h if dy >= 0 else h + 2 * dy)
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    out = noise.clone()
    out[:, :, ty:ty + h, tx:tx + w] = small[:, :, sy:sy + h, sx:sx + w]
    return out


def copy_generator(generator):
    """A CPU generator (or list of them) in the state ``generator`` is in: what it would draw,
    drawn without moving it on."""
    if isinstance(generator, list):
        return [copy_generator(g) for g in generator]
    twin = torch.Generator("cpu")
    twin.set_state(generator.get_state())
    return twin


def cpu_randn(shape, generator, dtype=torch.float32):
    """Unit noise drawn on a CPU generator, as diffusers draws it with one: the same seed gives
    the same noise whatever device the model runs on.

    ``generator`` may be a list with one generator per row of ``shape``: row i is drawn from
    generator i (as diffusers' ``randn_tensor`` does with a list), so a row's noise does not
    depend on the other rows.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise SdrtError(f"generator must be one CPU torch.Generator or a list of "
                            f"{shape[0]} (one per image), got a list of {len(generator)}")
        return torch.cat([cpu_randn((1, *shape[1:]), g, dtype) for g in generator])
    if generator.device.type != "cpu":
        raise SdrtError("generator must be a CPU torch.Generator (noise is drawn on the CPU so "
                        "that a seed gives the same image on every device)")
    return torch.randn(shape, generator=generator, dtype=dtype)
