"""sdrt's HTTP server: OpenAI's Images API and AUTOMATIC1111's ``/sdapi/v1`` API over one
batching scheduler, with Prometheus metrics, and a Ray Serve deployment for several GPUs.

``sdrt serve`` (``cli.py``) parses and checks its options without importing torch; ``app.py``
builds the FastAPI app; ``scheduler.py`` holds the bounded queue and the batching worker;
``runner.py`` owns the pipeline; ``ray_serve.py`` wraps the same app as a Ray Serve
deployment. Install with ``pip install "sdrt[serve]"`` (``"sdrt[ray]"`` for Ray).
"""
