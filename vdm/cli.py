"""The `vdm` command: use a trained model without DVC.

    vdm generate --model models --n 16 --seed 3 --out new/       PNGs, a grid and info.json
    vdm interpolate test:0 test:5 --frames 8 --out interp.png    a strip from one sprite to another
    vdm serve --model models                                     the demo page on http://127.0.0.1:8000

Bad input (a missing model, damaged weights, a bad count or sampler) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from vdm.api import INTERPOLATE_DEFAULTS, SAMPLE_DEFAULTS, SEED_LIMIT
from vdm.errors import UserError
from vdm.samplers import SAMPLERS, SPACINGS

# What `vdm generate` writes into --out; a folder holding anything else is not replaced.
GENERATED = ("sprite-", "samples.npy", "grid.png", "info.json")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not above 0 and at most 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**63 - 1")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models", help="trained model directory (the train stage's models/)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="vdm",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Draw new Pokémon sprites with a trained Variational Diffusion Model.",
        epilog="Every command reads a model directory written by the train stage (`dvc repro train`).",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser(
        "generate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="new sprites as PNGs and a grid",
        description="Generate new sprites: OUT/sprite-0000.png ..., OUT/samples.npy, OUT/grid.png and OUT/info.json "
        "(the settings and the time). The same seed and settings give the same sprites on the same device.",
    )
    _model_options(g)
    g.add_argument("--n", type=_positive, default=16, help="how many sprites")
    g.add_argument("--seed", type=_seed, default=0, help="random seed")
    g.add_argument("--steps", type=_positive, default=SAMPLE_DEFAULTS["steps"], help="network evaluations per sprite")
    g.add_argument("--sampler", choices=SAMPLERS, default=SAMPLE_DEFAULTS["sampler"], help="sampler")
    g.add_argument("--spacing", choices=SPACINGS, default=SAMPLE_DEFAULTS["spacing"], help="step spacing")
    g.add_argument(
        "--temperature",
        type=_temperature,
        default=SAMPLE_DEFAULTS["temperature"],
        help="ancestral sampler: scale of each step's fresh noise (1 = the model's own sampler)",
    )
    g.add_argument("--batch-size", type=_positive, default=32, help="sprites per network call")
    g.add_argument("--out", default="generated", help="output folder (a folder holding other files is refused)")

    i = sub.add_parser(
        "interpolate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a strip from one sprite to another through the model's latent space",
        description="Encode two sprites with the probability-flow ODE of the learned schedule, join their latents "
        "by spherical interpolation and decode each point: a strip A | frames | B. A sprite is an image file "
        "(fitted on a white square like the training data) or SPLIT:INDEX of the preprocessed data (e.g. test:3).",
    )
    _model_options(i)
    i.add_argument("a", help="first sprite: an image file or SPLIT:INDEX (train, val, test)")
    i.add_argument("b", help="second sprite")
    i.add_argument("--frames", type=_positive, default=8, help="decoded frames from A to B, ends included (>= 2)")
    i.add_argument("--steps", type=_positive, default=INTERPOLATE_DEFAULTS["steps"], help="ODE steps each way")
    i.add_argument(
        "--sampler", choices=("ddim", "dpmpp_2m"), default=INTERPOLATE_DEFAULTS["sampler"], help="ODE solver"
    )
    i.add_argument("--processed", default="data/processed", help="where SPLIT:INDEX sprites are read")
    i.add_argument("--out", default="interpolation.png", help="the strip (PNG)")

    s = sub.add_parser(
        "serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a demo page and a JSON/PNG API",
        description="Serve a page where a visitor picks a seed and a count and sees new sprites, and "
        "GET /api/sprites (JSON: PNGs in base64) and /api/sprites.png (a grid). The model is loaded once; "
        "requests run one at a time, a few wait in a queue, the rest get 503.",
    )
    _model_options(s)
    host = os.environ.get("VDM_SERVE_HOST") or "127.0.0.1"
    s.add_argument("--host", default=host, help="address to listen on (the default is $VDM_SERVE_HOST if set)")
    s.add_argument("--port", type=_positive, default=8000, help="port to listen on")
    s.add_argument("--max-count", type=_positive, default=16, help="most sprites per request")
    s.add_argument("--max-steps", type=_positive, default=64, help="most network evaluations per sprite")
    s.add_argument("--steps", type=_positive, default=32, help="default steps of a request")
    s.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m", help="sampler of every request")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run")
    s.add_argument("--queue", type=_positive, default=8, help="requests that may wait for the model")
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


def cmd_generate(args) -> None:
    from vdm.api import load
    from vdm.progress import Progress
    from vdm.sampling import write_samples

    out = Path(args.out)
    _check_out_dir(out)
    model = load(args.model, args.device, args.weights)
    bar = Progress(total=args.steps * math.ceil(args.n / args.batch_size), desc="generate", unit="step")
    t0 = time.perf_counter()
    sprites = model.generate(
        args.n,
        args.seed,
        args.steps,
        args.sampler,
        args.spacing,
        args.batch_size,
        on_step=lambda _: bar.update(1),
        temperature=args.temperature,
    )
    seconds = time.perf_counter() - t0
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(
        model=str(Path(args.model).resolve().name),
        weights=args.weights,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        sampler=args.sampler,
        spacing=args.spacing,
        temperature=args.temperature,
        device=str(model.device),
        seconds=round(seconds, 2),
        img_per_s=round(args.n / seconds, 3),
    )
    write_samples(out, sprites, None, info, prefix="sprite-")
    print(f"{args.n} sprites in {seconds:.1f} s -> {out}/ (grid.png, sprite-0000.png ...)")


def read_sprite(spec: str, processed: str, size: int) -> np.ndarray:
    """An image file fitted on a white size x size square, or SPLIT:INDEX of the preprocessed data."""
    from vdm.images import decode

    split, sep, index = spec.partition(":")
    if sep and split in ("train", "val", "test") and index.isdigit():
        path = Path(processed) / f"{split}.npy"
        if not path.is_file():
            raise UserError(f"{spec}: {path} not found: run `dvc repro preprocess` (or give an image file)")
        data = np.load(path, mmap_mode="r", allow_pickle=False)
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
    from vdm.api import load
    from vdm.atomic import write_bytes
    from vdm.images import image_grid, png_bytes

    if args.frames < 2:
        raise UserError("--frames must be at least 2 (the two ends)")
    model = load(args.model, args.device, args.weights)
    a = read_sprite(args.a, args.processed, model.image_size)
    b = read_sprite(args.b, args.processed, model.image_size)
    t0 = time.perf_counter()
    frames = model.interpolate(a, b, args.frames, args.steps, args.sampler)
    strip = image_grid(np.concatenate([a[None], frames, b[None]]), ncol=args.frames + 2)
    write_bytes(args.out, png_bytes(strip))
    print(f"{args.frames} frames in {time.perf_counter() - t0:.1f} s -> {args.out} (A | frames | B)")


def cmd_serve(args) -> None:
    from vdm.serve import serve

    serve(args)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
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


if __name__ == "__main__":
    main()
