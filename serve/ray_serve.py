"""The same FastAPI app as a Ray Serve deployment: one replica per GPU, Ray's proxy routing
requests to replicas, optional autoscaling.

Each replica unpickles its own copy of the app; the app's lifespan (which Ray Serve runs)
loads the model and starts that replica's scheduler, so batching, the bounded queue (429),
deadlines and metrics work per replica exactly as in ``sdrt serve`` without ``--ray``.

From the command line: ``sdrt serve --ray --replicas 2`` (a local Ray instance, or
``--ray-address auto`` for a running cluster); or Ray's own CLI, ``serve run
sdrt.serve.ray_serve:build_app replicas=2``. From Python::

    from ray import serve
    from sdrt.serve.config import ServeConfig
    from sdrt.serve.ray_serve import deployment
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment(ServeConfig(), replicas=2).bind(), name="sdrt", route_prefix="/")
"""
import signal
import threading

from .app import create_app
from .config import ServeConfig


def _wants_gpu(config):
    if config.device is not None:
        return config.device.startswith("cuda")
    import torch
    return torch.cuda.is_available()


def deployment(config: ServeConfig, replicas=1, max_replicas=None):
    """A Ray Serve deployment of the app: ``replicas`` replicas, or autoscaling from
    ``replicas`` to ``max_replicas``; one GPU per replica on a GPU machine."""
    from ray import serve
    options = {"name": "sdrt",
               # Ray routes no more than this to a replica; past it, the replica's own queue
               # would answer 429 anyway.
               "max_ongoing_requests": config.max_queue + config.max_batch}
    if _wants_gpu(config):
        options["ray_actor_options"] = {"num_gpus": 1}
    if max_replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": config.max_batch}
    else:
        options["num_replicas"] = replicas
    app = create_app(config)

    @serve.deployment(**options)
    @serve.ingress(app)
    class SdrtReplica:
        """One model, one scheduler: started by the app's lifespan in each replica."""

    return SdrtReplica


def run_ray(config: ServeConfig, replicas, max_replicas=None, address=None):
    """``sdrt serve --ray``: deploy, serve until SIGTERM or SIGINT, then shut Serve down
    (each replica's lifespan finishes the requests it accepted)."""
    import ray
    from ray import serve
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(deployment(config, replicas, max_replicas).bind(), name="sdrt",
                  route_prefix="/")
        print(f"sdrt serve: {replicas} replica{'s' * (replicas > 1)} on "
              f"http://{config.host}:{config.port} (Ray Serve)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def build_app(args: dict):
    """The builder Ray's own CLI calls: ``serve run sdrt.serve.ray_serve:build_app
    replicas=2 model=PATH max_batch=8``. Keys are ``ServeConfig`` fields (host and port are
    Ray's proxy's, set with ``serve start`` or the config file) plus ``replicas`` and
    ``max_replicas``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    max_replicas = args.pop("max_replicas", None)
    types = {"max_batch": int, "max_queue": int, "batch_window_ms": float,
             "request_timeout_s": float, "default_steps": int, "threads": int,
             "max_body_bytes": int}
    fields = {k: types.get(k, str)(v) for k, v in args.items()}
    return deployment(ServeConfig(**fields), replicas,
                      int(max_replicas) if max_replicas else None).bind()
