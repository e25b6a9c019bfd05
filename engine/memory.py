"""What a model and a request cost in memory, counted from the configs, against what the device
has: refused up front, with the numbers, instead of an allocation that never ends.

- ``parameter_count(component, config)``: the parameters of one network, counted from its
  (checked) config, without building it. ``tests/test_request.py`` checks each count against
  the module built on the meta device.
- ``request_bytes(...)``: an upper estimate of a request's peak activations, phase by phase
  (text encoder, UNet, VAE decode, VAE encode for image-to-image). The weights are not in it:
  they are already loaded, so the device's available memory excludes them.
- ``available_bytes(device)``: CPU: ``MemAvailable`` of /proc/meminfo (or the free pages the
  OS reports); CUDA: free device memory plus what torch's caching allocator holds unused.
- ``check_model_fits`` / ``check_request_fits``: the checks, against ``Limits``.
"""
import os

import torch

from .errors import SdrtError
from .request import Limits

TEXT_TOKENS = 77   # CLIP's sequence: a request encodes 77 tokens per prompt and chunk
SLACK = 1.25       # allocator rounding and fragmentation, and the estimate's own looseness


# --- parameters -------------------------------------------------------------------------------

def _conv(c_in, c_out, k=3):
    return c_in * c_out * k * k + c_out


def _linear(c_in, c_out, bias=True):
    return c_in * c_out + (c_out if bias else 0)


def _resnet(c_in, c_out, temb):
    """ResnetBlock2D: two GroupNorms, two 3×3 convs, the time projection, a 1×1 shortcut."""
    return (2 * c_in + _conv(c_in, c_out) + (_linear(temb, c_out) if temb else 0)
            + 2 * c_out + _conv(c_out, c_out) + (_conv(c_in, c_out, 1) if c_in != c_out else 0))


def _transformer(c, heads, context, layers):
    """Transformer2DModel: GroupNorm, projections in and out, ``layers`` BasicTransformerBlocks
    (self-attention, cross-attention, GEGLU feed-forward of 4c, three LayerNorms)."""
    inner = heads * (c // heads)
    block = (3 * 2 * c                                          # norm1, norm2, norm3
             + 3 * _linear(c, inner, False) + _linear(inner, c)  # attn1
             + _linear(c, inner, False) + 2 * _linear(context, inner, False)
             + _linear(inner, c)                                 # attn2
             + _linear(c, 8 * c) + _linear(4 * c, c))            # ff: GEGLU proj, out
    return 2 * c + 2 * _linear(c, c) + layers * block


def unet_parameters(cfg):
    ch, n = list(cfg.block_out_channels), len(cfg.block_out_channels)
    heads = cfg.heads
    down_layers, mid_layers, up_layers = cfg.transformer_layers
    temb, per = ch[0] * 4, cfg.layers_per_block
    total = _conv(cfg.in_channels, ch[0]) + _linear(ch[0], temb) + _linear(temb, temb)
    if getattr(cfg, "time_cond_proj_dim", None):  # LCM's guidance-embedding projection
        total += cfg.time_cond_proj_dim * ch[0]
    if cfg.addition_embed_type == "text_time":  # SDXL's add_embedding (add_time_proj: none)
        total += _linear(cfg.projection_class_embeddings_input_dim, temb) + _linear(temb, temb)
    for i, kind in enumerate(cfg.down_block_types):
        resnet_in = [ch[max(i - 1, 0)]] + [ch[i]] * (per - 1)
        total += sum(_resnet(c, ch[i], temb) for c in resnet_in)
        if kind.startswith("CrossAttn"):
            total += sum(_transformer(ch[i], heads[i], cfg.cross_attention_dim, depth)
                         for depth in down_layers[i])
        total += _conv(ch[i], ch[i]) if i < n - 1 else 0
    if cfg.mid_block_type:
        total += 2 * _resnet(ch[-1], ch[-1], temb)
        total += _transformer(ch[-1], heads[-1], cfg.cross_attention_dim, mid_layers)
    rch, prev = ch[::-1], ch[-1]
    for i, kind in enumerate(cfg.up_block_types):
        out, skip_in = rch[i], rch[min(i + 1, n - 1)]
        resnet_in = [(prev if j == 0 else out) + (skip_in if j == per else out)
                     for j in range(per + 1)]
        total += sum(_resnet(c, out, temb) for c in resnet_in)
        if kind.startswith("CrossAttn"):
            total += sum(_transformer(out, heads[n - 1 - i], cfg.cross_attention_dim, depth)
                         for depth in up_layers[i])
        total += _conv(out, out) if i < n - 1 else 0
        prev = out
    return total + 2 * ch[0] + _conv(ch[0], cfg.out_channels)


def _vae_mid(c):
    # Two ResNet blocks around one single-head attention with biases and its own GroupNorm.
    return 2 * _resnet(c, c, 0) + 2 * c + 4 * _linear(c, c)


def vae_parameters(cfg):
    ch, n, per, lc = (list(cfg.block_out_channels), len(cfg.block_out_channels),
                      cfg.layers_per_block, cfg.latent_channels)
    mid = _vae_mid(ch[-1]) if cfg.mid_block_add_attention else 2 * _resnet(ch[-1], ch[-1], 0)
    encoder = _conv(cfg.in_channels, ch[0]) + mid + 2 * ch[-1] + _conv(ch[-1], 2 * lc)
    for i in range(n):
        encoder += sum(_resnet(c, ch[i], 0) for c in [ch[max(i - 1, 0)]] + [ch[i]] * (per - 1))
        encoder += _conv(ch[i], ch[i]) if i < n - 1 else 0
    rch = ch[::-1]
    decoder = _conv(lc, rch[0]) + mid + 2 * rch[-1] + _conv(rch[-1], cfg.out_channels)
    for i in range(n):
        decoder += sum(_resnet(c, rch[i], 0) for c in [rch[max(i - 1, 0)]] + [rch[i]] * per)
        decoder += _conv(rch[i], rch[i]) if i < n - 1 else 0
    quant = (_conv(2 * lc, 2 * lc, 1) if cfg.use_quant_conv else 0) + \
        (_conv(lc, lc, 1) if cfg.use_post_quant_conv else 0)
    return encoder + decoder + quant


def text_parameters(cfg):
    d, inner = cfg.hidden_size, cfg.intermediate_size
    layer = 4 * _linear(d, d) + 4 * d + _linear(d, inner) + _linear(inner, d)
    total = (cfg.vocab_size + cfg.max_position_embeddings) * d + cfg.num_hidden_layers * layer \
        + 2 * d
    if getattr(cfg, "with_projection", False):  # text_projection (projection_dim, D), no bias
        total += _linear(d, cfg.projection_dim, bias=False)
    return total


_COUNTS = {"unet": unet_parameters, "vae": vae_parameters, "text_encoder": text_parameters,
           "text_encoder_2": text_parameters}


def parameter_count(component, cfg):
    """Parameters of ``component`` ("unet", "vae" or "text_encoder") with config ``cfg`` (a
    checked ``UNetConfig``, ``VAEConfig`` or ``TextConfig``), without building it."""
    return _COUNTS[component](cfg)


# --- the device -------------------------------------------------------------------------------

def available_bytes(device):
    """Memory the device can still give, in bytes; None where the OS does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free to this process.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _budget(device, limits: Limits):
    """(bytes a request or model may plan to use, how that was decided) or (None, None)."""
    if limits.memory_bytes is not None:
        return limits.memory_bytes, "SDRT_MEMORY_BYTES / Limits.memory_bytes"
    available = available_bytes(device)
    if available is None:
        return None, None
    return int(available * limits.memory_fraction), (
        f"{limits.memory_fraction:.0%} of the {gib(available)} {torch.device(device).type} "
        f"memory available")


def gib(n):
    return f"{n / 2 ** 30:.3g} GiB" if n < 2 ** 40 else f"{n / 2 ** 40:.3g} TiB"


_RAISE = ("raise the limit with SDRT_MEMORY_FRACTION or SDRT_MEMORY_BYTES (or Pipeline.limits) "
          "if the estimate is wrong")


def check_model_fits(configs, dtype, device, limits: Limits, where):
    """Refuse a model whose configs (checked ``UNetConfig``, ``VAEConfig``, ``TextConfig`` by
    component) describe more parameters than ``limits.max_parameters``, or weights that do not
    fit the device's memory, before any of it is built. Returns the parameter count."""
    counts = {c: parameter_count(c, cfg) for c, cfg in configs.items()}
    total = sum(counts.values())
    parts = ", ".join(f"{c} {n:.3g}" for c, n in counts.items())
    if total > limits.max_parameters:
        raise SdrtError(f"{where}: the configs describe a model of {total:.3g} parameters "
                        f"({parts}); the limit is {limits.max_parameters:.3g} "
                        f"(SDRT_MAX_PARAMETERS)")
    need = total * torch.empty((), dtype=dtype).element_size()
    budget, source = _budget(device, limits)
    if budget is not None and need > budget:
        raise SdrtError(f"{where}: the weights need {gib(need)} in {dtype} ({total:.3g} "
                        f"parameters: {parts}), but the budget is {gib(budget)} ({source}); "
                        f"{_RAISE}")
    return total


def fused_attention(unet, device, dtype):
    """Whether the UNet's attention runs sdrt's Triton flash kernel, which never holds a score
    matrix: an sdrt module, in fp16 or bf16, on CUDA (or with SDRT_BACKEND=triton), with
    every head dim within the kernel's."""
    from sdrt.kernels import backend
    from sdrt.kernels.attention import MAX_HEAD_DIM
    if not isinstance(unet, torch.nn.Module) or dtype not in (torch.float16, torch.bfloat16):
        return False
    name = backend()
    if name == "torch" or (name == "auto" and torch.device(device).type != "cuda"):
        return False
    cfg = unet.config
    return all(c // h <= MAX_HEAD_DIM for c, h in zip(cfg.block_out_channels, cfg.heads))


# --- a request --------------------------------------------------------------------------------

def _halve(side):
    return (side + 1) // 2  # a stride-2 3×3 conv with padding 1, or the VAE's (0, 1) padding


def _unet_phase(cfg, h, w, rows, size, fused, keys=TEXT_TOKENS, controlled=False):
    """(bytes, what dominates) of one UNet call on ``rows`` latents of h×w; ``controlled``:
    with ControlNets, whose residuals (one per skip tensor, summed over the nets) wait for
    the UNet while a ControlNet's own down path holds as many again."""
    ch, n = list(cfg.block_out_channels), len(cfg.block_out_channels)
    heads = cfg.heads
    sides = [(h, w)]
    for _ in range(n - 1):
        sides.append((_halve(sides[-1][0]), _halve(sides[-1][1])))
    pixels = [a * b for a, b in sides]
    # The down path's outputs wait for the up path: conv_in's, each ResNet's, each downsample's.
    skips = ch[0] * pixels[0] + sum(cfg.layers_per_block * ch[i] * pixels[i]
                                    + (ch[i] * pixels[i + 1] if i < n - 1 else 0)
                                    for i in range(n))
    work, scores = 0, 0
    for i, (down, up) in enumerate(zip(cfg.down_block_types, reversed(cfg.up_block_types))):
        c, p = ch[i], pixels[i]
        # A ResNet block on the up path reads 2c channels (the skip concatenated); the torch
        # GroupNorm+SiLU+conv holds its normalised, activated and convolved tensors at once.
        level = 8 * c * p
        mid = i == n - 1 and cfg.mid_block_type
        if down.startswith("CrossAttn") or up.startswith("CrossAttn") or mid:
            # Tokens (p, c): the GEGLU projection (8c), its product (4c), q, k, v, the residual.
            level = max(level, 16 * c * p)
            if not fused:
                scores = max(scores, rows * heads[i] * p * max(p, keys) * 4)
        work = max(work, level)
    activations = rows * size * (skips * (3 if controlled else 1) + work)
    if scores > activations:
        return activations + scores, f"the UNet's attention scores at {h}x{w} latents"
    return activations + scores, "the UNet's activations"


def _vae_phase(cfg, h, w, batch, size, encode):
    """(bytes, what dominates) of the VAE decoding (or encoding) ``batch`` images of h×w
    latents: ResNet blocks at each resolution, and the mid block's single-head attention over
    every latent pixel, which the reference attention computes as one (h·w)² score matrix."""
    ch = list(cfg.block_out_channels)
    order = ch if encode else ch[::-1]
    n = len(order)
    work = 0
    for i, c in enumerate(order):
        # Decoder block i runs at 2^i times the latent side, encoder block i at 2^(n-1-i); each
        # reads the previous block's channels (upsampled or downsampled) and writes c.
        shift = n - 1 - i if encode else i
        work = max(work, 6 * max(c, order[max(i - 1, 0)]) * (h << shift) * (w << shift))
    scale = 2 ** (n - 1)
    pixels = h * w
    scores = batch * pixels * pixels * 4 if cfg.mid_block_add_attention else 0
    # Plus the image, three times in float32: the decoder's output, [0, 1] and (B, H, W, 3).
    activations = batch * size * work + batch * 3 * pixels * scale * scale * 4 * 3
    name = "encoder" if encode else "decoder"
    if scores > activations:
        return activations + scores, f"the VAE {name}'s attention scores at {h}x{w} latents"
    return activations + scores, f"the VAE {name}'s activations"


def _vae_tiles(cfg, h, w, batch, size, encode, tile):
    """``_vae_phase``, or with ``tile`` (the tiles' latent side) one tile's and every decoded
    tile held at once before they are blended (each covers 4/3 of its share of each side, in
    float32 at most)."""
    if tile is None or max(h, w) <= tile:
        return _vae_phase(cfg, h, w, batch, size, encode)
    need, what = _vae_phase(cfg, min(h, tile), min(w, tile), batch, size, encode)
    pixels = h * w * (1 if encode else cfg.scale_factor ** 2)
    channels = 2 * cfg.latent_channels if encode else 3
    return need + batch * channels * pixels * 16 // 9 * 4 * 2, what + " (tiled)"


def _text_phase(cfg, rows, size):
    t = TEXT_TOKENS  # each chunk is its own row of 77 tokens
    return (rows * t * (cfg.intermediate_size + 4 * cfg.hidden_size) * size
            + rows * cfg.num_attention_heads * t * t * 4), "the text encoder"


def request_bytes(unet_cfg, vae_cfg, text_cfg, height, width, batch, guidance, dtype,
                  fused_attention=False, has_image=False, num_chunks=1, vae_dtype=None,
                  controlled=False, vae_tile=None, pag=False):
    """(bytes, what dominates): an upper estimate of a request's peak memory beyond the
    weights; ``vae_dtype`` is the VAE's where it differs (an SDXL VAE upcast to float32). ``text_cfg``: the text encoder's config, or a list of them (SDXL's two run one
    after the other; their states are held side by side). ``num_chunks``: 77-token text
    chunks per prompt (A1111 syntax), each a text encoder row and 77 more keys for the UNet's
    cross-attention. ``fused_attention``: whether the UNet's attention runs a fused kernel that never
    holds the score matrix (sdrt's Triton flash attention on a GPU); otherwise each attention's
    scores are counted once, in float32, as ``F.scaled_dot_product_attention``'s math path
    holds them. ``controlled``: the UNet's calls run with ControlNets (``_unet_phase``).
    ``vae_tile``: the latent side of the VAE's tiles when it runs tiled (``vae.tiled``), or
    None. ``pag``: perturbed-attention guidance runs the conditional rows once more."""
    size = torch.empty((), dtype=dtype).element_size()
    f = vae_cfg.scale_factor
    h, w = height // f, width // f
    rows = batch * (2 if guidance else 1)
    unet_rows = rows + (batch if pag else 0)
    texts = list(text_cfg) if isinstance(text_cfg, (list, tuple)) else [text_cfg]
    vae_size = size if vae_dtype is None else torch.empty((), dtype=vae_dtype).element_size()
    phases = [max(_text_phase(t, rows * num_chunks, size) for t in texts),
              _unet_phase(unet_cfg, h, w, unet_rows, size, fused_attention,
                          TEXT_TOKENS * num_chunks, controlled),
              _vae_tiles(vae_cfg, h, w, batch, vae_size, False, vae_tile)]
    if has_image:
        phases.append(_vae_tiles(vae_cfg, h, w, batch, vae_size, True, vae_tile))
    # Held throughout: noise, latents, the sampler's float32 copies and history, text states.
    held = rows * unet_cfg.in_channels * h * w * 4 * 8 + rows * num_chunks * TEXT_TOKENS * \
        sum(t.hidden_size for t in texts) * size
    peak, what = max(phases)
    return int((peak + held) * SLACK), what


def check_request_fits(need, what, describe, device, limits: Limits):
    """Refuse a request whose estimate ``need`` (from ``request_bytes``) is over budget."""
    budget, source = _budget(device, limits)
    if budget is not None and need > budget:
        raise SdrtError(f"{describe} needs about {gib(need)} (mostly {what}), but the budget "
                        f"is {gib(budget)} ({source}); ask for fewer or smaller images, or "
                        f"{_RAISE}")
