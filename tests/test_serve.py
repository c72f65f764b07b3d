"""The demo server, run for real: `python -m vdm serve` on 127.0.0.1, a real HTTP client, a
bounded load test, and headless Chromium loading the page (skipped where chromium is absent)."""

import base64
import io
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT
from vdm.app import api
from vdm.core.images import reduce_colours

sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import free_port, load_test, start_server  # noqa: E402


class Server:
    def __init__(self, model_dir, *options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(str(model_dir), self.port, ["--device", "cpu", *options])

    def get(self, path, timeout=60):
        """(status, headers, body bytes) of GET path; HTTP errors are answers too."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, path):
        import json

        status, _, body = self.get(path)
        return status, json.loads(body)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-count", "4", "--max-steps", "8", "--steps", "2")
    yield s
    s.stop()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_sprites_endpoint_returns_the_api_sprites(server, model_dir):
    status, body = server.json("/api/sprites?seed=7&count=3&steps=2")
    assert status == 200 and body["count"] == 3 and body["seed"] == 7 and body["sampler"] == "ancestral"
    prefix = "data:image/png;base64,"
    got = [_png(base64.b64decode(u.removeprefix(prefix))) for u in body["sprites"]]
    want = api.load(model_dir).generate(3, seed=7, steps=2)  # the pipeline's sampler by default
    assert all(u.startswith(prefix) for u in body["sprites"])
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    status, headers, png = server.get("/api/sprites.png?seed=7&count=3&steps=2")
    assert status == 200 and headers["content-type"] == "image/png"
    grid = _png(png)
    assert np.array_equal(grid[2:34, 2:34], want[0])  # the grid's first tile (2 px padding)
    # colours: the same sprites through the colour filter
    status, body = server.json("/api/sprites?seed=7&count=3&steps=2&colours=2")
    got = np.stack([_png(base64.b64decode(u.removeprefix(prefix))) for u in body["sprites"]])
    assert status == 200 and body["colours"] == 2 and np.array_equal(got, reduce_colours(want, 2))


def test_health_and_page(server):
    status, body = server.json("/api/health")
    assert status == 200 and body["status"] == "ok"
    assert body["limits"] == {"max_count": 4, "max_steps": 8, "timeout_s": 60.0}
    status, headers, page = server.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="seed"' in page and b'max="4"' in page and b"/api/sprites" in page


@pytest.mark.parametrize(
    "query",
    ["count=0", "count=5", "steps=0", "steps=9", "seed=-1", f"seed={2**63}", "seed=abc", "count=1.5", "colours=65"],
)
def test_bad_input_is_a_422_that_names_the_parameter(server, query):
    status, body = server.json(f"/api/sprites?{query}")
    assert status == 422
    assert body["detail"][0]["loc"][-1] == query.split("=")[0]


def test_bounded_load_has_no_errors(server):
    r = load_test(server.url, requests=40, clients=8, count=1, steps=2, timeout=60)
    assert r["errors"] == 0 and r["status"] == {"200": 40}, r
    assert r["p50_s"] <= r["p95_s"] <= r["max_s"]


def test_requests_beyond_the_queue_get_503_and_late_ones_time_out(model_dir):
    """One draws, one waits (--queue 1); more are refused at once with Retry-After. A request
    that cannot finish in --timeout is stopped between network evaluations: 503, and the
    server goes on answering."""
    s = Server(model_dir, "--queue", "1", "--max-count", "16", "--max-steps", "400", "--timeout", "1.5")
    try:
        # a slow request: 16 sprites x 400 steps takes well over 1.5 s on any CPU
        results = []

        def slow(seed):
            results.append(s.get(f"/api/sprites?seed={seed}&count=16&steps=400"))

        threads = [threading.Thread(target=slow, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(status for status, _, _ in results)
        assert set(codes) == {503}, codes  # every one either refused (queue) or timed out
        details = [body for _, _, body in results]
        assert any(b"busy" in d for d in details) and any(b"timed out" in d for d in details)
        assert all(h["retry-after"] == "5" for _, h, _ in results)
        status, _ = s.json("/api/sprites?seed=1&count=1&steps=2")  # still serving
        assert status == 200
        _, health = s.json("/api/health")  # only the request that drew counts as served
        timed_out = sum(b"timed out" in d for d in details)
        assert health["served"] == 1 and health["timed_out"] == timed_out >= 1
    finally:
        s.stop()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium)")
def test_a_real_browser_loads_the_page_and_shows_the_sprites(server, tmp_path):
    url = f"{server.url}/?seed=3&count=4&steps=2&colours=3"
    common = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=30000",
        "--window-size=900,700",
    ]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<img src="data:image/png;base64,') == 4, dom[-2000:]
    assert "4 sprites, seed 3, 2 steps, filtered to 3 colours" in dom  # the page's fields went to the API
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the four 192 x 192 sprites are drawn: the untrained model's sprites are flat grey, the page white
    grey = (np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) < 8) & (pixels.mean(axis=2) < 235)
    grey &= pixels.mean(axis=2) > 40  # not the text
    assert grey.sum() > 4 * 0.8 * 192 * 192, grey.sum()


def test_a_port_in_use_is_one_line_before_the_model_loads(model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "vdm", "serve", "--model", str(model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_the_result_cache_holds_a_bounded_count_of_sprites():
    """Cached results are bounded by sprites in all (not by requests, whose size --max-count sets)."""
    import time

    from vdm.app.serve import Drawer, Limits

    class Model:
        calls = 0

        def generate(self, count, seed, steps, on_step=None, colours=0):
            Model.calls += 1
            return np.full((count, 4, 4, 3), seed, np.uint8)

    drawer = Drawer(Model(), Limits(cache=10))
    try:
        later = time.monotonic() + 60
        for seed in range(5):
            drawer._draw((seed, 4, 2, 0), later)
        assert list(drawer.cache) == [(3, 4, 2, 0), (4, 4, 2, 0)] and drawer.cached == 8  # the newest, within 10
        sprites, _ = drawer._draw((4, 4, 2, 0), later)  # served from the cache
        assert Model.calls == 5 and sprites[0, 0, 0, 0] == 4
    finally:
        drawer.pool.shutdown()
