"""The demo server: a page where a visitor picks a seed and a count and sees new sprites.

    vdm serve --model models                       http://127.0.0.1:8000

    GET /                      the page (a link with ?seed=3&count=8 draws those sprites on load)
    GET /api/sprites           JSON: {"seed", "count", "steps", "colours", "sampler", "seconds",
                                      "sprites": [PNG data URLs]}
    GET /api/sprites.png       the same sprites as one PNG grid
    GET /api/health            the model and the limits

Query parameters: seed (0 .. 2**63 - 1), count (1 .. --max-count), steps (1 .. --max-steps), colours
(0 .. 64: each sprite repainted in at most that many flat colours, a filter after sampling; 0, the
default, is the model's own sprites); anything else out of range is a 422. The limits themselves
are bounded (vdm/app/cli.py: --max-count at most 256, --max-steps 1000, --queue 256, --timeout an
hour), and so is the cache (Limits.cache sprites in all).
The model is loaded once, checked file by file (vdm.model.checkpoint.load_model). One request
draws at a time (a CPU has no spare cores for two); up to --queue more wait, further ones get 503
with Retry-After; a request that has waited and run longer than --timeout seconds is stopped
between network evaluations and gets 503. Results are kept in a small cache (the same seed and
settings give the same sprites).
"""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vdm.app.api import MAX_COLOURS, SEED_LIMIT, Sprites
from vdm.core.images import image_grid, png_bytes
from vdm.core.params import SamplingOptions


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. How sprites are drawn is the model's `options` (Sprites.options:
    the sample stage's unless `vdm serve` changes them); a request changes only the steps."""

    max_count: int = 16
    max_steps: int = SamplingOptions().steps
    timeout: float = 60.0
    queue: int = 8
    cache: int = 1024  # sprites kept for repeated requests, in all (27 MB at 96x96)


class Deadline(Exception):
    """The request ran out of time between two network evaluations."""


class Busy(Exception):
    """More requests than the queue holds."""


class Drawer:
    """Runs generation on one worker thread; counts waiting requests; caches results."""

    def __init__(self, model: Sprites, limits: Limits):
        self.model, self.limits = model, limits
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdm-draw")
        self.lock = threading.Lock()
        self.pending = 0
        self.cache: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self.cached = 0  # sprites in the cache
        self.served = 0  # requests answered with sprites
        self.timed_out = 0  # requests refused at their deadline (busy ones are refused before they count)

    def _draw(self, key: tuple, deadline: float) -> tuple[np.ndarray, float]:
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if time.monotonic() > deadline:
            raise Deadline

        def check(_):
            if time.monotonic() > deadline:
                raise Deadline

        seed, count, steps, colours = key
        t0 = time.perf_counter()
        sprites = self.model.generate(count, seed, steps=steps, on_step=check, colours=colours)
        result = (sprites, time.perf_counter() - t0)
        self.cache[key] = result
        self.cached += len(sprites)
        while self.cached > self.limits.cache:
            _, (dropped, _) = self.cache.popitem(last=False)
            self.cached -= len(dropped)
        return result

    async def draw(self, seed: int, count: int, steps: int, colours: int = 0) -> tuple[np.ndarray, float]:
        with self.lock:
            if self.pending > self.limits.queue:  # one running + `queue` waiting
                raise Busy
            self.pending += 1
        try:
            deadline = time.monotonic() + self.limits.timeout
            fut = self.pool.submit(self._draw, (seed, count, steps, colours), deadline)
            result = await asyncio.wrap_future(fut)
        except Deadline:
            self.timed_out += 1
            raise
        finally:
            with self.lock:
                self.pending -= 1
        self.served += 1
        return result


def page_html(limits: Limits, steps: int) -> str:
    """The demo page with the server's limits and default steps filled in."""
    return (
        PAGE.replace("{{MAX_COUNT}}", str(limits.max_count))
        .replace("{{MAX_STEPS}}", str(limits.max_steps))
        .replace("{{STEPS}}", str(steps))
        .replace("{{MAX_COLOURS}}", str(MAX_COLOURS))
    )


async def _drawn(drawer: Drawer, seed: int, count: int, steps: int, colours: int):
    """((sprites, seconds), None), or (None, the 503 response) when the queue is full or time ran out."""
    from fastapi.responses import JSONResponse

    limits = drawer.limits
    try:
        return await drawer.draw(seed, count, steps, colours), None
    except Busy:
        detail = f"busy: {limits.queue} requests are already waiting; retry in a few seconds"
    except Deadline:
        detail = f"timed out after {limits.timeout:g} s; ask for fewer sprites or steps"
    return None, JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})


def create_app(model: Sprites, limits: Limits = Limits()):
    """The FastAPI app: the page, /api/health, /api/sprites and /api/sprites.png over one Drawer."""
    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, Response

    drawer = Drawer(model, limits)
    sampler, steps = model.options.sampler, min(model.options.steps, limits.max_steps)  # of every request
    app = FastAPI(title="vdm-pokemon", description="New Pokémon sprites from a Variational Diffusion Model")
    app.state.drawer = drawer
    Seed = Query(0, ge=0, le=SEED_LIMIT - 1, description="random seed")
    Count = Query(4, ge=1, le=limits.max_count, description="sprites")
    Steps = Query(steps, ge=1, le=limits.max_steps, description="network evaluations per sprite")
    Colours = Query(0, ge=0, le=MAX_COLOURS, description="flat colours per sprite (a filter); 0 = the model's own")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return page_html(limits, steps)

    @app.get("/api/health")
    async def health():
        return {
            "status": "ok",
            "model": {"trained_steps": model.config.get("steps"), "image_size": model.image_size},
            "device": str(model.device),
            "sampler": sampler,
            "limits": {"max_count": limits.max_count, "max_steps": limits.max_steps, "timeout_s": limits.timeout},
            "waiting": drawer.pending,
            "served": drawer.served,
            "timed_out": drawer.timed_out,
        }

    @app.get("/api/sprites")
    async def sprites_json(seed: int = Seed, count: int = Count, steps: int = Steps, colours: int = Colours):
        result, error = await _drawn(drawer, seed, count, steps, colours)
        if error is not None:
            return error
        urls = ["data:image/png;base64," + base64.b64encode(png_bytes(s)).decode("ascii") for s in result[0]]
        figures = {"seed": seed, "count": count, "steps": steps, "colours": colours, "sampler": sampler}
        return {**figures, "seconds": round(result[1], 3), "sprites": urls}

    @app.get("/api/sprites.png", response_class=Response)
    async def sprites_png(seed: int = Seed, count: int = Count, steps: int = Steps, colours: int = Colours):
        result, error = await _drawn(drawer, seed, count, steps, colours)
        if error is not None:
            return error
        grid = image_grid(result[0], ncol=math.ceil(math.sqrt(len(result[0]))))
        return Response(png_bytes(grid), media_type="image/png")

    return app


def _check_port(host: str, port: int) -> None:
    import socket

    from vdm.core.errors import UserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port, or stop what holds it"
            ) from None


def serve(args) -> None:
    """`vdm serve`: load the model once, then run uvicorn until interrupted."""
    import uvicorn

    from vdm.app.api import load

    host = args.host
    _check_port(host, args.port)  # before the model loads: a taken port is one line, not a late uvicorn error
    model = load(args.model, args.device, args.weights, args.precision)
    model.options = args.options.replace(steps=min(args.options.steps, args.max_steps))
    limits = Limits(max_count=args.max_count, max_steps=args.max_steps, timeout=args.timeout, queue=args.queue)
    app = create_app(model, limits)
    print(f"serving {model} on http://{host}:{args.port} (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level="warning", access_log=False)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vdm-pokemon: new sprites</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  p.sub { margin-top: 0; color: #666; }
  form { display: flex; gap: 1rem; align-items: end; flex-wrap: wrap; margin: 1rem 0; }
  label { display: flex; flex-direction: column; font-size: 0.85rem; color: #444; }
  input { font-size: 1rem; width: 8rem; padding: 0.3rem; }
  button { font-size: 1rem; padding: 0.4rem 1rem; cursor: pointer; }
  #grid { display: flex; flex-wrap: wrap; gap: 8px; }
  #grid img { width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid #ddd; }
  #status { min-height: 1.4rem; color: #555; }
  #status.error { color: #b00020; }
</style>
</head>
<body>
<h1>New Pokémon from a Variational Diffusion Model</h1>
<p class="sub">Every seed draws its own sprites; the same seed draws the same ones again.</p>
<form id="form">
  <label>Seed <input id="seed" name="seed" type="number" min="0" value="0" required></label>
  <label>Count <input id="count" name="count" type="number" min="1" max="{{MAX_COUNT}}" value="4" required></label>
  <label>Steps <input id="steps" name="steps" type="number" min="1" max="{{MAX_STEPS}}" value="{{STEPS}}" required>
  </label>
  <label title="a filter after sampling: each sprite repainted in at most this many flat colours">
    Flat colours (0: the model's own)
    <input id="colours" name="colours" type="number" min="0" max="{{MAX_COLOURS}}" value="0" required>
  </label>
  <button id="go" type="submit">Generate</button>
  <button id="random" type="button">Random seed</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<script>
const $ = (id) => document.getElementById(id);
async function generate() {
  const q = new URLSearchParams({
    seed: $("seed").value, count: $("count").value, steps: $("steps").value, colours: $("colours").value,
  });
  history.replaceState(null, "", "?" + q);
  $("go").disabled = true;
  $("status").className = "";
  $("status").textContent = "drawing...";
  try {
    const r = await fetch("/api/sprites?" + q);
    const body = await r.json();
    if (!r.ok) {
      const d = body.detail;
      throw new Error(Array.isArray(d) ? d.map((e) => e.loc.at(-1) + ": " + e.msg).join("; ") : d);
    }
    $("grid").replaceChildren(...body.sprites.map((src, i) => {
      const img = new Image();
      img.src = src;
      img.alt = "sprite " + (i + 1) + " of seed " + body.seed;
      return img;
    }));
    $("status").textContent = body.count + " sprites, seed " + body.seed + ", " + body.steps + " steps, "
      + (body.colours ? "filtered to " + body.colours + " colours, " : "") + body.seconds.toFixed(1) + " s";
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = "error: " + e.message;
  } finally {
    $("go").disabled = false;
  }
}
$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("random").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e9); generate(); });
const q = new URLSearchParams(location.search);
for (const k of ["seed", "count", "steps", "colours"]) if (q.has(k)) $(k).value = q.get(k);
if (q.has("seed")) generate();
</script>
</body>
</html>
"""
