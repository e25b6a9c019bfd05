"""The server's settings, one dataclass passed explicitly from the CLI (or a Ray Serve config)
to the app, the scheduler and the runner. No torch here: the CLI checks these first."""
import os
from dataclasses import dataclass, field

from sdrt.engine.errors import SdrtError

DEFAULT_PORT = 7860  # A1111's, so its clients find the server where they look first


@dataclass(frozen=True)
class ServeConfig:
    model: str = None              # diffusers folder or single file; None: the built-in model
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = None             # None: cuda if there is a GPU, else cpu
    dtype: str = None              # None: fp16 on cuda, fp32 on cpu
    vae_dtype: str = "auto"        # the VAE's: auto (as diffusers), fp32, fp16 or bf16
    vae_tiling: bool = False       # the VAE in tiles past its sample_size (enable_vae_tiling)
    max_batch: int = 4             # images in one pipeline call
    max_queue: int = 64            # requests waiting (not yet running); more get 429
    batch_window_ms: float = 10.0  # how long the oldest request waits for batch mates
    compile: tuple = ()            # ((width, height), ...) with static plans built at start
    api_key: str = field(default=None, repr=False)
    request_timeout_s: float = 300.0   # a request still unanswered after this gets 503
    max_body_bytes: int = 50 * 2 ** 20  # base64 init images make img2img bodies large
    default_steps: int = None      # None: the model's (built-in: its tuned steps, else 20)
    threads: int = None            # torch CPU threads; None: torch's default
    lora_dir: str = None           # folder of LoRA .safetensors that requests may name
    max_loras: int = 8             # LoRAs one request may apply
    controlnet_dir: str = None     # folder of ControlNets (files or diffusers folders)
    vae_dir: str = None            # folder of VAEs (A1111's sd_vae): files or diffusers folders
    clip_vision_dir: str = None    # folder of CLIP image encoders, for IP-Adapter units
    upscaler_dir: str = None       # folder of upscale models (ESRGAN .safetensors files)
    embedding_dir: str = None      # folder of textual-inversion embeddings, loaded at start
    styles_file: str = None        # A1111's styles.csv: the styles requests may name
    refiner: str = None            # an SDXL refiner (folder or file) that requests may name
    prediction_type: str = None    # the model's objective where its files do not say it
    zero_snr: bool = False         # a zero-terminal-SNR schedule (request.ZERO_SNR)

    def __post_init__(self):
        def positive(name, integer=True):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not v > 0:
                raise SdrtError(f"{name.replace('_', '-')} must be a positive "
                                f"{'integer' if integer else 'number'}, got {v!r}")
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            positive(name)
        if self.default_steps is not None:
            positive("default_steps")
        positive("request_timeout_s", integer=False)
        if self.threads is not None:
            positive("threads")
        positive("max_loras")
        for name in ("lora_dir", "controlnet_dir", "vae_dir", "clip_vision_dir", "upscaler_dir",
                     "embedding_dir"):
            folder = getattr(self, name)
            if folder is not None and not os.path.isdir(folder):
                raise SdrtError(f"{name.replace('_', '-')} {folder} is not a folder")
        if self.styles_file is not None:  # (read here: a bad one is refused before serving)
            from sdrt.engine.styles import read_styles
            if not os.path.isfile(self.styles_file):
                raise SdrtError(f"styles-file {self.styles_file} is not a file")
            read_styles(self.styles_file)
        if not 0 <= self.batch_window_ms <= 10_000:
            raise SdrtError(f"batch-window-ms must be from 0 to 10000, got "
                            f"{self.batch_window_ms!r}")
        if not 0 <= self.port <= 65535:
            raise SdrtError(f"port must be from 0 to 65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise SdrtError("api-key must not be empty")


def parse_sizes(text):
    """``"512x512,768x512"`` -> ((512, 512), (768, 512)), each side a positive multiple of 8."""
    sizes = []
    for part in text.split(","):
        w, sep, h = part.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 8 or int(h) < 8 \
                or int(w) % 8 or int(h) % 8:
            raise SdrtError(f"compile must be WxH[,WxH...] with each side a multiple of 8, "
                            f"got {text!r}")
        sizes.append((int(w), int(h)))
    return tuple(sizes)
