"""The `vdm` command: use a trained model without DVC.

    vdm generate --model models --n 16 --seed 3 --out new/       PNGs, a grid and info.json
    vdm interpolate test:0 test:5 --frames 8 --out interp.png    a strip from one sprite to another
    vdm serve --model models                                     the demo page on http://127.0.0.1:8000

Bad input (a missing model, damaged weights, a bad count or sampler) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from vdm.app.api import MAX_COLOURS, MAX_FRAMES, MAX_SPRITES, ODE_SAMPLER, SEED_LIMIT
from vdm.core.errors import UserError
from vdm.core.params import PRECISIONS, SamplingOptions
from vdm.sampling.samplers import SPACINGS
from vdm.sampling.steps import SAMPLERS, deterministic_samplers

# What `vdm generate` writes into --out; a folder holding anything else is not replaced.
GENERATED = ("sprite-", "samples.npy", "grid.png", "info.json")
GRID_SPRITES = 64  # grid.png shows the first 64
# The demo server's limits, bounded: one request holds the only worker for count x steps network
# evaluations (and --timeout stops it between two), and its sprites stay in the result cache.
MAX_SERVE_COUNT = 256
MAX_SERVE_STEPS = 1000
MAX_QUEUE = 256
MAX_TIMEOUT = 3600.0


def _whole(low: int, high: int, why: str = ""):
    """An argparse type: a whole number from low to high; `why` says what the upper limit bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high}{f' ({why})' if why else ''}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{value} is not above 0 and at most {MAX_TIMEOUT:g} seconds")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**63 - 1")
    return value


def _pair(text: str) -> tuple[float, float]:
    """An argparse type: "A,B", two numbers (their range is SamplingOptions' to check)."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers A,B (e.g. 0.5,1)") from None
    return a, b


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models", help="trained model directory (the train stage's models/)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the network's dtype: auto (bf16 on CUDA and on CPUs with avx512_bf16 or AMX, else fp32) | fp32 | bf16",
    )


# the sampling options a command line may change, each with its argparse type and help
_OPTION_FLAGS = {
    "steps": (int, "network evaluations per sprite"),
    "sampler": (str, "sampler"),
    "spacing": (str, "step spacing"),
    "temperature": (float, "ancestral sampler: scale of each step's fresh noise (1 = the model's own sampler)"),
    "batch_size": (int, "sprites per network call"),
    "colour_guidance": (float, "a colour-conditioned model: guidance by each sprite's colour class (1: the class)"),
    "colour_guidance_interval": (_pair, "A,B: the part of the walk (t: 1 noise, 0 the image) colour guidance acts on"),
}


def _sampling_options(
    p: argparse.ArgumentParser, base: SamplingOptions, fields: tuple[str, ...], samplers=None, helps=None
):
    """--steps, --sampler, ... for `fields` of the sampling options, their defaults from `base`
    (`helps`: a command's own help for some); `options_from` turns the parsed values into the
    options (checked there, once)."""
    for name in fields:
        kind, text = _OPTION_FLAGS[name]
        text = (helps or {}).get(name, text)
        choices = {"sampler": samplers or SAMPLERS.names(), "spacing": SPACINGS}.get(name)
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, choices=choices, default=getattr(base, name), help=text
        )
    p.set_defaults(option_fields=fields, option_base=base)


def options_from(args) -> SamplingOptions:
    """The sampling options of a parsed command line: the base with the flags' values (UserError if
    one is out of range, e.g. "steps = 0 is invalid: an integer from 1 to 100000")."""
    return args.option_base.replace(**{name: getattr(args, name) for name in args.option_fields})


def _command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A `vdm NAME` parser with the options every command has (the model, weights, device, precision)."""
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=help, description=description)
    _model_options(p)
    return p


def _generate_parser(sub) -> None:
    g = _command(
        sub,
        "generate",
        "new sprites as PNGs and a grid",
        "Generate new sprites: OUT/sprite-0000.png ..., OUT/samples.npy, OUT/grid.png and OUT/info.json "
        "(the settings and the time). The same seed and settings give the same sprites on the same device.",
    )
    g.add_argument(
        "--n",
        type=_whole(1, MAX_SPRITES, "the most one run draws: use another --seed for more"),
        default=16,
        help=f"how many sprites (at most {MAX_SPRITES}; the free disk space is checked first)",
    )
    g.add_argument("--seed", type=_seed, default=0, help="random seed")
    fields = ("steps", "sampler", "spacing", "temperature", "batch_size", "colour_guidance", "colour_guidance_interval")
    _sampling_options(g, SamplingOptions(), fields)
    g.add_argument(
        "--colours",
        type=_whole(0, MAX_COLOURS, "a sprite needs about 7"),
        default=0,
        help="a filter after sampling: repaint each sprite in at most this many flat colours (0 = the model's own "
        "sprites; 8 suits a sprite)",
    )
    g.add_argument("--out", default="generated", help="output folder (a folder holding other files is refused)")


def _interpolate_parser(sub) -> None:
    i = _command(
        sub,
        "interpolate",
        "a strip from one sprite to another through the model's latent space",
        "Encode two sprites with the probability-flow ODE of the learned schedule, join their latents "
        "by spherical interpolation and decode each point: a strip A | frames | B. A sprite is an image file "
        "(fitted on a white square like the training data) or SPLIT:INDEX of the preprocessed data (e.g. test:3).",
    )
    i.add_argument("a", help="first sprite: an image file or SPLIT:INDEX (train, val, test)")
    i.add_argument("b", help="second sprite")
    i.add_argument(
        "--frames",
        type=_whole(2, MAX_FRAMES, "one strip of frames; run again between two frames for more"),
        default=8,
        help=f"decoded frames from A to B, ends included (2 to {MAX_FRAMES})",
    )
    ode = SamplingOptions().replace(sampler=ODE_SAMPLER)
    helps = {"steps": "ODE steps each way", "sampler": "ODE solver"}
    _sampling_options(i, ode, ("steps", "sampler"), samplers=deterministic_samplers(), helps=helps)
    i.add_argument("--processed", default="data/processed", help="where SPLIT:INDEX sprites are read")
    i.add_argument("--out", default="interpolation.png", help="the strip (PNG)")


def _serve_parser(sub) -> None:
    s = _command(
        sub,
        "serve",
        "a demo page and a JSON/PNG API",
        "Serve a page where a visitor picks a seed and a count and sees new sprites, and "
        "GET /api/sprites (JSON: PNGs in base64) and /api/sprites.png (a grid). The model is loaded once; "
        "requests run one at a time, a few wait in a queue, the rest get 503.",
    )
    host = os.environ.get("VDM_SERVE_HOST") or "127.0.0.1"
    s.add_argument("--host", default=host, help="address to listen on (the default is $VDM_SERVE_HOST if set)")
    s.add_argument("--port", type=_whole(1, 65535, "the largest TCP port"), default=8000, help="port to listen on")
    serve_limit = "the server's bound on one request"
    s.add_argument(
        "--max-count",
        type=_whole(1, MAX_SERVE_COUNT, serve_limit),
        default=16,
        help=f"most sprites per request (at most {MAX_SERVE_COUNT})",
    )
    s.add_argument(
        "--max-steps",
        type=_whole(1, MAX_SERVE_STEPS, serve_limit),
        default=SamplingOptions().steps,
        help=f"most network evaluations per sprite (at most {MAX_SERVE_STEPS})",
    )
    helps = {"steps": "steps of a request that names none (at most --max-steps)", "sampler": "sampler of every request"}
    _sampling_options(s, SamplingOptions(), ("steps", "sampler", "temperature"), helps=helps)
    s.add_argument(
        "--timeout", type=_seconds, default=60.0, help=f"seconds a request may wait and run (at most {MAX_TIMEOUT:g})"
    )
    s.add_argument(
        "--queue",
        type=_whole(1, MAX_QUEUE, serve_limit),
        default=8,
        help=f"requests that may wait for the model (at most {MAX_QUEUE})",
    )


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="vdm",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Draw new Pokémon sprites with a trained Variational Diffusion Model.",
        epilog="Every command reads a model directory written by the train stage (`dvc repro train`).",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for build in (_generate_parser, _interpolate_parser, _serve_parser):
        build(sub)
    return ap


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(GENERATED))
        if foreign:
            raise UserError(
                f"--out {out} holds files `vdm generate` did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): name a new or empty folder"
            )


def _round_up(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


def generate_bytes(n: int, size: int, block: int = 4096) -> tuple[int, int]:
    """(bytes per sprite, bytes besides) that `vdm generate --n n` writes at most for size x size
    sprites, each file rounded up to whole blocks: a PNG that does not compress at all (rows, filter
    bytes, headers) and its row of samples.npy; samples.npy's header, grid.png and info.json."""
    raw = size * size * 3
    png = raw + size + 1024
    tiles = math.ceil(math.sqrt(min(GRID_SPRITES, n)))
    grid_side = tiles * (size + 2) + 2
    grid = grid_side * grid_side * 3 + grid_side + 1024
    fixed = _round_up(n * raw + 128, block) - n * raw + _round_up(grid, block) + _round_up(4096, block)
    return _round_up(png, block) + raw, fixed


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(out: Path, n: int, size: int) -> None:
    """Refuse, before any sprite is drawn, a count whose files cannot fit where --out is written
    (the new folder is staged beside it: the old one is replaced only once the new one is whole)."""
    where = _existing(out.absolute().parent)
    usage, st = shutil.disk_usage(where), os.statvfs(where)
    if usage.total == 0:  # no figures to go by (/proc, some network file systems): the writes will tell
        return
    block = st.f_frsize or 4096

    def need(count: int) -> int:
        per, fixed = generate_bytes(count, size, block)
        return count * per + fixed

    free = usage.free
    if need(n) > free:
        fit, above = 0, n  # the most sprites that fit: need(fit) <= free < need(above)
        while above - fit > 1:
            mid = (fit + above) // 2
            fit, above = (mid, above) if need(mid) <= free else (fit, mid)
        raise UserError(
            f"--n {n} needs about {_size(need(n))} for its {size}x{size} sprites (PNGs and samples.npy) but "
            f"{where} has {_size(free)} free: ask for at most {fit} sprites, or free space"
        )
    if st.f_files and st.f_favail < n + 4:  # file systems with a fixed count of files (inodes)
        raise UserError(
            f"--n {n} writes {n + 4} files but the file system of {where} has room for {st.f_favail} more: "
            "ask for fewer sprites, or use another disk"
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def cmd_generate(args) -> None:
    """Sprites are written as they are drawn into a staged folder (one batch in memory, whatever
    --n), which replaces --out once all are there: an interrupted run leaves the old --out as it was."""
    from vdm.app.api import load
    from vdm.core.atomic import atomic_dir
    from vdm.core.images import image_grid, png_bytes
    from vdm.core.progress import Progress

    out = Path(args.out)
    _check_out_dir(out)
    options = options_from(args)
    model = load(args.model, args.device, args.weights, args.precision)
    model.options = options
    size = model.image_size
    check_disk(out, args.n, size)
    bar = Progress(total=options.steps * math.ceil(args.n / options.batch_size), desc="generate", unit="step")
    batches = model.stream(args.n, args.seed, on_step=lambda _: bar.update(1), colours=args.colours)
    width = max(4, len(str(args.n - 1)))
    header = {"descr": "|u1", "fortran_order": False, "shape": (args.n, size, size, 3)}
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        first, done = [], 0
        with open(tmp / "samples.npy", "wb") as npy:  # its rows appended as they are drawn
            np.lib.format.write_array_header_1_0(npy, header)
            for batch in batches:
                for img in batch:
                    (tmp / f"sprite-{done:0{width}d}.png").write_bytes(png_bytes(img))
                    done += 1
                npy.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())
                first.extend(np.array(img) for img in batch[: GRID_SPRITES - len(first)])
                bar.set_postfix(sprites=f"{done}/{args.n}")
                del batch, img  # not held while the next batch is drawn
        seconds = time.perf_counter() - t0
        grid = np.stack(first)
        (tmp / "grid.png").write_bytes(png_bytes(image_grid(grid, ncol=math.ceil(math.sqrt(len(grid))))))
        info = dict(
            model=str(Path(args.model).resolve().name),
            weights=args.weights,
            n=args.n,
            seed=args.seed,
            **options.model_dump(
                include={"steps", "sampler", "spacing", "temperature", "colour_guidance", "colour_guidance_interval"}
            ),
            colours=args.colours or None,
            device=str(model.device),
            seconds=round(seconds, 2),
            img_per_s=round(args.n / seconds, 3),
        )
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    bar.close()
    print(f"{args.n} sprites in {seconds:.1f} s -> {out}/ (grid.png, sprite-{0:0{width}d}.png ...)")


def read_sprite(spec: str, processed: str, size: int) -> np.ndarray:
    """An image file fitted on a white size x size square, or SPLIT:INDEX of the preprocessed data."""
    from vdm.core.images import decode
    from vdm.data.splits import load_split

    split, sep, index = spec.partition(":")
    if sep and split in ("train", "val", "test") and index.isdigit():
        try:
            data = load_split(processed, split)
        except UserError as e:
            raise UserError(f"{spec}: {e}") from None
        if data.shape[1] != size:
            raise UserError(
                f"{spec}: {Path(processed) / f'{split}.npy'} holds {data.shape[1]}x{data.shape[2]} sprites but the "
                f"model draws {size}x{size}: give the data it was trained on (--processed), or an image file"
            )
        k = int(index)
        if k >= len(data):
            raise UserError(f"{spec}: the {split} split has {len(data)} sprites (0 .. {len(data) - 1})")
        return np.array(data[k])
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"sprite {spec!r} is neither an image file nor SPLIT:INDEX (e.g. test:3)")
    d = decode(p.read_bytes(), size)
    if d.pixels is None:
        raise UserError(f"sprite {spec}: {d.reason} ({d.detail})" if d.detail else f"sprite {spec}: {d.reason}")
    return d.pixels


def cmd_interpolate(args) -> None:
    from vdm.app.api import load
    from vdm.core.atomic import write_bytes
    from vdm.core.images import image_grid, png_bytes

    options = options_from(args)
    model = load(args.model, args.device, args.weights, args.precision)
    a = read_sprite(args.a, args.processed, model.image_size)
    b = read_sprite(args.b, args.processed, model.image_size)
    t0 = time.perf_counter()
    frames = model.interpolate(a, b, args.frames, **options.model_dump())
    strip = image_grid(np.concatenate([a[None], frames, b[None]]), ncol=args.frames + 2)
    write_bytes(args.out, png_bytes(strip))
    print(f"{args.frames} frames in {time.perf_counter() - t0:.1f} s -> {args.out} (A | frames | B)")


def cmd_serve(args) -> None:
    from vdm.app.serve import serve

    args.options = options_from(args)
    serve(args)


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: staged output is removed, the old --out kept


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    handles = args.command != "serve" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if handles else None  # uvicorn has its own
    try:
        {"generate": cmd_generate, "interpolate": cmd_interpolate, "serve": cmd_serve}[args.command](args)
    except UserError as e:
        print(f"vdm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an output that cannot be written (no such folder, read-only, full disk)
        where = f" ({e.filename})" if e.filename else ""
        print(f"vdm {args.command}: error: {e.strerror or e}{where}; nothing was written there", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if handles:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
