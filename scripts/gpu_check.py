"""The GPU proof in one command, from a pack: tests, speed and a full-scale run in at most 8 minutes.

    make gpu-pack          # on the development machine: gpu-pack/ (the splits and the missing wheels);
                           # it prints the line to run on the GPU machine, from the repository root:
    python3 scripts/gpu_check.py --pack gpu-pack --out "${OUT:-reports/gpu-check}"
    python scripts/gpu_check.py --tiny --out /tmp/gpu-check    # anywhere: the same phases, tiny

It needs only the GPU machine's own packages (torch, numpy, pillow, pyyaml, ...) plus the pack:
the pack's wheels (pydantic, pytest and their dependencies) are unpacked into WORK/site, first
on the path of this process and of every phase; its splits into data/processed (--processed),
each checked against its sha256. No DVC (the stages run as `python -m stages.X`), wandb
disabled, no network.

Phases, each stopped at its budget; the plan is printed first, and the check ends within
--minutes (8) on one H100/H200-class card:
  setup      unpack the pack; torch, CUDA, the card and its published dense bf16 peak
  tests      `pytest -m cuda tests/test_cuda.py`: bf16 autocast against fp32, compiled against
             eager, fused AdamW, update clipping, resume on CUDA, DDP over nccl
  benchmark  `benchmarks/model.py --rows gpu` (presets/gpu.yaml's model, bf16 + torch.compile):
             img/s, model FLOP/s and the fraction of the card's bf16 peak
  train      presets/gpu.yaml with a constant learning rate after warm-up, for 500 k images seen
             (a fixed number of steps: the checkpoint's config hash is the same in every call).
             It gets the time the other phases leave (--train-seconds caps it); near its budget it
             is asked to stop (SIGTERM: a checkpoint at the current step) and the next call resumes
             from there
  interim    a run cut short: models/ written from that checkpoint's weights (without the
             post-training fits), so the stages below still run
  sample, evaluate   the stages, on the EMA weights
  report     OUT/report.json (every figure), grid.png, strip.png, loss.png and check.log: nothing else

A second call on the same machine reuses the first call's test and benchmark results
(WORK/state.json; --fresh redoes them), so training gets their time. WORK (.gpu-check/,
git-ignored) keeps the unpacked wheels, the run folder and its checkpoint between calls.
--tiny runs the same phases on the smoke preset (32x32 sprites, 20 steps; the benchmark's
default row for one step): on the pack's splits with --pack, else on synthetic sprites it makes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import lzma
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TRAIN_IMAGES = 500_000  # images seen by the full-scale run (steps = this / batch, rounded up)
CHECKPOINT_EVERY = 500  # steps between the full-scale run's checkpoints (a ~0.6 GB file each)
TINY_STEPS = 20
OUT_FILES = ("report.json", "grid.png", "strip.png", "loss.png", "check.log")
MAX_OUT_FILES = 8
INTERIM = "interim.json"  # in the run folder: models/ holds a checkpoint's weights, not a finished run's
MARGIN_S = 10  # of --minutes, kept for writing the report and exiting
# Seconds at most per phase; train takes what the others leave. Full scale: one H100/H200.
PLAN = {"setup": 30, "tests": 75, "benchmark": 130, "train": 0, "interim": 20, "sample": 35, "evaluate": 90}
TINY_PLAN = {
    "setup": 20,
    "tests": 60,
    "benchmark": 60,
    "data": 60,
    "train": 0,
    "interim": 20,
    "sample": 60,
    "evaluate": 120,
}
# of the train budget: kept for what follows the stop request (the checkpoint, or the
# post-training fits and evaluations of a run that finished its steps)
STOP_RESERVE_S = {False: 45, True: 20}
MIN_TRAIN_S = 60

# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of the card's name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


class CheckError(Exception):
    """What stops the check before it starts, said in one line with its fix."""


def card_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific first
        if key in name:
            return peak
    return None


def environment() -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if env["cuda"]:
        name = torch.cuda.get_device_name(0)
        env.update(
            card=name,
            cards=torch.cuda.device_count(),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            bf16_peak_tflops=card_peak(name),
            cuda_version=torch.version.cuda,
        )
    return env


# --- the pack ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_pack(pack: Path) -> dict:
    rebuild = "build it with `make gpu-pack` on the development machine and carry the folder whole"
    try:
        info = json.loads((pack / "PACK.json").read_text())
    except FileNotFoundError:
        raise CheckError(f"{pack}/PACK.json not found: {rebuild}") from None
    except (OSError, ValueError) as e:
        raise CheckError(f"{pack}/PACK.json cannot be read ({e.__class__.__name__}): {rebuild}") from None
    missing = [s for s in ("train.npy", "val.npy", "test.npy") if s not in info.get("data", {})]
    if missing:
        raise CheckError(f"{pack} holds no {missing[0]}: {rebuild}")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if info.get("python") != here:
        raise CheckError(
            f"{pack}'s wheels are for Python {info.get('python')}, this is Python {here}: rebuild it for this "
            "machine (`make gpu-pack` is for 3.12; `python scripts/gpu_pack.py --wheels installed` in an "
            f"environment of Python {here})"
        )
    return info


def unpack_wheels(pack: Path, info: dict, site: Path) -> Path:
    """Every wheel of the pack extracted into `site` (a plain folder: pydantic_core's compiled module
    loads from a file, not from a zip). Skipped when `site` holds exactly these wheels already."""
    stamp, want = site / ".wheels.json", [w["sha256"] for w in info["wheels"]]
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return site
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    top = site.resolve()
    for w in info["wheels"]:
        path = pack / w["file"]
        if not path.is_file():
            raise CheckError(f"{path} is missing: rebuild the pack with `make gpu-pack` and carry it whole")
        if sha256_file(path) != w["sha256"]:
            raise CheckError(
                f"{path} is damaged (its sha256 differs from PACK.json's): rebuild it with `make gpu-pack`"
            )
        with zipfile.ZipFile(path) as zf:
            bad = [m for m in zf.namelist() if not (top / m).resolve().is_relative_to(top)]
            if bad:
                raise CheckError(f"{path} has a member outside its folder ({bad[0]!r}): rebuild the pack")
            zf.extractall(site)
        for data in site.glob("*.data"):  # a wheel's .data/purelib and .data/platlib go beside the rest
            for sub in ("purelib", "platlib"):
                for item in (data / sub).iterdir() if (data / sub).is_dir() else ():
                    shutil.move(str(item), str(site / item.name))
            shutil.rmtree(data)
    stamp.write_text(json.dumps(want))
    return site


def unpack_splits(pack: Path, info: dict, processed: Path) -> None:
    """The pack's splits decompressed into `processed`; a file already there is kept if it is the
    same (sha256), and never overwritten if it differs."""
    processed.mkdir(parents=True, exist_ok=True)
    for name, d in info["data"].items():
        src, dst = pack / d["file"], processed / name
        if dst.is_file():
            if dst.stat().st_size == d["bytes"] and sha256_file(dst) == d["sha256"]:
                continue
            raise CheckError(
                f"{dst} exists and differs from the pack's {name}: move it away, or pass --processed DIR "
                "to unpack the pack elsewhere"
            )
        if not src.is_file():
            raise CheckError(f"{src} is missing: rebuild the pack with `make gpu-pack` and carry it whole")
        tmp, h = dst.with_name(f".{name}.tmp"), hashlib.sha256()
        try:
            with lzma.open(src) as f, open(tmp, "wb") as g:
                while block := f.read(1 << 20):
                    h.update(block)
                    g.write(block)
        except (lzma.LZMAError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            raise CheckError(f"{src} is damaged ({e}): rebuild the pack with `make gpu-pack`") from None
        if h.hexdigest() != d["sha256"]:
            tmp.unlink()
            raise CheckError(f"{src} decompresses to other bytes than PACK.json records: rebuild the pack")
        os.replace(tmp, dst)


def check_imports(tests: bool) -> None:
    """What the phases import beyond torch and friends is here (from the pack or installed)."""
    for module in ("yaml", "pydantic", "pydantic_core._pydantic_core", *(("pytest",) if tests else ())):
        try:
            __import__(module)
        except ImportError as e:
            raise CheckError(
                f"{module} cannot be imported here ({e}): build the pack with `make gpu-pack` and pass "
                "--pack gpu-pack (or install requirements.txt)"
            ) from None


# --- phases -----------------------------------------------------------------------------------


class Plan:
    """Budgets: each phase at most its planned seconds, and never so long that the phases after it
    lose theirs; train gets what is left. Everything ends within `total` seconds of the start."""

    def __init__(self, plan: dict[str, int], total: float, train_cap: float | None):
        self.plan, self.total, self.train_cap = plan, total, train_cap
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def budget(self, phase: str) -> float:
        order = list(self.plan)
        later = sum(self.plan[p] for p in order[order.index(phase) + 1 :])
        room = self.total - self.elapsed() - later
        if phase == "train":
            return room if self.train_cap is None else min(room, self.train_cap)
        return min(self.plan[phase], room)

    def describe(self) -> str:
        parts = [f"{p} {'the rest' if p == 'train' else s}" for p, s in self.plan.items()]
        train = self.total - sum(self.plan.values())
        return f"plan (seconds at most): {', '.join(parts)} (about {train:.0f}); all within {self.total:.0f} s"


class Log:
    """OUT/check.log: every phase's output and this script's own lines (also printed)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(f"## {line}\n")

    def since(self, offset: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


class Phases:
    """Runs each phase as a process (its own session: stopping it stops its children), output to
    the log, killed at its budget; `stop_at` seconds in, it is first asked to stop (SIGTERM)."""

    def __init__(self, log: Log, pythonpath: str):
        self.log, self.seconds = log, {}
        self.env = {**os.environ, "PYTHONPATH": pythonpath, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def run(self, phase: str, cmd: list[str], cwd: Path, budget: float, stop_at: float | None = None):
        """(exit code, 124 if killed at the budget; whether it was asked to stop; its output)."""
        offset = self.log.path.stat().st_size
        with open(self.log.path, "a") as f:
            f.write(f"## {phase}: $ {' '.join(cmd)}  (in {cwd}, budget {budget:.0f} s)\n")
            f.flush()
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            asked, rc = False, None
            try:
                while rc is None:
                    try:
                        rc = p.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        now = time.monotonic() - t0
                        if stop_at is not None and not asked and now >= stop_at:
                            p.send_signal(signal.SIGTERM)
                            asked = True
                            f.write(f"## {phase}: asked to stop after {now:.0f} s (budget {budget:.0f} s)\n")
                            f.flush()
                        if now >= budget:
                            os.killpg(p.pid, signal.SIGKILL)
                            p.wait()
                            rc = 124
                            f.write(f"## {phase}: killed at its budget of {budget:.0f} s\n")
            finally:  # this check stopped (SIGTERM, Ctrl-C): the phase is asked to stop too, then killed
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=STOP_RESERVE_S[False])
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
            self.seconds[phase] = round(self.seconds.get(phase, 0) + time.monotonic() - t0, 1)
        return rc, asked, self.log.since(offset)


def _stage_ignoring_late_stops(name: str) -> None:
    """Runs stages.<name> as `python -m` would, with SIGTERM noted and ignored outside the training
    loop (inside it, the loop's own handler checkpoints and stops): a stop request that comes after
    the last step lets the post-training fits and the outputs finish."""

    def note(signum, frame):
        print("gpu check: stop request outside the training loop: ignored", file=sys.stderr, flush=True)

    import runpy

    signal.signal(signal.SIGTERM, note)
    sys.argv = [f"stages.{name}"]
    runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=True)


# --- the run ----------------------------------------------------------------------------------


def train_steps(tiny: bool) -> tuple[int, int]:
    """(steps, batch): fixed, so every call trains the same config (and resumes its checkpoint)."""
    preset = yaml.safe_load((ROOT / "presets" / ("smoke.yaml" if tiny else "gpu.yaml")).read_text())
    batch = preset["train"]["batch_size"]
    return (TINY_STEPS if tiny else math.ceil(TRAIN_IMAGES / batch)), batch


def run_params(tiny: bool, image_size: int | None = None) -> dict:
    """params.yaml with the gpu preset (or, --tiny, the smoke preset) and this check's settings."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "presets" / ("smoke.yaml" if tiny else "gpu.yaml")).read_text())
    for section, values in preset.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key].update(value)
            else:
                raw[section][key] = value
    steps, _ = train_steps(tiny)
    t = raw["train"]
    t.update(
        steps=steps,
        cosine_decay=False,  # constant after warm-up: the same schedule whatever the budget
        eval_every=0,
        sample_every=0,
        sample_count=0,  # the sample stage draws the grid
        checkpoint_every=5 if tiny else CHECKPOINT_EVERY,
        warmup_steps=min(t["warmup_steps"], max(1, steps // 10)),
        processes=1,
        wandb="disabled",
    )
    # the classifier test at one seed: its CNNs train on the CPU, three seeds would outrun the phase
    raw["evaluate"]["c2st_repeats"] = 1
    if not tiny:
        t["eval_images"] = 256  # the post-training fits and bounds: seconds, not a minute
        raw["sample"].update(count=128, batch_size=128)
        raw["evaluate"].update(batch_size=128)
    if image_size:
        raw["data"]["image_size"] = image_size
    return raw


def finished(run: Path, steps: int) -> bool:
    """The run folder holds the outputs of a training run that did all `steps` (not interim weights)."""
    f = run / "models" / "config.json"
    if (run / INTERIM).exists() or not f.is_file() or not (run / "metrics" / "train.json").is_file():
        return False
    return json.loads(f.read_text()).get("steps") == steps


def write_interim(run: Path) -> int | None:
    """models/ (and plots/train.csv) from the checkpoint of a run cut short: its step, or None."""
    from vdm.core.params import as_dict, load_params
    from vdm.model import checkpoint as ckpt
    from vdm.model.diffusion import build_vdm
    from vdm.training.tracking import write_csv

    params = load_params(run / "params.yaml")
    key = ckpt.config_hash(params, run / "data" / "processed")
    saved = ckpt.Checkpoints(run / "checkpoints", key).load()
    if saved is None:
        return None
    model = build_vdm(params.model, params.data.image_size)
    model.load_state_dict(saved["model"])
    ema = build_vdm(params.model, params.data.image_size)
    ema.load_state_dict({k.removeprefix("module."): v for k, v in saved["ema"].items() if k.startswith("module.")})
    config = {
        "params": {"data": as_dict(params.data), "model": as_dict(params.model), "train": as_dict(params.train)},
        "config_hash": key,
        "run_name": f"gpu-check-{key[:8]}",
        "steps": saved["step"],
    }
    ckpt.save_model(run / "models", model, ema, config)
    write_csv(run / "plots" / "train.csv", saved["train_rows"])
    (run / INTERIM).write_text(json.dumps({"step": saved["step"]}) + "\n")
    return saved["step"]


def loss_chart(rows: list[dict], path: Path, width: int = 640, height: int = 320) -> None:
    """The training bound against step, as a PNG (Pillow only: nothing to install)."""
    from PIL import Image, ImageDraw

    pts = [(int(r["step"]), float(r["total"])) for r in rows if math.isfinite(float(r["total"]))]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [math.log10(max(p[1], 1e-6)) for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) + 1e-9
        pad = 40

        def xy(x, y):
            return pad + (x - x0) / max(1, x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (
                height - 2 * pad
            )

        d.line([xy(x, y) for x, y in zip(xs, ys, strict=True)], fill=(31, 119, 180), width=2)
        d.rectangle([pad, pad, width - pad, height - pad], outline="black")
        d.text((pad, 8), f"training bound (bits/dim, log scale): {10**y1:.3g} .. {10**y0:.3g}", fill="black")
        d.text((pad, height - pad + 8), f"step {x0} .. {x1}", fill="black")
    img.save(path)


def figures(report: dict) -> dict:
    """The headline numbers, in one flat mapping."""
    b, t, e, perf = report["benchmark"], report["training"], report["eval"] or {}, report["train_perf"] or {}
    out = {
        "train_img_s": b.get("train_img_s"),
        "model_tflop_s": round(b["achieved_gflops"] / 1e3, 2) if b.get("achieved_gflops") else None,
        "gflop_per_img": b.get("gflop_per_img"),
        "bf16_peak_tflops": report["env"].get("bf16_peak_tflops"),
        "fraction_of_bf16_peak": b.get("fraction_of_card_peak"),
        "train_loop_img_s": perf.get("img_per_s"),
        "train_phase_img_s": t.get("phase_img_s"),
        "images_seen": t["images_seen"],
        "images_target": t["images_target"],
        "training_complete": t["complete"],
        "val_bpd": (report["train"] or {}).get("val_bpd"),
    }
    for k in ("test_bpd", "test_bpd_se", "parts", "parts_test", "palette", "palette_test", "flatness", "flatness_test"):
        out[k] = e.get(k)
    for k in ("swd", "swd_se", "swd_floor", "swd_ratio", "graininess", "graininess_test", "sample_img_per_s"):
        out[k] = e.get(k)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/gpu-check", help="folder for the report (five files, nothing else)")
    ap.add_argument("--pack", help="the pack folder (`make gpu-pack`; default: gpu-pack/ where it exists, not --tiny)")
    ap.add_argument("--work", default=str(ROOT / ".gpu-check"), help="unpacked wheels, run folder, checkpoint")
    ap.add_argument("--processed", default=str(ROOT / "data" / "processed"), help="the splits (the pack's go here)")
    ap.add_argument("--tiny", action="store_true", help="the same phases, tiny (CPU, a minute or two)")
    ap.add_argument("--minutes", type=float, default=8.0, help="the whole check's wall-clock budget")
    ap.add_argument("--train-seconds", type=float, help="cap on the train phase (default: what the plan leaves)")
    ap.add_argument("--fresh", action="store_true", help="rerun tests and benchmark even if a previous call ran them")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        _stage_ignoring_late_stops(args.stage)
        return 0
    signal.signal(signal.SIGTERM, _stopped)
    try:
        return check(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpu check: stopped; a second call resumes the training from its checkpoint", file=sys.stderr)
        return 130


def _stopped(signum, frame):
    raise KeyboardInterrupt


def check(args) -> int:
    out, work, tiny = Path(args.out).resolve(), Path(args.work).resolve(), args.tiny
    pack = Path(args.pack).resolve() if args.pack else None
    if pack is None and not tiny and (ROOT / "gpu-pack" / "PACK.json").is_file():
        pack = ROOT / "gpu-pack"
    processed = Path(args.processed).resolve()
    plan = dict(TINY_PLAN if tiny else PLAN)
    if not (tiny and pack is None):
        plan.pop("data", None)
    plan = Plan(plan, args.minutes * 60 - MARGIN_S, args.train_seconds)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        (out / name).unlink(missing_ok=True)
    log = Log(out / "check.log")
    log.say(f"gpu check -> {out} (work {work}); {plan.describe()}")

    # 1. setup
    t0 = time.monotonic()
    sys.path.insert(0, str(ROOT))
    info = read_pack(pack) if pack else None
    site = unpack_wheels(pack, info, work / "site") if info else None
    if site:
        sys.path.insert(0, str(site))
    if info:
        unpack_splits(pack, info, processed)
    elif not tiny and not (processed / "train.npy").is_file():
        raise CheckError(
            f"no pack and no {processed}/train.npy: build the pack with `make gpu-pack` on the development "
            "machine and carry gpu-pack/ (or run `dvc repro preprocess` here, or pass --processed DIR)"
        )
    check_imports(tests=True)
    env = environment()
    phases = Phases(log, os.pathsep.join([str(ROOT), *([str(site)] if site else [])]))
    phases.seconds["setup"] = round(time.monotonic() - t0, 1)
    log.say(f"environment: {json.dumps(env)}")
    if info:
        raw = sum(d["bytes"] for d in info["data"].values())
        packed = sum(d["packed_bytes"] for d in info["data"].values())
        log.say(
            f"setup: {len(info['wheels'])} wheels -> {site}, splits ({raw / packed:.0f}x packed) -> {processed}, "
            f"{phases.seconds['setup']} s"
        )
    if not tiny and not env["cuda"]:
        raise CheckError("no CUDA device here: run with --tiny to check the script on a CPU")

    state_file = work / "state.json"
    key = f"{env.get('card', 'cpu')}|{env['torch']}|{'tiny' if tiny else 'full'}"
    state = json.loads(state_file.read_text()) if state_file.is_file() and not args.fresh else {}
    if state.get("key") != key:
        state = {"key": key}
    reused = []

    def save_state():
        work.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=2) + "\n")

    # 2. tests
    if state.get("tests", {}).get("exit") in (0, 5):
        reused.append("tests")
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]
        rc, _, text = phases.run("tests", cmd, ROOT, plan.budget("tests"))
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("## ")]
        state["tests"] = {"exit": rc, "summary": lines[-1] if lines else ""}
        save_state()
    tests = state["tests"]
    log.say(f"tests: {tests['summary']} (exit {tests['exit']}{', reused' if 'tests' in reused else ''})")

    # 3. benchmark
    if state.get("benchmark"):
        reused.append("benchmark")
    else:
        bench = work / "benchmark.json"
        bench.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        rows = (
            ["--rows", "default", "--steps", "1", "--sample-n", "0"] if tiny else ["--rows", "gpu", "--sample-n", "32"]
        )
        cmd = [sys.executable, "benchmarks/model.py", *rows, "--json", str(bench)]
        rc, _, _ = phases.run("benchmark", cmd, ROOT, plan.budget("benchmark"))
        b = json.loads(bench.read_text())[0] if rc == 0 and bench.is_file() else {}
        if b and env.get("bf16_peak_tflops"):
            b["fraction_of_card_peak"] = round(b["achieved_gflops"] / (env["bf16_peak_tflops"] * 1e3), 4)
        state["benchmark"] = b
        save_state()
    b = state["benchmark"]
    log.say(
        f"benchmark: {json.dumps(b) if b else 'failed (see check.log)'}{' (reused)' if 'benchmark' in reused else ''}"
    )

    # 4. train, interim, sample, evaluate in the run folder
    run = work / ("run-tiny" if tiny else "run")
    (run / "data").mkdir(parents=True, exist_ok=True)
    if tiny and pack is None:
        (run / "params.yaml").write_text(yaml.safe_dump(run_params(tiny), sort_keys=False))
        for stage in ("download", "preprocess"):
            phases.run("data", [sys.executable, "-m", f"stages.{stage}"], run, plan.budget("data") / 2)
    else:
        link = run / "data" / "processed"
        if link.is_symlink() or link.exists():
            if link.is_symlink():
                link.unlink()
            else:
                shutil.rmtree(link)
        link.symlink_to(processed, target_is_directory=True)
        size = None
        if tiny:
            import numpy as np

            size = np.load(processed / "train.npy", mmap_mode="r").shape[1]
        (run / "params.yaml").write_text(yaml.safe_dump(run_params(tiny, size), sort_keys=False))
    steps, batch = train_steps(tiny)
    training = {"steps": steps, "batch": batch, "images_target": steps * batch, "lr_schedule": "constant after warm-up"}

    if finished(run, steps):
        reused.append("train")
        log.say(f"train: reused (the run of {steps} steps finished in an earlier call)")
    else:
        budget = plan.budget("train")
        if budget < (20 if tiny else MIN_TRAIN_S):
            log.say(f"train: skipped, {budget:.0f} s left for it")
        else:
            if b.get("train_img_s") and not tiny:
                need = steps * batch / b["train_img_s"]
                log.say(
                    f"train: {steps} steps x {batch} = {steps * batch} images; at the benchmark's "
                    f"{b['train_img_s']} img/s that is {need:.0f} s of steps, the budget is {budget:.0f} s "
                    "(start-up, compilation and the final fits included): a call that ends first leaves a "
                    "checkpoint, and the same command continues from it"
                )
            (run / INTERIM).unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", "train"]
            stop_at = budget - STOP_RESERVE_S[tiny]
            rc, asked, text = phases.run("train", cmd, run, budget, stop_at=stop_at)
            m = re.search(r"resuming from .* at step (\d+)/", text)
            training.update(exit=rc, stopped_at_budget=asked, step_at_start=int(m.group(1)) if m else 0)
    for name in ("samples", "eval"):
        shutil.rmtree(run / name, ignore_errors=True)
    (run / "metrics" / "eval.json").unlink(missing_ok=True)
    training["complete"] = finished(run, steps)
    if training["complete"]:
        training["step"] = steps
    else:
        t0 = time.monotonic()
        training["step"] = write_interim(run) or 0
        phases.seconds["interim"] = round(time.monotonic() - t0, 1)
        training["interim"] = bool(training["step"])
    training["images_seen"] = training["step"] * batch
    if "step_at_start" in training and phases.seconds.get("train"):
        new = (training["step"] - training["step_at_start"]) * batch
        training["phase_img_s"] = round(new / phases.seconds["train"], 1)
    if training["step"]:
        took = f", the phase took {phases.seconds['train']} s" if "train" in phases.seconds else ""
        log.say(
            f"train: step {training['step']}/{steps} ({training['images_seen']} of {steps * batch} images)"
            f"{', complete' if training['complete'] else ', interim weights from its checkpoint'}{took}"
        )
    else:
        log.say("train: no weights and no checkpoint (see check.log): sample and evaluate skipped")
    codes = {}
    if training["step"]:
        for stage in ("sample", "evaluate"):
            codes[stage], _, _ = phases.run(stage, [sys.executable, "-m", f"stages.{stage}"], run, plan.budget(stage))
            log.say(f"{stage}: exit {codes[stage]} in {phases.seconds[stage]} s")
            if codes[stage]:
                break

    # 5. report
    def read(path: Path):
        return json.loads(path.read_text()) if path.is_file() else None

    report = {
        "ok": False,
        "tiny": tiny,
        "env": env,
        "tests": tests,
        "benchmark": b,
        "training": training,
        "train": read(run / "metrics" / "train.json") if training["complete"] else None,
        "train_perf": read(run / "metrics" / "train_perf.json") if training["complete"] else None,
        "eval": read(run / "metrics" / "eval.json"),
        "reused": reused,
        "plan": {"total_s": plan.total, "budgets": plan.plan, "seconds": phases.seconds},
        "pack": {"python": info["python"], "wheels": [f"{w['name']}=={w['version']}" for w in info["wheels"]]}
        if info
        else None,
    }
    report["figures"] = figures(report)
    for name in ("grid.png", "strip.png"):
        if (run / "samples" / name).is_file():
            shutil.copyfile(run / "samples" / name, out / name)
    if (run / "plots" / "train.csv").is_file():
        with open(run / "plots" / "train.csv") as f:
            loss_chart(list(csv.DictReader(f)), out / "loss.png")
    report["ok"] = (
        tests["exit"] in (0, 5)
        and bool(b)
        and training["step"] > 0
        and codes.get("sample") == 0
        and codes.get("evaluate") == 0
        and report["eval"] is not None
    )
    report["plan"]["seconds"]["total"] = round(plan.elapsed(), 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    extra = sorted(set(p.name for p in out.iterdir()) - set(OUT_FILES))
    if len(list(out.iterdir())) > MAX_OUT_FILES:
        log.say(f"note: {out} holds more than {MAX_OUT_FILES} files (not written by this check: {extra[:5]})")
    f = report["figures"]
    share = (
        "no bf16 peak known" if f["fraction_of_bf16_peak"] is None else f"{f['fraction_of_bf16_peak']:.1%} of bf16 peak"
    )
    if all(f[k] is not None for k in ("test_bpd", "swd", "swd_floor", "parts", "palette", "flatness", "graininess")):
        log.say(
            f"figures: {f['train_img_s']} img/s, {f['model_tflop_s']} TFLOP/s ({share}), {f['images_seen']} images "
            f"seen, test {f['test_bpd']:.3f} bits/dim, SWD {f['swd']:.1f} "
            f"(floor {f['swd_floor']:.1f}), parts {f['parts']:.2f}, palette {f['palette']:.1f}, flatness "
            f"{f['flatness']:.3f}, graininess {f['graininess']:.1f}"
        )
    more = "" if training["complete"] else f"; training at step {training['step']}/{steps}: run the same command again"
    log.say(f"{'ok' if report['ok'] else 'FAILED'}: {out}/report.json, {plan.elapsed():.0f} s in all{more}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
