"""``sdrt serve`` under load: requests/s and p50/p95/p99 latency at several concurrencies,
with batching (``--max-batch N``, a batch window) and without (``--max-batch 1``, no window).

The server runs as its own process (``python -m sdrt.serve``), so the load generator (asyncio
+ httpx in this process, a closed loop: each of C clients sends its next request when the last
is answered) does not share its interpreter. Each run warms up first (static plans, first-call
costs), then times a fixed number of requests. The mean images per pipeline call comes from
the server's own ``/metrics`` (``sdrt_batch_size``), so a report shows whether batching
happened, not only what was asked for.

CPU (default): the built-in tiny model, 64×64, 4 steps: figures of a random-weight toy model,
useful to compare the scheduler's modes, not the engine's speed. GPU: pass a real model,
``--size 512x512 --steps 20 --device cuda``; ``--compile`` builds the static plans first.

    python -m sdrt.benchmarks.bench_serve                       # CPU, built-in model
    python -m sdrt.benchmarks.bench_serve --model PATH --device cuda --size 512x512 --steps 20

Writes ``benchmarks/results/bench_serve_<device>.json`` and ``.md``.
"""
import argparse
import asyncio
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdrt.benchmarks.common import (cpu_name, default_results_dir, gpu_slug, markdown_table,
                                    package_versions)

ROOT = Path(__file__).resolve().parent.parent


def _device(args):
    if args.device == "cuda":
        import torch
        return torch.cuda.get_device_name(), "gpu"
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)", "cpu"


def _percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _metrics(url):
    """(sdrt_batch_size sum, its count, sdrt_batch_fallbacks_total) from ``url/metrics``."""
    import httpx
    wanted = {"sdrt_batch_size_sum": 0, "sdrt_batch_size_count": 1,
              "sdrt_batch_fallbacks_total": 2}
    out = [0.0, 0.0, 0.0]
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


class ServerProcess:
    """``python -m sdrt.serve`` on a free port, stopped with SIGTERM (bounded waits)."""

    def __init__(self, args, max_batch, window_ms):
        from sdrt.serve.local import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sdrt.serve", "--port", str(self.port), "--max-batch",
               str(max_batch), "--batch-window-ms", str(window_ms), "--steps",
               str(args.steps), "--max-queue", "1024"]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.compile:
            cmd += ["--compile", args.size]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def __enter__(self):
        from sdrt.serve.local import wait_healthy
        try:
            wait_healthy(self.url, timeout_s=600)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


async def _load(url, body, concurrency, n_requests, timeout_s):
    """``concurrency`` clients in a closed loop until ``n_requests`` are answered; returns
    (latencies in s, wall seconds, failures)."""
    import httpx
    latencies, failures, next_seed = [], 0, [0]

    async def client_loop(client):
        nonlocal failures
        while next_seed[0] < n_requests:
            seed = next_seed[0]
            next_seed[0] += 1
            t0 = time.perf_counter()
            r = await client.post("/v1/images/generations", json={**body, "seed": seed})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return latencies, time.perf_counter() - t0, failures


def run(args):
    w, h = (int(v) for v in args.size.lower().split("x"))
    body = {"prompt": "a red fox in the snow", "size": f"{w}x{h}", "steps": args.steps}
    modes = [("batching", args.max_batch, args.window_ms), ("no batching", 1, 0)]
    rows = []
    for mode, max_batch, window in modes:
        with ServerProcess(args, max_batch, window) as server:
            for c in args.concurrency:
                # Warm-up: first calls, plans for the batch sizes this concurrency makes.
                asyncio.run(_load(server.url, body, c, max(2, c), args.timeout))
                before = _metrics(server.url)
                n = max(args.requests, 2 * c)
                lat, wall, failures = asyncio.run(_load(server.url, body, c, n, args.timeout))
                after = _metrics(server.url)
                calls = after[1] - before[1]
                rows.append({
                    "mode": mode, "max_batch": max_batch, "window_ms": window,
                    "concurrency": c, "requests": len(lat), "failures": failures,
                    "req_per_s": len(lat) / wall if wall else None,
                    "p50_ms": 1000 * _percentile(lat, 0.50) if lat else None,
                    "p95_ms": 1000 * _percentile(lat, 0.95) if lat else None,
                    "p99_ms": 1000 * _percentile(lat, 0.99) if lat else None,
                    "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
                    "images_per_call": (after[0] - before[0]) / calls if calls else None,
                    # batches the pipeline refused, run again one request at a time
                    "fallbacks": after[2] - before[2],
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the built-in tiny model")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--concurrency", default="1,4,16",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--requests", type=int, default=32, help="timed requests per run (at "
                   "least 2 × concurrency)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None, help="server's torch CPU threads")
    p.add_argument("--compile", action="store_true", help="build static plans at start-up")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"\d+x\d+", args.size.lower()):
        p.error(f"--size must be WxH, got {args.size!r}")

    device, kind = _device(args)
    rows = run(args)
    info = {"device": device, "kind": kind, "model": args.model or "built-in tiny model "
            "(random weights)", "size": args.size, "steps": args.steps,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **package_versions(("torch", "fastapi", "uvicorn", "httpx", "pydantic"))}
    notes = ["closed loop: each of C clients sends its next request when the last is answered",
             "latency is per request, client side (queue + batch + PNG + HTTP)",
             "images_per_call: mean sdrt_batch_size over the timed requests, from /metrics; "
             "fallbacks: batches the pipeline refused and the server ran again one request "
             "at a time (sdrt_batch_fallbacks_total)"]
    if kind == "cpu" and not args.model:
        notes.insert(0, "CPU figures of the built-in tiny random-weight model: they compare "
                        "the scheduler's modes, not the engine's speed")
    out = Path(args.out) if args.out else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_serve_{gpu_slug(device)[:60]}"
    stem.with_suffix(".json").write_text(json.dumps({"benchmark": "bench_serve", "info": info,
                                                     "notes": notes, "rows": rows}, indent=1)
                                         + "\n")
    columns = ["mode", "concurrency", "requests", "failures", "req_per_s", "p50_ms", "p95_ms",
               "p99_ms", "images_per_call", "fallbacks"]
    md = [f"# bench_serve on {device}", "",
          ", ".join(f"{k} {v}" for k, v in info.items() if k != "device"), ""]
    md += [f"- {n}" for n in notes] + ["", markdown_table(rows, columns), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
