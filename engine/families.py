"""Model families as data: one record per family says what sets it apart.

A record names the family's text encoders and tokenizers (in the order their states are
concatenated), how prompts become conditioning (final layer through the final LayerNorm, or
the penultimate layer without it; which encoder gives the pooled embedding), which
micro-conditioning numbers its UNet takes, and its single-file configs. The pipeline, the
static runtime and the CLI read these fields; adding a family adds a record here, its
single-file mapping in ``convert_ldm`` and its configs in ``configs``.
"""
from dataclasses import dataclass

from .errors import SdrtError

# https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


@dataclass(frozen=True)
class Family:
    name: str                        # "sd1", "sd2", "sdxl", "sdxl-refiner"
    label: str                       # for people: "SDXL refiner"
    text_encoders: tuple[str, ...]   # components, in the order their states are concatenated
    tokenizers: tuple[str, ...]      # the tokenizer of each text encoder
    # The padding token of each tokenizer where no tokenizer folder says (a single file):
    # OpenCLIP's tokenizers pad with "!", CLIP's with its end token.
    pad_tokens: tuple[str, ...]
    penultimate: bool = False        # states: hidden_states[-(clip_skip + 2)], no final norm
    pooled: str | None = None        # the encoder whose projected pooled output is text_embeds
    # The UNet's micro-conditioning inputs, in order, named as diffusers' call arguments: pairs
    # (height, width) or (top, left), and the refiner's one aesthetic score.
    time_ids: tuple[str, ...] = ()
    single_file: str = ""            # configs.MODELS entry a single-file checkpoint uses
    # NVIDIA's Align Your Steps noise levels (11, from sigma_max to sigma_min) as published for
    # the family's base model: sampler X_align_your_steps takes them for 11 steps, else
    # interpolates them (sigma_schedules.align_your_steps), then steps to 0.
    align_your_steps: tuple[float, ...] = AYS_SD15

    @property
    def num_time_ids(self) -> int:
        return sum(1 if name == "aesthetic_score" else 2 for name in self.time_ids)

    def time_ids_of(self, values: dict) -> list[float]:
        """The UNet's micro-conditioning numbers for one image from ``{name: value}``, laid out
        as diffusers' ``_get_add_time_ids`` does."""
        out = []
        for name in self.time_ids:
            value = values[name]
            out += [value] if name == "aesthetic_score" else list(value)
        return [float(v) for v in out]


CLIP_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"
SD1 = Family("sd1", "SD 1.x", ("text_encoder",), ("tokenizer",), (CLIP_PAD,), single_file="sd15")
SD2 = Family("sd2", "SD 2.x", ("text_encoder",), ("tokenizer",), (OPENCLIP_PAD,),
             single_file="sd21")
SDXL = Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
              (CLIP_PAD, OPENCLIP_PAD), penultimate=True, pooled="text_encoder_2",
              time_ids=("original_size", "crops_coords_top_left", "target_size"),
              single_file="sdxl", align_your_steps=AYS_SDXL)
SDXL_REFINER = Family("sdxl-refiner", "SDXL refiner", ("text_encoder_2",), ("tokenizer_2",),
                      (OPENCLIP_PAD,), penultimate=True, pooled="text_encoder_2",
                      time_ids=("original_size", "crops_coords_top_left", "aesthetic_score"),
                      single_file="sdxl-refiner", align_your_steps=AYS_SDXL)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SDXL_REFINER)}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise SdrtError(f"model family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def recognise(unet_config: dict, text_configs: dict, model_index: dict | None, where) -> Family:
    """The family of a diffusers folder, from its configs: SDXL's UNet has the "text_time"
    added embedding; a refiner has only the second text encoder (or says it wants aesthetic
    scores); SD 2.x's text encoder uses GELU where SD 1.x's uses quick GELU."""
    model_index = model_index or {}
    if unet_config.get("addition_embed_type") == "text_time":
        aesthetic = model_index.get("requires_aesthetics_score")
        if aesthetic is None:
            aesthetic = "text_encoder" not in text_configs
        family = SDXL_REFINER if aesthetic else SDXL
        missing = [c for c in family.text_encoders if c not in text_configs]
        if missing:
            raise SdrtError(f"{where}: an {family.label} model needs {' and '.join(missing)}, "
                            f"which the folder does not have")
        return family
    if unet_config.get("addition_embed_type") is not None:
        raise SdrtError(f"{where}: unet config addition_embed_type "
                        f"{unet_config['addition_embed_type']!r} is not a family sdrt runs "
                        f"(SD 1.x, SD 2.x, SDXL)")
    if "text_encoder" not in text_configs:
        raise SdrtError(f"{where}: text_encoder is missing")
    text = text_configs["text_encoder"]
    return SD2 if text.get("hidden_act") == "gelu" else SD1
