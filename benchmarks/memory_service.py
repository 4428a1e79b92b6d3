"""Memory of the lab service under pixel-heavy uploads: peak and resident RSS before, during and after.

A white 7700x7700 PNG is 192 KB on the wire and 178 MB decoded; eight of them fit in one 1.5 MB
``/v1/classify`` request. This script starts the service in this process (uvicorn in a thread,
:func:`leukodetect.serving.server.running`, the shipped model unless ``--checkpoint`` names one),
sends one normal request, then the hostile set: ``--requests`` requests of ``--files`` such PNGs each,
two at a time, plus ``--requests`` single-PNG requests (each within the per-request pixel budget, so
they are decoded), and a normal request again. It prints the process's RSS after start-up, its peak
during the hostile set and its RSS afterwards, read from ``/proc/self/status`` (VmRSS, and VmHWM
reset through ``/proc/self/clear_refs`` before the hostile set), and exits 1 if the peak exceeds
``--bound-gb`` or the RSS afterwards stays more than ``--settle-mb`` above the RSS before.

Then, separately and outside that bound, one ``/v1/analyze`` of the same PNG (a whole smear is
analysed at full resolution, so it costs what its pixels cost; 60 megapixels is the largest
``max_pixels`` admits): its peak and the RSS after it are printed too.

    python benchmarks/memory_service.py [--checkpoint best.pt] [--requests 4] [--files 8] [--side 7700]
        [--bound-gb 2] [--settle-mb 300] [--json results.json]

Only 127.0.0.1 is contacted. The client runs in the same process; its share (the 200 KB uploads and
the answers) is negligible next to decoded pixels.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # the dev extras install httpx2 (and httpx); either works
    import httpx2 as httpx
except ImportError:
    import httpx

MIB = 2**20


def memory() -> dict[str, float]:
    """This process's resident set (VmRSS) and its peak since start or the last reset (VmHWM), in MiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(kb) / 1024 for key, kb in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def white_png(side: int) -> bytes:
    """A white side x side RGB PNG, encoded row by row so that the full image never exists in this process."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * (3 * side)  # filter type 0, then the row's samples
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def normal_cell() -> tuple[str, bytes]:
    from leukodetect.sample import sample_dir

    path = min(sample_dir().rglob("*.png"))
    return path.name, path.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="best.pt to serve (default: the shipped model)")
    parser.add_argument("--requests", type=int, default=4, help="hostile requests of --files PNGs each")
    parser.add_argument("--files", type=int, default=8, help="PNGs per hostile request")
    parser.add_argument("--side", type=int, default=7700, help="side of each white PNG, pixels")
    parser.add_argument("--bound-gb", type=float, default=2.0, help="largest acceptable peak RSS, GiB")
    parser.add_argument("--settle-mb", type=float, default=300.0, help="largest acceptable RSS growth after the hostile set, MiB")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the figures as JSON to FILE")
    args = parser.parse_args()

    from leukodetect.serving.server import build_app, running

    png = white_png(args.side)
    cell = normal_cell()
    statuses: dict[str, list[int]] = {"normal": [], "hostile": [], "single": []}
    app = build_app(args.checkpoint, torch_threads=1, log=lambda _: None)
    with running(app) as url, httpx.Client(base_url=url, timeout=600) as http:
        def post(kind: str, files: list[tuple[str, bytes]]) -> None:
            response = http.post("/v1/classify", files=[("files", (name, data, "image/png")) for name, data in files])
            statuses[kind].append(response.status_code)

        post("normal", [cell])
        before = memory()
        peak_reset = reset_peak()
        t0 = time.perf_counter()
        hostile = [[(f"white_{r}_{i}.png", png) for i in range(args.files)] for r in range(args.requests)]
        singles = [[(f"white_single_{r}.png", png)] for r in range(args.requests)]
        with ThreadPoolExecutor(2) as pool:  # two clients at a time: requests also meet in the queue
            list(pool.map(lambda files: post("hostile", files), hostile))
            list(pool.map(lambda files: post("single", files), singles))
        during = memory()
        post("normal", [cell])
        time.sleep(1.0)
        after = memory()
        wall = time.perf_counter() - t0
        reset_peak()
        smear = http.post("/v1/analyze", files={"file": ("white_smear.png", png, "image/png")}).status_code
        analyze_peak = memory()["VmHWM"]
        time.sleep(1.0)
        analyze_after = memory()["VmRSS"]

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "png_bytes": len(png), "side": args.side, "files_per_request": args.files, "requests": args.requests,
        "statuses": statuses, "wall_s": round(wall, 1),
        "rss_before_mib": round(before["VmRSS"]), "peak_during_mib": round(during["VmHWM"]),
        "peak_is_since_start": not peak_reset, "rss_after_mib": round(after["VmRSS"]),
        "bound_mib": round(args.bound_gb * 1024), "settle_mib": args.settle_mb,
        "analyze": {"status": smear, "peak_mib": round(analyze_peak), "rss_after_mib": round(analyze_after)},
    }
    ok = result["peak_during_mib"] <= result["bound_mib"] and result["rss_after_mib"] - result["rss_before_mib"] <= args.settle_mb
    result["ok"] = ok
    print(f"hostile set: {args.requests} requests x {args.files} white {args.side}x{args.side} PNGs "
          f"({len(png) / 1024:.0f} KB each, {args.files * len(png) / MIB:.1f} MB per request) "
          f"+ {args.requests} single-PNG requests, {result['wall_s']} s")
    print(f"statuses: {statuses}")
    print(f"RSS before {result['rss_before_mib']} MiB | peak during {result['peak_during_mib']} MiB"
          f"{' (since start: VmHWM could not be reset)' if not peak_reset else ''} | after {result['rss_after_mib']} MiB")
    print(f"bound: peak <= {result['bound_mib']} MiB, after <= before + {args.settle_mb:g} MiB: {'ok' if ok else 'EXCEEDED'}")
    print(f"outside the bound, one /v1/analyze of the same PNG: status {smear}, peak {result['analyze']['peak_mib']} MiB, "
          f"after {result['analyze']['rss_after_mib']} MiB")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
