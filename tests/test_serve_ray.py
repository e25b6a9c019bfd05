"""The server as a Ray Serve deployment: a local Ray instance (2 CPUs, no dashboard), two
replicas of the built-in model, requests through Ray Serve's HTTP proxy on 127.0.0.1."""
import asyncio
import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="ray is not installed (pip install \"sdrt[ray]\")")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
httpx = pytest.importorskip("httpx")

from sdrt.serve.config import ServeConfig  # noqa: E402
from sdrt.serve.local import free_port, wait_healthy  # noqa: E402
from sdrt.serve.ray_serve import deployment  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def ray_url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(host="127.0.0.1", port=port, max_batch=2, default_steps=1,
                             threads=1, device="cpu")
        serve.run(deployment(config, replicas=2).bind(), name="sdrt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=240)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_the_ray_proxy(ray_url):
    # Both replicas load the model and answer: /health reports each one's process id.
    pids = set()
    with httpx.Client(base_url=ray_url, timeout=TIMEOUT) as client:
        for _ in range(200):
            r = client.get("/health")
            if r.status_code == 200:
                pids.add(r.json()["pid"])
            if len(pids) == 2:
                break
    assert len(pids) == 2, f"only replica(s) {pids} answered"
    assert os.getpid() not in pids

    async def many():
        async with httpx.AsyncClient(base_url=ray_url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(client.post("/sdapi/v1/txt2img", json={
                "prompt": "a fox", "width": 32, "height": 32, "steps": 1, "seed": i % 2})
                for i in range(8)))
    responses = asyncio.run(asyncio.wait_for(many(), 4 * TIMEOUT))
    images = {0: [], 1: []}
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        data = base64.b64decode(r.json()["images"][0])
        images[i % 2].append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # Whichever replica ran it, a seed gives the same image.
    for seed, same in images.items():
        for other in same[1:]:
            assert np.abs(other.astype(int) - same[0]).max() <= 1, f"seed {seed} differs"
