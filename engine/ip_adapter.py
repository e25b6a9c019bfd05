"""IP-Adapter: an image as a prompt (Ye et al. 2023, h94/IP-Adapter), as diffusers'
``load_ip_adapter`` runs it.

A CLIP image encoder reads the reference image; the adapter's projection turns what it reads
into a few tokens of the UNet's cross-attention width; every cross-attention layer of the
UNet then attends to those tokens with keys and values of its own (``to_k_ip``, ``to_v_ip``)
and adds the result, times the adapter's scale, to its attention over the text:
``attn(q, K_text, V_text) + scale · attn(q, K_image, V_image)`` before ``to_out``.

Three projections, told apart by their weights, in the original repository's names (the
``.safetensors`` files people download: ``ip-adapter_sd15``, ``ip-adapter-plus_sd15``,
``ip-adapter-plus-face_sd15``, ``ip-adapter-full-face_sd15``, ``ip-adapter_sdxl``,
``ip-adapter_sdxl_vit-h``, ``ip-adapter-plus_sdxl_vit-h``, ...):

- plain (``image_proj.proj``, ``image_proj.norm``): the projected image embedding → 4 tokens;
- plus (``image_proj.latents``, a Perceiver resampler): the encoder's penultimate states →
  16 tokens (as many as ``latents`` has rows);
- full (``image_proj.proj.0``/``.2``/``.3``, an MLP): the penultimate states → one token each.

The reference image's tokens are the conditional rows' image tokens; the unconditional rows
(CFG) get those of a zero embedding (plain) or of a zero image (plus, full), as diffusers.
FaceID adapters, which read an insightface embedding, are refused.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SdrtError
from .request import short_repr
from .weights import SafetensorsFiles, load_parameters, refuse_pickle

KINDS = ("plain", "plus", "full")


@dataclass(frozen=True)
class IPAdapterConfig:
    kind: str                 # "plain", "plus" or "full"
    # What it reads: the image embedding's width (plain), else the encoder's hidden size.
    embed_dim: int
    cross_attention_dim: int  # the width of its tokens: the UNet's cross-attention width
    tokens: int               # tokens per image (0 for full: one per encoder token)
    layer_widths: tuple       # the width of each UNet cross-attention layer it feeds, in order
    width: int = 0            # plus: the resampler's width, depth and heads (64 channels each)
    depth: int = 0
    heads: int = 0

    @property
    def reads_states(self):
        """Whether it reads the encoder's penultimate states (else the image embedding)."""
        return self.kind != "plain"


class ImageProjection(nn.Module):
    """Plain: (B, E) → (B, tokens, D), one linear map and a LayerNorm."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens, self.dim = cfg.tokens, cfg.cross_attention_dim
        self.proj = nn.Linear(cfg.embed_dim, cfg.tokens * cfg.cross_attention_dim)
        self.norm = nn.LayerNorm(cfg.cross_attention_dim)

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.dim))


class MLPProjection(nn.Module):
    """Full: (B, T, E) → (B, T, D), Linear → GELU → Linear → LayerNorm per token."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        e, d = cfg.embed_dim, cfg.cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, d), nn.LayerNorm(d))

    def forward(self, states):
        return self.proj(states)


class PerceiverAttention(nn.Module):
    """The resampler's attention: its latents (queries) attend to the image states and to
    themselves."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, heads * 64, bias=False)
        self.to_kv = nn.Linear(width, heads * 128, bias=False)
        self.to_out = nn.Linear(heads * 64, width, bias=False)

    def forward(self, x, latents):  # x: (B, T, W), latents: (B, Q, W)
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        split = lambda t: t.reshape(b, -1, self.heads, 64).transpose(1, 2).float()
        # The original computes the softmax in float32; so do all of it here (once a request).
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).to(latents.dtype)
        return self.to_out(o.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """Plus: (B, T, E) → (B, tokens, D): learned latents refined by ``depth`` rounds of
    attention to the projected states and a feed-forward, then projected and normalised."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        w = cfg.width
        self.latents = nn.Parameter(torch.empty(1, cfg.tokens, w))
        self.proj_in = nn.Linear(cfg.embed_dim, w)
        self.proj_out = nn.Linear(w, cfg.cross_attention_dim)
        self.norm_out = nn.LayerNorm(cfg.cross_attention_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(w, cfg.heads),
            nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 4 * w, bias=False), nn.GELU(),
                          nn.Linear(4 * w, w, bias=False))]) for _ in range(cfg.depth))

    def forward(self, states):
        latents = self.latents.expand(states.shape[0], -1, -1)
        x = self.proj_in(states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageKeyValue(nn.Module):
    """One cross-attention layer's keys and values of the image tokens."""

    def __init__(self, width, context_dim):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    """An IP-Adapter's projection (``image_proj``) and its per-layer keys and values
    (``ip_adapter``, numbered as the original numbers the UNet's attention layers: 1, 3, 5, ...
    for the cross-attention ones)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.config = cfg
        self.image_proj = {"plain": ImageProjection, "plus": Resampler,
                           "full": MLPProjection}[cfg.kind](cfg)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): ImageKeyValue(w, cfg.cross_attention_dim)
                                         for i, w in enumerate(cfg.layer_widths)})

    def layers(self):
        """Each cross-attention layer's ``ImageKeyValue``, in the UNet's order."""
        return list(self.ip_adapter.values())

    def tokens(self, encoded):
        """The image tokens (B, n, D) of what the image encoder gave: the embedding (B, E)
        for a plain adapter, the penultimate states (B, T, E) otherwise."""
        return self.image_proj(encoded.to(self.ip_adapter["1"].to_k_ip.weight.dtype))


def cross_attentions(unet):
    """The UNet's cross-attention modules in diffusers' ``attn_processors`` order (the order
    an IP-Adapter numbers its layers in): the down blocks, the up blocks, then the mid
    block."""
    return [attn for attn, _ in _cross_attention_places(unet)]


def _cross_attention_places(unet):
    """(cross-attention module, (part, block, attention)) in ``cross_attentions``' order:
    part "down", "up" or "mid", the block's index in its part and the attention's (a
    Transformer2DModel's) in its block."""
    parts = [("down", i, b) for i, b in enumerate(unet.down_blocks)] + \
        [("up", i, b) for i, b in enumerate(unet.up_blocks)]
    if unet.mid_block is not None:
        parts.append(("mid", 0, unet.mid_block))
    return [(tb.attn2, (part, i, a)) for part, i, block in parts
            for a, t in enumerate(block.attentions or ()) for tb in t.transformer_blocks]


def block_places(unet):
    """(part, block, attention) of each cross-attention layer of ``unet``: where its
    transformer block sits (the places ``layer_scales``' per-block dict names)."""
    return [place for _, place in _cross_attention_places(unet)]


def layer_scales(unet, scale, field, check):
    """One scale per cross-attention layer of ``unet`` (``cross_attentions``' order) of an
    adapter's ``scale``: a number for every layer, or diffusers' per-block dict
    (``set_ip_adapter_scale``, InstantStyle's): ``{"down": {"block_2": [0.0, 1.0]}, "up":
    {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.0}``, each part a number or a dict of its blocks
    with attention layers ("block_N", N the block's index), each block a number or a list with
    one per attention of the block (a Transformer2DModel: all its layers). What the dict does
    not name is 0. ``check(field, value)`` checks each number; ``SdrtError`` naming ``field``
    for a block or part the UNet does not have, or a list of the wrong length."""
    places = [place for _, place in _cross_attention_places(unet)]
    if not isinstance(scale, dict):
        return (check(field, scale),) * len(places)
    where = lambda *keys: f"{field}[{']['.join(map(repr, keys))}]"
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise SdrtError(f"{field} may set 'down', 'mid' and 'up' (diffusers' per-block "
                        f"scales), got {short_repr(sorted(unknown, key=str)[0])}")
    attentions = {}  # (part, block) → attentions in that block
    for part, i, a in places:
        attentions[part, i] = max(attentions.get((part, i), 0), a + 1)
    per_attention = {}  # (part, block, attention) → scale
    if "mid" in scale:
        mid = scale["mid"]
        if isinstance(mid, (list, tuple)):
            if len(mid) != 1:
                raise SdrtError(f"{where('mid')} must be one number, got {len(mid)}")
            mid = mid[0]
        if ("mid", 0) not in attentions:
            raise SdrtError(f"{where('mid')}: the UNet's mid block has no attention layers")
        per_attention["mid", 0, 0] = check(where("mid"), mid)
    for part in ("down", "up"):
        if part not in scale:
            continue
        blocks = sorted(i for p, i in attentions if p == part)
        given = scale[part]
        if not isinstance(given, dict):
            given = {f"block_{i}": given for i in blocks}
        for key, value in given.items():
            i = int(key[6:]) if isinstance(key, str) and key.startswith("block_") and \
                key[6:].isdigit() else None
            if i not in blocks:
                raise SdrtError(f"{where(part, key)}: the UNet's {part} blocks with attention "
                                f"layers are {', '.join(f'block_{b}' for b in blocks)}")
            n = attentions[part, i]
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) == 1:
                values *= n
            if len(values) != n:
                raise SdrtError(f"{where(part, key)} must be one number or a list of {n} (one "
                                f"per attention of the block), got {len(values)}")
            for a, v in enumerate(values):
                per_attention[part, i, a] = check(where(part, key), v)
    return tuple(per_attention.get(place, 0.0) for place in places)


def _config(keys, shape_of, where):
    """The config a file's keys and shapes give (``SdrtError`` where they are not an
    IP-Adapter sdrt runs)."""
    proj = {k[len("image_proj."):] for k in keys if k.startswith("image_proj.")}
    layers = sorted(int(m.group(1)) for m in
                    (re.match(r"ip_adapter\.(\d+)\.to_k_ip\.weight$", k) for k in keys) if m)
    if not proj or not layers:
        raise SdrtError(f"{where}: not an IP-Adapter (no image_proj.* and ip_adapter.N.to_k_ip "
                        f"weights, the layout of h94/IP-Adapter's files)")
    if layers != list(range(1, 2 * len(layers), 2)):
        raise SdrtError(f"{where}: its layers are numbered {layers[:4]}..., not 1, 3, 5, ...")
    widths = tuple(shape_of(f"ip_adapter.{i}.to_k_ip.weight")[0] for i in layers)
    cross = shape_of("ip_adapter.1.to_k_ip.weight")[1]
    if "proj.weight" in proj:
        e = shape_of("image_proj.proj.weight")
        if e[0] % cross:
            raise SdrtError(f"{where}: image_proj.proj makes {e[0]} values, not tokens of "
                            f"the layers' width {cross}")
        return IPAdapterConfig("plain", e[1], cross, e[0] // cross, widths)
    if "proj.3.weight" in proj:
        return IPAdapterConfig("full", shape_of("image_proj.proj.0.weight")[1], cross, 0,
                               widths)
    if "latents" in proj:
        _, tokens, width = shape_of("image_proj.latents")
        depth = 1 + max(int(m.group(1)) for m in
                        (re.match(r"layers\.(\d+)\.", k) for k in proj) if m)
        heads, rest = divmod(shape_of("image_proj.layers.0.0.to_q.weight")[0], 64)
        if rest:
            raise SdrtError(f"{where}: the resampler's heads are not 64 channels wide")
        return IPAdapterConfig("plus", shape_of("image_proj.proj_in.weight")[1], cross,
                               tokens, widths, width, depth, heads)
    if "norm.weight" in proj or any(k.startswith("perceiver_resampler.") for k in proj):
        raise SdrtError(f"{where}: an IP-Adapter FaceID (it reads an insightface face "
                        f"embedding, which sdrt does not compute)")
    raise SdrtError(f"{where}: an IP-Adapter projection sdrt does not know (image_proj "
                    f"holds {', '.join(sorted(proj)[:4])}, ...)")


def file_config(path) -> IPAdapterConfig:
    """The config of the IP-Adapter file ``path``, read from its tensor shapes alone."""
    from safetensors import SafetensorError, safe_open
    path = os.fspath(path)
    refuse_pickle(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return _config(set(f.keys()), lambda k: tuple(f.get_slice(k).get_shape()), path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SdrtError(f"{path}: not a readable safetensors file ({e})") from None


def encoder_fits(cfg: IPAdapterConfig, encoder_cfg) -> bool:
    """Whether an image encoder of config ``encoder_cfg`` gives what ``cfg``'s adapter reads."""
    return cfg.embed_dim == (encoder_cfg.hidden_size if cfg.reads_states
                             else encoder_cfg.projection_dim)


def tokens_per_image(cfg: IPAdapterConfig, encoder_cfg) -> int:
    """How many tokens one reference image gives: the adapter's own count, or for a full-face
    adapter one per encoder token (the patches and the class token)."""
    if cfg.kind == "full":
        return (encoder_cfg.image_size // encoder_cfg.patch_size) ** 2 + 1
    return cfg.tokens


def load_ip_adapter(path, device, dtype) -> IPAdapter:
    """An IP-Adapter from one ``.safetensors`` file in the original layout. Every tensor of
    the file must be one of the adapter's: a file with more (a variant sdrt does not know)
    is refused by name rather than run without them."""
    path = os.fspath(path)
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise SdrtError(f"IP-Adapter {path}: no such file")
    cfg = file_config(path)  # from the header: no tensor read twice
    with SafetensorsFiles([path]) as f:
        source = f.source
        with torch.device("meta"):
            adapter = IPAdapter(cfg)
        extra = sorted(set(source) - set(dict(adapter.named_parameters())))
        if extra:
            raise SdrtError(f"{path}: weights an IP-Adapter of its kind ({cfg.kind}) does not "
                            f"have: {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
        return load_parameters(adapter, source, device, dtype, path).eval()


def check_fits(adapter: IPAdapter, unet, where):
    """Refuse an adapter whose layers do not match ``unet``'s cross-attention layers."""
    cfg = adapter.config
    attns = cross_attentions(unet)
    widths = tuple(a.to_q.out_features for a in attns)
    if cfg.cross_attention_dim != unet.config.cross_attention_dim or widths != cfg.layer_widths:
        raise SdrtError(f"{where}: an IP-Adapter for another model (its {len(cfg.layer_widths)} "
                        f"layers of width {_widths(cfg.layer_widths)} reading "
                        f"{cfg.cross_attention_dim}-wide tokens; this UNet has {len(widths)} "
                        f"cross-attention layers of width {_widths(widths)} over "
                        f"{unet.config.cross_attention_dim}-wide text states)")


def check_encoder(adapter: IPAdapter, encoder, where):
    """Refuse an image encoder whose output is not what ``adapter`` reads."""
    cfg, enc = adapter.config, encoder.config
    width = enc.hidden_size if cfg.reads_states else enc.projection_dim
    what = "hidden size" if cfg.reads_states else "projection_dim"
    if not encoder_fits(cfg, enc):
        raise SdrtError(f"{where}: the IP-Adapter reads {cfg.embed_dim}-wide "
                        f"{'states' if cfg.reads_states else 'image embeddings'}, but the image "
                        f"encoder's {what} is {width} (an adapter for another encoder: "
                        f"ViT-H for most, ViT-bigG for ip-adapter_sdxl)")


def _widths(widths):
    return "/".join(str(w) for w in dict.fromkeys(widths))


def attach(unet, adapters):
    """Give each cross-attention layer of ``unet`` the keys and values of ``adapters`` (in
    order; none: detach them all). Attention over the image tokens runs only where a call
    passes them (``ImagePrompt``)."""
    for i, attn in enumerate(cross_attentions(unet)):
        attn.image_kv = (nn.ModuleList(a.layers()[i] for a in adapters) if adapters else None)
        attn.image_layer = i  # its row of the scale table (ImagePrompt.scales)
    unet.image_adapters = len(adapters)
