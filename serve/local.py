"""A server in this process, on a thread: for embedding, tests and the benchmark.

    with LocalServer(ServeConfig(port=free_port())) as url:
        httpx.post(f"{url}/sdapi/v1/txt2img", json={...})

Entering waits (bounded) until ``/health`` answers 200; leaving stops uvicorn the way SIGTERM
does (requests in flight finish) and joins its thread.
"""
import socket
import threading
import time


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url, timeout_s=120.0, headers=None):
    """Poll ``url/health`` until 200; ``TimeoutError`` naming the last answer if not."""
    import httpx
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health not ready after {timeout_s:g} s: {last}")


class LocalServer:
    def __init__(self, config, ready_timeout_s=120.0):
        import uvicorn

        from .app import create_app
        self.config = config
        self.app = create_app(config)
        self.url = f"http://{config.host}:{config.port}"
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host=config.host, port=config.port, log_level="warning",
            timeout_graceful_shutdown=None))
        self._thread = threading.Thread(target=self._server.run, name="sdrt-uvicorn",
                                        daemon=True)
        self.ready_timeout_s = ready_timeout_s

    @property
    def server(self):
        """The app's ``Server`` (model, scheduler, metrics), once started."""
        return self.app.state.server

    def __enter__(self):
        self._thread.start()
        try:
            wait_healthy(self.url, self.ready_timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.url

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(60)
