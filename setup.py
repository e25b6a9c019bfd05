"""sdrt: a Stable Diffusion inference engine built for speed.

The three top-level folders install as one import name: ``engine/`` is ``sdrt.engine``,
``kernels/`` is ``sdrt.kernels`` and ``export/`` is ``sdrt.export``.
"""
import sys

from setuptools import setup

install_requires = [
    "torch>=2.11",
    "numpy>=1.24",
    "safetensors>=0.4",
    "tokenizers>=0.15",
    "pillow>=10.0",
    "tqdm>=4.60",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.6")

setup(
    name="sdrt",
    version="0.1.0",
    description="Stable Diffusion inference engine: Triton kernels, static shapes, CUDA graphs",
    python_requires=">=3.10",
    packages=["sdrt.engine", "sdrt.engine.demo", "sdrt.kernels", "sdrt.export", "sdrt.benchmarks",
              "sdrt.serve"],
    package_dir={
        "sdrt.engine": "engine",
        "sdrt.kernels": "kernels",
        "sdrt.export": "export",
        "sdrt.benchmarks": "benchmarks",
        "sdrt.serve": "serve",
    },
    package_data={"sdrt.engine": ["data/*.gz", "data/*.txt", "data/*.safetensors", "data/*.json"]},
    install_requires=install_requires,
    extras_require={
        "test": [
            "pytest>=7.0",
            "pytest-xdist>=3.0",  # the README's test command runs on two processes
            "hypothesis>=6.0",
            "diffusers>=0.34",
            "peft>=0.17",  # diffusers loads LoRAs through it (the LoRA parity tests)
            # diffusers' LMSDiscreteScheduler integrates with it (lms's reference); the beta
            # sigma schedules (the schedules extra)
            "scipy>=1.10",
            "torchsde>=0.2.6",  # the dpmpp_sde sampler's Brownian-tree noise (and diffusers')
            "opencv-python-headless>=4.8",  # the ControlNet preprocessors (the control extra)
            "transformers>=4.40",
            # the serve tests' clients and checks: real HTTP, the official OpenAI SDK, an
            # A1111 PNG-info parser, the websocket client ComfyUI's API examples use, the
            # server process's memory
            "httpx>=0.27",
            "openai>=1.40",
            "sd-parsers>=0.6",
            "websocket-client>=1.6",
            "psutil>=5.9",
        ],
        # onnxscript: torch.onnx.export(dynamo=True) translates the graph with it. onnxruntime
        # also brings the transformers optimizer that --optimize ort runs.
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.5"],
        # Optimum's ORTStableDiffusionPipeline, which loads sdrt's export; optimum-onnx needs
        # transformers < 4.58, so not in the same environment as [test] (CI: .venv-optimum).
        "optimum": ["optimum-onnx[onnxruntime]>=0.1", "diffusers>=0.34"],
        # the ControlNet preprocessors (canny, invert, threshold, ...): OpenCV, as A1111's
        # ControlNet extension runs them
        "control": ["opencv-python-headless>=4.8"],
        # the dpmpp_sde samplers (A1111's "DPM++ SDE"): their Brownian-tree noise
        "sde": ["torchsde>=0.2.6"],
        # the beta sigma schedules (A1111's "Beta", ComfyUI's "beta"): the beta
        # distribution's quantiles
        "schedules": ["scipy>=1.10"],
        # sdrt serve: the HTTP app (FastAPI on uvicorn, pydantic request models, Prometheus
        # metrics, python-multipart for file uploads, websockets for ComfyUI's /ws, OpenCV
        # for A1111's ControlNet units, framed as its extension frames them); [ray] adds Ray
        # Serve for replicas across GPUs.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.6", "prometheus-client>=0.19",
                  "python-multipart>=0.0.9", "websockets>=12", "opencv-python-headless>=4.8"],
        "ray": ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.6", "prometheus-client>=0.19",
                "python-multipart>=0.0.9", "websockets>=12", "opencv-python-headless>=4.8",
                "ray[serve]>=2.40"],
    },
    entry_points={"console_scripts": ["sdrt=sdrt.engine.cli:main"]},
)
