"""Load test of the demo server: N requests from C concurrent clients, every one on 127.0.0.1.

    python benchmarks/serve_load.py --model models                  # starts `vdm serve` itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000     # or tests a running server

Each request asks /api/sprites for --count sprites at --steps steps with its own seed (no cache
hits). Prints and writes (--out, JSON) p50/p95/max latency, throughput and the status codes;
exits 1 if any request failed (a status other than 200, or no answer).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    """`vdm serve` on 127.0.0.1:port, once /api/health answers (a minute at most)."""
    cmd = [sys.executable, "-m", "vdm", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"server exited with {p.returncode}: {p.stderr.read().strip()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("server did not answer /api/health within 60 s")


def fetch(url: str, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0  # no answer
    return status, time.perf_counter() - t0


def load_test(base: str, requests: int, clients: int, count: int, steps: int, timeout: float) -> dict:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    next_seed = iter(range(requests))

    def client():
        while True:
            with lock:
                seed = next(next_seed, None)
            if seed is None:
                return
            r = fetch(f"{base}/api/sprites?seed={seed}&count={count}&steps={steps}", timeout)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(s for _, s in results)
    codes: dict[str, int] = {}
    for status, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)

    return {
        "requests": requests,
        "clients": clients,
        "count": count,
        "steps": steps,
        "wall_s": round(wall, 2),
        "req_per_s": round(requests / wall, 2),
        "p50_s": pct(0.5),
        "p95_s": pct(0.95),
        "max_s": round(lat[-1], 3),
        "status": codes,
        "errors": requests - codes.get("200", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `vdm serve --model MODEL`)")
    ap.add_argument("--model", default="models")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--serve-args", default="", help="extra `vdm serve` options when the script starts it")
    ap.add_argument("--out", default="reports/serve-load.json")
    args = ap.parse_args()
    server = None
    base = args.url
    if base is None:
        port = free_port()
        server = start_server(args.model, port, args.serve_args.split())
        base = f"http://127.0.0.1:{port}"
    try:
        r = load_test(base.rstrip("/"), args.requests, args.clients, args.count, args.steps, args.timeout)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r))
    sys.exit(1 if r["errors"] else 0)


if __name__ == "__main__":
    main()
