"""The real Stable Diffusion configs, exactly as diffusers' ``config.json`` files hold them.

Used where no config file is at hand: a single-file checkpoint, the meta-device parameter
check, and benchmarks that build random-weight models at the real sizes.
"""
import copy

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

MODELS = {"sd15": SD15, "sd21": SD21, "sd21-base": SD21_BASE, "sd-turbo": SD_TURBO}


def model_config(name: str) -> dict:
    """A deep copy of one of ``MODELS`` (callers may edit it)."""
    return copy.deepcopy(MODELS[name])
