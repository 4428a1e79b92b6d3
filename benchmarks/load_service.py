"""Load test of the lab service: N concurrent clients posting one cell image to /v1/classify.

Starts ``leukodetect serve`` as a separate process on a free loopback port (so the clients and the
server do not share one interpreter lock), waits for /health, then runs ``--clients`` concurrent
clients until ``--requests`` answers or ``--duration`` seconds, whichever comes first. Reports
throughput, latency percentiles and errors as a table and as JSON (``--json FILE``, or stdout with
``--json -``). Only 127.0.0.1 is ever contacted.

    python benchmarks/load_service.py --checkpoint runs/NAME/best.pt [--clients 16] [--duration 20]
        [--requests 400] [--image CELL.png] [--gradcam] [--threads N] [--json results.json]

The clients run on the same machine and take some CPU from the server: on a small machine the
figures are a lower bound for the service alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:  # the dev extras install httpx2 (and httpx); either works
    import httpx2 as httpx
except ImportError:
    import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def default_image() -> Path:
    from leukodetect.sample import sample_dir

    return sorted(sample_dir().rglob("*.png"))[0]


def start_service(checkpoint: Path, port: int, threads: int | None, backend: str = "auto") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leukodetect", "serve", "--checkpoint", str(checkpoint), "--host", HOST, "--port", str(port),
           "--backend", backend]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with status {proc.returncode}: {proc.stderr.read().strip()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the service did not answer /health within 120 s")


async def load(url: str, image: Path, *, clients: int, duration: float, requests: int, gradcam: bool) -> dict:
    data = image.read_bytes()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sent = 0
    stop_at = time.monotonic() + duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < stop_at:
            sent += 1
            t0 = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/classify", params={"gradcam": str(gradcam).lower()},
                                           files=[("files", (image.name, data, "image/png"))])
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - t0)
            statuses[key] = statuses.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    lat = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": len(latencies), "ok": ok, "errors": len(latencies) - ok, "statuses": statuses,
        "wall_s": round(wall, 3), "throughput_rps": round(ok / wall, 3) if wall else None,
        "latency_ms": {k: round(float(np.percentile(lat, q)), 1) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))}
        | {"mean": round(float(lat.mean()), 1), "max": round(float(lat.max()), 1)} if len(lat) else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt to serve")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds, at most")
    parser.add_argument("--requests", type=int, default=400, help="requests, at most")
    parser.add_argument("--image", type=Path, default=None, help="cell image to post (default: a bundled sample cell)")
    parser.add_argument("--gradcam", action="store_true", help="ask for Grad-CAM overlays too")
    parser.add_argument("--threads", type=int, default=None, help="the service's PyTorch threads (default: all cores)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"), help="the service's --backend")
    parser.add_argument("--json", dest="json_out", default=None, help="write the result as JSON to FILE ('-' for stdout)")
    args = parser.parse_args()

    image = args.image or default_image()
    port = free_port()
    proc = start_service(args.checkpoint, port, args.threads, args.backend)
    try:
        url = f"http://{HOST}:{port}"
        model = httpx.get(f"{url}/v1/model").json()
        result = asyncio.run(load(url, image, clients=args.clients, duration=args.duration, requests=args.requests,
                                  gradcam=args.gradcam))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result.update(image=str(image), gradcam=args.gradcam, threads=args.threads or "all cores", arch=model["arch"], image_size=model["image_size"],
                  backend=model.get("backend"),
                  checkpoint=str(args.checkpoint), cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(),
                  date=time.strftime("%Y-%m-%d"))
    print_table(result)
    if args.json_out == "-":
        print(json.dumps(result, indent=2))
    elif args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("clients", "requests", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
                  title=f"/v1/classify, {r['arch']} at {r['image_size']}px{' + Grad-CAM' if r['gradcam'] else ''}, "
                        f"backend {r.get('backend')}, {r['cpu_count']} CPUs")
    lat = r["latency_ms"]
    table.add_row(*map(str, (r["clients"], r["requests"], r["ok"], r["errors"], r["throughput_rps"],
                             lat.get("p50"), lat.get("p95"), lat.get("p99"), lat.get("max"))))
    if r["errors"]:
        table.caption = f"statuses: {r['statuses']}"
    Console(stderr=True).print(table)


if __name__ == "__main__":
    main()
