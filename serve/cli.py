"""``sdrt serve``: its options, checked before torch or FastAPI is imported, and the run.

``engine/cli.py`` wires it in with ``add_parser(sub)`` and ``run(args)``; ``python -m
sdrt.serve ...`` runs it alone. Bad options end with one line, ``sdrt: error: ...``, exit 2.
"""
import argparse
import os
import signal
import socket
import sys

from sdrt.engine.cli import float_arg, int_arg
from sdrt.engine.errors import SdrtError

from .config import DEFAULT_PORT, ServeConfig, parse_sizes


def _sizes(text):
    try:
        return parse_sizes(text)
    except SdrtError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_parser(subparsers):
    s = subparsers.add_parser(
        "serve", help="serve OpenAI's Images API and A1111's API over HTTP",
        description="Serve POST /v1/images/generations (OpenAI), /sdapi/v1/txt2img and "
                    "/sdapi/v1/img2img (AUTOMATIC1111), /health and /metrics (Prometheus), "
                    "with OpenAPI docs at /docs. Compatible requests are batched. Needs "
                    "pip install \"sdrt[serve]\" (\"sdrt[ray]\" for --ray).")
    s.add_argument("--model", metavar="PATH", default=None,
                   help="diffusers folder or single-file .safetensors checkpoint (default: the "
                        "built-in demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int_arg, default=DEFAULT_PORT, help="port to listen on")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is available, else cpu")
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: fp16 on cuda, fp32 on cpu")
    s.add_argument("--vae-dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="the VAE's precision; auto: as diffusers (fp32 for SDXL's VAE in an "
                        "fp16 run, else --dtype)")
    s.add_argument("--vae-tiling", action="store_true",
                   help="encode and decode large pictures in overlapping tiles, as diffusers' "
                        "enable_vae_tiling (less memory)")
    s.add_argument("--max-batch", metavar="N", type=int_arg, default=4,
                   help="most images in one pipeline call")
    s.add_argument("--max-queue", metavar="N", type=int_arg, default=64,
                   help="most requests waiting; more are answered 429 with Retry-After")
    s.add_argument("--batch-window-ms", metavar="MS", type=float_arg, default=10.0,
                   help="how long the oldest waiting request waits for compatible ones")
    s.add_argument("--compile", metavar="WxH[,WxH...]", type=_sizes, default=(),
                   help="build static plans for these sizes at start-up (batch 1 and "
                        "--max-batch, --steps, the default sampler, with guidance); /health "
                        "answers 200 only once they are built")
    s.add_argument("--steps", metavar="N", type=int_arg, default=None,
                   help="denoising steps of a request that does not say (default: 20, or the "
                        "built-in model's own steps without --model)")
    s.add_argument("--timeout", metavar="S", type=float_arg, default=300.0,
                   help="a request not answered after this many seconds gets 503")
    s.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on every path but /health and "
                        "/docs (default: $SDRT_API_KEY if set, else no key)")
    s.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="LoRA files (.safetensors, searched recursively) that requests apply by "
                        "file name: A1111's <lora:NAME:SCALE> prompt tags, ComfyUI's "
                        "LoraLoader")
    s.add_argument("--styles-file", metavar="FILE", default=None,
                   help="an A1111 styles.csv (name, prompt, negative_prompt): the styles A1111 "
                        "requests name in styles (GET /sdapi/v1/prompt-styles lists them)")
    s.add_argument("--controlnet-dir", metavar="DIR", default=None,
                   help="ControlNets (.safetensors files and diffusers folders) that A1111 "
                        "requests name in alwayson_scripts.controlnet, by file or folder name")
    s.add_argument("--vae-dir", metavar="DIR", default=None,
                   help="VAEs (.safetensors files and diffusers folders) that A1111 requests "
                        "name in sd_vae and ComfyUI workflows in VAELoader, by file or folder "
                        "name")
    s.add_argument("--clip-vision-dir", metavar="DIR", default=None,
                   help="CLIP image encoders (.safetensors files, transformers folders) that "
                        "the IP-Adapters of --controlnet-dir read in A1111 units; a unit's "
                        "module picks ViT-H (clip_h) or ViT-bigG (clip_g) by name, else the "
                        "first that fits")
    s.add_argument("--upscaler-dir", metavar="DIR", default=None,
                   help="upscale models (ESRGAN, Real-ESRGAN, compact Real-ESRGAN and SPAN "
                        ".safetensors files) that A1111 requests name in hr_upscaler and "
                        "the Extras endpoints, and ComfyUI workflows in UpscaleModelLoader, by "
                        "file stem (Real-ESRGAN's released files also by A1111's names, "
                        "R-ESRGAN 4x+ ...)")
    s.add_argument("--embedding-dir", metavar="DIR", default=None,
                   help="textual-inversion embeddings (.safetensors), loaded at start, as "
                        "A1111 loads its embeddings folder: a prompt writes one by its file's "
                        "stem (ComfyUI's embedding:NAME)")
    s.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the model's prediction type (a v-prediction fine-tune its "
                        "files do not mark); for an SD 2.x single file, epsilon also selects "
                        "the 512-base configs")
    s.add_argument("--zero-snr", action="store_true",
                   help="a zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr with "
                        "trailing timesteps) for a model trained on it")
    s.add_argument("--refiner", metavar="PATH", default=None,
                   help="an SDXL refiner (diffusers folder or single file) for an SDXL --model: "
                        "A1111 requests name it in refiner_checkpoint (refiner_switch_at: where "
                        "it takes over) and ComfyUI workflows in their refiner's "
                        "CheckpointLoaderSimple, by file or folder name")
    s.add_argument("--threads", metavar="N", type=int_arg, default=None,
                   help="torch CPU threads (default: torch's choice)")
    s.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve deployment (one replica per GPU)")
    s.add_argument("--replicas", metavar="N", type=int_arg, default=1,
                   help="with --ray: replicas to start")
    s.add_argument("--max-replicas", metavar="N", type=int_arg, default=None,
                   help="with --ray: autoscale from --replicas up to N replicas")
    s.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="with --ray: a running Ray cluster (default: start a local one)")
    return s


def config_from(a):
    """The checked ``ServeConfig`` of parsed arguments (``SdrtError`` naming the option)."""
    for option, path in (("model", a.model), ("refiner", a.refiner)):
        if path is not None and not os.path.exists(path):
            raise SdrtError(f"{option} path {path} does not exist")
    if not 1 <= a.replicas <= 1024:
        raise SdrtError(f"replicas must be from 1 to 1024, got {a.replicas}")
    if a.max_replicas is not None and a.max_replicas < a.replicas:
        raise SdrtError(f"max-replicas must be at least --replicas ({a.replicas}), got "
                        f"{a.max_replicas}")
    if not a.ray and (a.replicas != 1 or a.max_replicas or a.ray_address):
        raise SdrtError("--replicas, --max-replicas and --ray-address need --ray")
    return ServeConfig(model=a.model, host=a.host, port=a.port, device=a.device,
                       dtype=a.dtype, vae_dtype=a.vae_dtype, vae_tiling=a.vae_tiling,
                       max_batch=a.max_batch,
                       max_queue=a.max_queue,
                       batch_window_ms=a.batch_window_ms, compile=a.compile,
                       api_key=a.api_key or os.environ.get("SDRT_API_KEY") or None,
                       request_timeout_s=a.timeout,
                       default_steps=a.steps, threads=a.threads, lora_dir=a.lora_dir,
                       controlnet_dir=a.controlnet_dir, vae_dir=a.vae_dir,
                       clip_vision_dir=a.clip_vision_dir, upscaler_dir=a.upscaler_dir,
                       embedding_dir=a.embedding_dir, styles_file=a.styles_file,
                       refiner=a.refiner,
                       prediction_type=a.prediction_type, zero_snr=a.zero_snr)


def _check_port(host, port):
    """Refuse a port that is taken, in one line, before loading anything."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SdrtError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(a):
    config = config_from(a)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SdrtError('sdrt serve needs FastAPI and uvicorn: pip install "sdrt[serve]"') \
            from None
    if a.ray:
        from .ray_serve import run_ray
        return run_ray(config, a.replicas, a.max_replicas, a.ray_address)
    _check_port(config.host, config.port)
    from .app import create_app
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=config.host, port=config.port, log_level="info",
        timeout_graceful_shutdown=None))
    # uvicorn handles SIGTERM and SIGINT: it stops accepting, waits for every request in
    # flight (each waits for its images), then runs the app's shutdown, which stops the worker.
    # It then raises the signal again for the handler it found: this one, so that a drained
    # server exits 0 instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0


def main(argv=None):
    """``python -m sdrt.serve [options]``: ``sdrt serve`` on its own."""
    from sdrt.engine.cli import _Parser, _one_line
    parser = _Parser(prog="sdrt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = parser.parse_args(["serve", *argv])
        except SystemExit as e:  # --help
            return e.code
        return run(args) or 0
    except SdrtError as e:
        print(f"sdrt: error: {_one_line(e)}", file=sys.stderr)
        return 2
