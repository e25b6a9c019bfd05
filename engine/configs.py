"""The real Stable Diffusion configs, exactly as diffusers' ``config.json`` files hold them,
and ``ConfigCheck``, which the config classes use to refuse values no model could have.

The configs are used where no config file is at hand: a single-file checkpoint, the
meta-device parameter check, and benchmarks that build random-weight models at the real sizes.
"""
import copy
import math
import numbers

from .errors import SdrtError

# Bounds on the values that set a model's structure, checked before anything is built, so
# that no config makes a loop run or an allocation grow without bound. They sit far above any
# Stable Diffusion model (SD 1.5: 1280 channels, 2 layers per block, 4 blocks; SDXL: 10
# transformer layers); the size of the whole model is then bounded by Limits.max_parameters.
MAX_CHANNELS = 65536
MAX_BLOCKS = 16
MAX_LAYERS = 256
MAX_VOCABULARY = 2 ** 24
MAX_POSITIONS = 65536


class ConfigCheck:
    """Checks of one component's config values; each refusal names the component and key:
    ``"unet config: cross_attention_dim must be an integer from 1 to 65536, got -64"``."""

    def __init__(self, component):
        self.component = component

    def fail(self, key, allowed, value):
        raise SdrtError(f"{self.component} config: {key} must be {allowed}, got {value!r}")

    def integer(self, key, value, lo=1, hi=MAX_CHANNELS):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(key, f"an integer from {lo} to {hi}", value)
        return value

    def integers(self, key, value, n=None, lo=1, hi=MAX_CHANNELS, scalar=False):
        """A list of integers (``n`` of them, when given), or one integer when ``scalar``."""
        if scalar and not isinstance(value, (list, tuple)):
            return self.integer(key, value, lo, hi)
        count = f"{n} " if n is not None else ""
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS or \
                (n is not None and len(value) != n) or \
                any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi
                    for v in value):
            one = "an integer or " if scalar else ""
            self.fail(key, f"{one}a list of {count}integers from {lo} to {hi}"
                      f"{'' if n else f' (at most {MAX_BLOCKS})'}", value)
        return list(value)

    def number(self, key, value, positive=False):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or \
                not math.isfinite(value) or (positive and value <= 0):
            self.fail(key, "a positive number" if positive else "a finite number", value)
        return value

    def flag(self, key, value):
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def names(self, key, value, allowed):
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS or \
                any(v not in allowed for v in value):
            self.fail(key, f"a list of at most {MAX_BLOCKS} of {', '.join(sorted(allowed))}",
                      value)
        return list(value)

    def dict(self, value):
        if not isinstance(value, dict):
            raise SdrtError(f"{self.component} config must be a JSON object, got "
                            f"{type(value).__name__}")
        return value

    def divides(self, key, groups, channel_key, channels):
        for c in channels:
            if c % groups:
                self.fail(key, f"a divisor of every {channel_key} entry ({c} is not a "
                          f"multiple)", groups)

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "trained_betas": None, "clip_sample": False,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}

_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

_TEXT = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "vocab_size": 49408,
}

SD15 = {
    "unet": _UNET,
    "vae": _VAE,
    "text_encoder": _TEXT,
    "scheduler": {"_class_name": "PNDMScheduler", **_SD_BETAS},
    "pad_token": "<|endoftext|>",
}

SD21 = {
    "unet": {**_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "dual_cross_attention": False, "sample_size": 96, "use_linear_projection": True,
             "upcast_attention": True},
    "vae": {**_VAE, "sample_size": 768},
    "text_encoder": {**_TEXT, "hidden_act": "gelu", "hidden_size": 1024,
                     "intermediate_size": 4096, "num_attention_heads": 16,
                     "num_hidden_layers": 23, "projection_dim": 512},
    "scheduler": {"_class_name": "DDIMScheduler", **_SD_BETAS, "prediction_type": "v_prediction"},
    "pad_token": "!",
}

# SD 2.1-base (512², epsilon) and SD-Turbo (SD 2.1 architecture, 1-4 steps, trailing timesteps).
SD21_BASE = {**SD21, "unet": {**SD21["unet"], "sample_size": 64, "upcast_attention": False},
             "vae": _VAE,
             "scheduler": {"_class_name": "PNDMScheduler", **_SD_BETAS,
                           "prediction_type": "epsilon"}}
SD_TURBO = {**SD21_BASE,
            "scheduler": {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS,
                          "prediction_type": "epsilon", "timestep_spacing": "trailing",
                          "interpolation_type": "linear", "use_karras_sigmas": False}}

# SDXL 1.0 base (1024², epsilon, Euler): two text encoders (CLIP ViT-L, as SD 1.x's, and
# OpenCLIP ViT-bigG with its projection), a three-level UNet with 1/2/10 transformer layers and
# the "text_time" added embedding of the pooled text and six micro-conditioning numbers.
_TEXT_BIGG = {**_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
              "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
              "num_hidden_layers": 32, "projection_dim": 1280}
_SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS,
                   "interpolation_type": "linear", "prediction_type": "epsilon",
                   "sample_max_value": 1.0, "timestep_spacing": "leading",
                   "use_karras_sigmas": False}
_SDXL_VAE = {**_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

SDXL = {
    "unet": {**_UNET, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "use_linear_projection": True},
    "vae": _SDXL_VAE,
    "text_encoder": _TEXT,
    "text_encoder_2": _TEXT_BIGG,
    "scheduler": _SDXL_SCHEDULER,
    "model_index": {"_class_name": "StableDiffusionXLPipeline",
                    "force_zeros_for_empty_prompt": True},
    "pad_token": "<|endoftext|>",
    "pad_token_2": "!",
}

# The SDXL refiner: OpenCLIP ViT-bigG only, a four-level UNet at 384 channels whose added
# embedding takes an aesthetic score in place of the target size (5 numbers).
SDXL_REFINER = {
    "unet": {**_UNET, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
             "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "projection_class_embeddings_input_dim": 2560, "sample_size": 128,
             "transformer_layers_per_block": 4,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "UpBlock2D"],
             "use_linear_projection": True},
    "vae": _SDXL_VAE,
    "text_encoder_2": _TEXT_BIGG,
    "scheduler": _SDXL_SCHEDULER,
    "model_index": {"_class_name": "StableDiffusionXLImg2ImgPipeline",
                    "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
    "pad_token_2": "!",
}

# SDXL-Turbo: the SDXL base architecture distilled for 1-4 steps at 512², no guidance,
# Euler ancestral on trailing timesteps.
SDXL_TURBO = {**SDXL, "unet": {**SDXL["unet"], "sample_size": 64},
              "scheduler": {"_class_name": "EulerAncestralDiscreteScheduler", **_SD_BETAS,
                            "prediction_type": "epsilon", "timestep_spacing": "trailing"}}

# Playground v2.5: the SDXL base architecture trained with EDM's preconditioning (sigma_data
# 0.5, Karras sigmas from 80 to 0.002, DPM-Solver++ 2M) on latents standardised per channel.
PLAYGROUND_SCHEDULER = {"_class_name": "EDMDPMSolverMultistepScheduler",
                        "algorithm_type": "dpmsolver++", "euler_at_final": False,
                        "final_sigmas_type": "zero", "lower_order_final": True,
                        "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0,
                        "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002,
                        "sigma_schedule": "karras", "solver_order": 2,
                        "solver_type": "midpoint", "thresholding": False}
PLAYGROUND_V25 = {**SDXL,
                  "vae": {**_SDXL_VAE, "scaling_factor": 0.5,
                          "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
                          "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]},
                  "scheduler": PLAYGROUND_SCHEDULER}

MODELS = {"sd15": SD15, "sd21": SD21, "sd21-base": SD21_BASE, "sd-turbo": SD_TURBO,
          "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER, "sdxl-turbo": SDXL_TURBO,
          "playground-v2.5": PLAYGROUND_V25}


def model_config(name: str) -> dict:
    """A deep copy of one of ``MODELS`` (callers may edit it)."""
    return copy.deepcopy(MODELS[name])
