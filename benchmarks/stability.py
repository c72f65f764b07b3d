"""Where a training run diverges: the training loop's own steps (same seeds, same batches, same
train_step) with probes read every --every steps, written as one CSV row per probe.

    python benchmarks/stability.py --steps 2400 --every 10 \\
        --set train.lr=0.002 --set train.cosine_decay=false --out reports/stability
    python benchmarks/stability.py --report reports/stability/probe.csv   # the summary again
    python benchmarks/stability.py --report reports/stability/probe.csv --windows 2000   # a line per 2,000 steps
    python benchmarks/stability.py --report a.csv b.csv --plot docs/lr-probe-gpu.png  # probes side by side

A probe is resumable: it saves its state (weights, EMA, optimiser, rows) to OUT/state.pt every
--save-every steps, at --until and when SIGINT/SIGTERM stops it; rerun the same command and it goes
on from there, step for step as an uninterrupted run would. `--until N` stops at step N (a long
probe spread over several sittings: run it with --until, rerun later with a larger one or none).
A held probe (train.cosine_decay=false) takes no step's rate from --steps, so it also goes on when
rerun with a larger --steps; a decayed one starts fresh, its cosine being another.

Each row: step, lr, the gradient norm (before clipping), the batch bound and objective, and
  loss_band_*     the objective's mean over the batch's examples whose gamma_t falls in each band
                  (bands: BANDS; the time draws are antithetic, so every band is filled each step)
  logit_max:NAME  the largest |q.k| / sqrt(d) of each attention block (what softmax sees)
  act:NAME        the RMS of each block's output (the residual stream through the levels)
  w:NAME, g:NAME  each block's weight RMS and gradient RMS
  upd:NAME        each block's update ||w_new - w_old|| / ||w_old|| in the step (AdamW's effective rate)
  adam_v_min      the smallest second-moment estimate sqrt(v) over all weights (a tiny one turns a
                  sudden gradient into a huge step)
  update_clip     with train.update_clip, the largest per-tensor divisor of the step's rate

`--set train.deep_lr_scale=S` trains the blocks of the smallest feature map (where a held rate
blows up first) at S x the rate, the rest as params.yaml says.

NAME is a block's path in the UNet (down.3.0, mid.1, up.5.0, ...); "stem", "out". The summary
prints, for the probe rows around the first spike (the batch objective above --spike x its running
median; `--spike-on bound` for the batch bound), which columns moved first. The objective is what
the optimiser descends, a mean over the batch's antithetic draws of t; the batch bound is one draw
per image, heavy-tailed wherever the learned shape leaves a gamma range sparse (a held
magnitude-preserving run at 1e-2: batch bounds 0.7-620 in steps 7,000-8,500 while the objective
stayed within 1.6x its running median over 12,000 steps).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BANDS = (-math.inf, -6.0, -2.0, 2.0, math.inf)


def band_name(lo: float, hi: float) -> str:
    return f"loss_band_{'' if lo == -math.inf else f'{lo:g}'}..{'' if hi == math.inf else f'{hi:g}'}"


class Probes:
    """Forward hooks on the UNet's blocks, live only while `on` is set."""

    def __init__(self, model):
        import torch

        from vdm.model.magnitude import MPAttention, pixel_norm
        from vdm.model.unet import BLOCKS, Attention

        self.torch, self.pixel_norm, self.on, self.values, self.gamma = torch, pixel_norm, False, {}, None
        net = model.net
        self.blocks = {}
        for name, m in net.named_modules():
            if isinstance(m, BLOCKS):
                self.blocks[name] = m
        self.blocks["stem"], self.blocks["out"] = net.stem, net.out
        for name, m in self.blocks.items():
            m.register_forward_hook(self._act(name))
            if isinstance(m, (Attention, MPAttention)):
                m.register_forward_pre_hook(self._logits(name, m))

        def grab_gamma(_module, _inputs, output):
            if self.on and self.gamma is None:
                self.gamma = output[0].detach().float()

        model.schedule.register_forward_hook(grab_gamma)

    def _act(self, name):
        def hook(_m, _inputs, output):
            if self.on:
                self.values[f"act:{name}"] = float(output.detach().float().square().mean().sqrt())

        return hook

    def _logits(self, name, m):
        torch = self.torch

        def hook(_m, inputs):
            if not self.on:
                return
            with torch.no_grad():
                x = inputs[0]
                b, c, h, w = x.shape
                mp = not hasattr(m, "norm")  # MPAttention: pixel-normalised q and k, scale 1 / sqrt(d)
                qkv = (m.qkv(x) if mp else m.qkv(m.norm(x))).float().reshape(b, 3, m.heads, c // m.heads, h * w)
                q, k = qkv[:, 0], qkv[:, 1]
                if mp:
                    q, k = self.pixel_norm(q, dim=2), self.pixel_norm(k, dim=2)
                    scale = 1 / math.sqrt(q.shape[2])
                elif m.qk_norm:
                    q, k = torch.nn.functional.normalize(q, dim=2), torch.nn.functional.normalize(k, dim=2)
                    scale = math.sqrt(q.shape[2])
                else:
                    scale = 1 / math.sqrt(q.shape[2])
                logits = torch.einsum("bhdi,bhdj->bhij", q, k) * scale
                self.values[f"logit_max:{name}"] = float(logits.abs().max())

        return hook

    def start(self):
        self.on, self.values, self.gamma = True, {}, None

    def stop(self):
        self.on = False


def block_norms(model, blocks: dict, what: str) -> dict[str, float]:
    """RMS of each block's weights ("w") or gradients ("g")."""
    out = {}
    for name, m in blocks.items():
        ts = [p.grad if what == "g" else p for p in m.parameters() if p.dim() > 1]
        ts = [t.detach().float() for t in ts if t is not None]
        if ts:
            n = sum(t.numel() for t in ts)
            out[f"{what}:{name}"] = math.sqrt(sum(float(t.square().sum()) for t in ts) / n)
    return out


def resume_key(args, held: bool) -> dict:
    """What a saved state must match to be continued: the settings that decide every step. A held
    rate (no cosine decay) makes no step depend on --steps, so such a probe can be run on further."""
    key = {"steps": args.steps, "every": args.every, "set": list(args.set), "processed": str(Path(args.processed))}
    return {k: v for k, v in key.items() if not (held and k == "steps")}


def run(args) -> Path:
    import signal

    import torch
    import yaml
    from sweep import apply, parse_row

    from vdm.core.atomic import atomic_path
    from vdm.core.params import parse_params
    from vdm.core.runtime import allow_tf32, resolve_device, set_deterministic
    from vdm.data.splits import StepBatches, batch_loader, load_split
    from vdm.model import checkpoint as ckpt
    from vdm.training.loop import run_config
    from vdm.training.step import build_training, step_seed, train_step

    _, sets = parse_row(" ".join(["probe", *args.set]))
    raw = apply(yaml.safe_load((ROOT / "params.yaml").read_text()), {**sets, "train.steps": args.steps})
    params = parse_params(raw)
    tp = params.train
    device = resolve_device(tp.device, "train.device")
    set_deterministic(device)
    allow_tf32(device)
    train_x = load_split(Path(args.processed), "train")
    model, ema, opt, sched = build_training(params, device)
    probes = Probes(model)
    gen = torch.Generator(device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, state_path = out / "probe.csv", out / "state.pt"
    rows: list[dict] = []
    start = 0
    saved = torch.load(state_path, map_location=device, weights_only=False) if state_path.is_file() else None
    key = resume_key(args, held=not tp.cosine_decay)
    if saved is not None and {k: v for k, v in saved["key"].items() if k in key} == key:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start, rows = saved["step"], saved["rows"]
        print(f"resuming from {state_path} at step {start}/{args.steps}", flush=True)
    elif saved is not None:
        print(f"{state_path} is another probe's ({saved['key']}); starting fresh", flush=True)

    def save(step: int) -> None:
        state = {"key": key, "step": step, "rows": rows, "model": model.state_dict(), "params": config["params"]}
        state |= {"data_id": data_id}  # with params: what a branch from this state checks
        state |= {"ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        with atomic_path(state_path) as tmp:  # a kill mid-save leaves the last state whole
            torch.save(state, tmp)

    # the weights at the scaling curve's budgets, as its training run writes them (the same steps)
    snap_steps = {b // tp.batch_size for b in args.snapshot_images if b % tp.batch_size == 0}
    config = run_config(params, args.processed)
    data_id = ckpt.data_id(args.processed)

    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    until = min(args.until or args.steps, args.steps)
    if start >= until:
        print(f"{state_path} is at step {start} already; raise --steps or --until to go on", flush=True)
    batches = StepBatches(len(train_x), tp.batch_size, tp.seed, start, max(start, until), 0, 1)
    model.train()
    for step, x in enumerate(batch_loader(train_x, batches, 0, device.type == "cuda"), start):
        gen.manual_seed(step_seed(tp.seed, step, 0))
        torch.manual_seed(step_seed(tp.seed, step, 0, stream=1))
        probe = (step + 1) % args.every == 0
        before = {}
        if probe:
            probes.start()
            before = {
                n: [p.detach().float().clone() for p in m.parameters() if p.dim() > 1] for n, m in probes.blocks.items()
            }
        loss, grad_norm = train_step(model, model, ema, opt, sched, x, gen, device, tp.grad_clip)
        done = step + 1
        if probe:
            probes.stop()
            row = probe_row(model, opt, sched, probes, before, loss, grad_norm, done)
            rows.append(row)
            if len(rows) == 1 or done % (args.every * 10) == 0:
                write(path, rows)
                print(f"step {done}: bound {row['bound']:.2f} grad {row['grad_norm']:.3f}", flush=True)
            if not math.isfinite(row["bound"]):
                break
        if args.snapshots and done in snap_steps:
            ckpt.save_model(Path(args.snapshots) / f"step-{done:06d}", model, ema.module, {**config, "steps": done})
        if stop or done == until or done % args.save_every == 0:
            save(done)
        if stop:
            print(f"stopped by signal {stop[0]} at step {done}; rerun the same command to resume", flush=True)
            break
    for s, h in old.items():
        signal.signal(s, h)
    write(path, rows)
    return path


def probe_row(model, opt, sched, probes, before, loss, grad_norm, step: int) -> dict:
    """One CSV row: the step's figures, each band's objective and every block's probes."""
    row = {
        "step": step,
        "lr": sched.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "bound": float(loss.total.detach().mean()),
        "objective": float(loss.objective.detach().mean()),
        "gamma_1": float(loss.gamma_1[0]),
    }
    gamma, obj = probes.gamma, loss.objective.detach().float()
    for lo, hi in zip(BANDS, BANDS[1:], strict=False):
        sel = (gamma >= lo) & (gamma < hi)
        row[band_name(lo, hi)] = float(obj[sel].mean()) if bool(sel.any()) else math.nan
    row |= probes.values
    row |= block_norms(model, probes.blocks, "w")
    row |= block_norms(model, probes.blocks, "g")
    for n, m in probes.blocks.items():
        new = [p.detach().float() for p in m.parameters() if p.dim() > 1]
        if new:
            d = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(new, before[n], strict=True)))
            w = math.sqrt(sum(float(b.square().sum()) for b in before[n]))
            row[f"upd:{n}"] = d / max(w, 1e-12)
    v = [s["exp_avg_sq"] for s in opt.state.values() if "exp_avg_sq" in s]
    row["adam_v_min"] = math.sqrt(min(float(t.min()) for t in v)) if v else math.nan
    row["update_clip"] = getattr(opt, "last_clip", math.nan)  # train.update_clip's largest divisor
    return row


def write(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


SPIKE = {"objective": 3.0, "bound": 10.0}  # a spike: the column above this x its running median


def running_ratio(rows: list[dict], column: str) -> tuple[str, list[float], list[float]]:
    """The column the spike test reads (the bound in probes written before the objective was a
    column), its values, and each row's value over the median of the 30 rows before it (NaN for
    the first 10 rows; a NaN value gives NaN, a spike)."""
    column = column if column in rows[0] else "bound"
    values = [float(r[column]) for r in rows]
    medians = [statistics.median(values[max(0, i - 30) : i]) if i >= 10 else math.nan for i in range(len(rows))]
    return column, values, [v / m if m else (math.inf if v else 1.0) for v, m in zip(values, medians, strict=True)]


def report(path: Path, spike: float | None = None, column: str = "objective") -> None:
    """The first spike of `column` and, for each probe column, its value 10 rows before, 1 row
    before and at it."""
    rows = list(csv.DictReader(open(path)))
    if not rows:
        print(f"{path}: no probe rows yet (stopped before the first --every steps)")
        return
    column, values, ratio = running_ratio(rows, column)
    spike = spike or SPIKE[column]
    at = next((i for i in range(10, len(rows)) if not ratio[i] <= spike), None)  # NaN is a spike
    if at is None:
        print(f"{path}: no spike of the {column} above {spike}x its running median in {rows[-1]['step']} steps")
        return
    print(
        f"first spike at step {rows[at]['step']} ({column} {values[at]:.4g}, running median "
        f"{statistics.median(values[max(0, at - 30) : at]):.4g})"
    )
    print(f"{'column':28s} {'-10 rows':>10s} {'-1 row':>10s} {'spike':>10s} {'spike/-10':>9s}")
    early = max(0, at - 10)
    for col in rows[0]:
        if col == "step":
            continue
        a, b, c = (float(rows[j][col] or "nan") for j in (early, at - 1, at))
        ratio = c / a if a else math.nan
        print(f"{col:28s} {a:10.4g} {b:10.4g} {c:10.4g} {ratio:9.2f}")


def windows(path: Path, size: int, column: str = "objective") -> None:
    """One line per `size` steps: the column's median and its largest ratio to its running median
    (the spike test's figure), the batch bound's median, the largest gradient norm, attention logit
    and block RMS, and how many probe rows had a gamma band with no draw in the batch."""
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return
    column, values, ratio = running_ratio(rows, column)
    cols = rows[0].keys()

    def top(prefix: str, at: list[int]) -> float:
        found = [float(rows[i][c]) for i in at for c in cols if c.startswith(prefix) and rows[i][c]]
        return max(found, default=math.nan)

    print(
        f"{'steps':>13s} {column + ' median':>17s} {'max / running':>13s} {'bound median':>12s} "
        f"{'grad max':>8s} {'logit max':>9s} {'act max':>7s} {'empty band':>10s}"
    )
    for start in range(0, int(rows[-1]["step"]), size):
        at = [i for i, r in enumerate(rows) if start < int(r["step"]) <= start + size]
        if not at:
            continue

        empty = sum(any(math.isnan(float(rows[i][c] or "nan")) for c in cols if c.startswith("loss_band")) for i in at)
        late = [ratio[i] for i in at if i >= 10]
        print(
            f"{start + 1:>6d}-{start + size:<6d} {statistics.median(values[i] for i in at):17.4g} "
            f"{max(late, default=math.nan):13.2f} {statistics.median(float(rows[i]['bound']) for i in at):12.1f} "
            f"{top('grad_norm', at):8.2f} {top('logit_max:', at):9.2f} {top('act:', at):7.2f} {empty:10d}"
        )


PLOTTED = (  # (title, the columns drawn: a name, or a prefix ending in ":" for every block with it)
    ("batch bound, bits/dim (log)", ("bound",)),
    ("activation RMS per block (log)", ("act:",)),
    ("largest attention logit per attention block (log)", ("logit_max:",)),
    ("update ||dw|| / ||w|| per block in one step (log)", ("upd:",)),
)


def plot(paths: list[Path], out: Path) -> None:
    """One column of panels per probe CSV (PLOTTED), the deep blocks (the attention level and the
    middle) drawn dark, the outer ones light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PLOTTED), len(paths), figsize=(5.5 * len(paths), 2.6 * len(PLOTTED)), squeeze=False)
    for j, path in enumerate(paths):
        rows = list(csv.DictReader(open(path)))
        steps = [int(r["step"]) for r in rows]
        label = path.parent.name if path.stem == "probe" else path.stem  # OUT/probe.csv: the probe's folder
        for i, (title, cols) in enumerate(PLOTTED):
            ax = axes[i][j]
            names = [c for c in rows[0] if c in cols or any(c.startswith(p) for p in cols if p.endswith(":"))]
            for c in names:
                deep = any(t in c for t in ("down.6", "mid.", "up.0.", "up.1."))
                values = [float(r[c] or "nan") for r in rows]
                ax.plot(steps, values, lw=0.8, color="tab:red" if deep else "tab:blue", alpha=0.9 if deep else 0.35)
            ax.set_yscale("log")
            ax.set_title(f"{label}: {title}" if i == 0 else title, fontsize=9)
            ax.tick_params(labelsize=8)
        axes[-1][j].set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> None:
    from scaling import BUDGETS  # the scaling curve's budgets: --snapshots writes its points

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--every", type=int, default=10, help="probe every this many steps")
    ap.add_argument("--set", action="append", default=[], help="key=value over params.yaml (repeatable)")
    ap.add_argument("--until", type=int, help="stop (resumably) after this step; rerun to go on")
    ap.add_argument(
        "--snapshots",
        help="also save the weights at the scaling curve's budgets to SNAPSHOTS/step-NNNNNN/ "
        "(`benchmarks/scaling.py --score-only` scores them)",
    )
    ap.add_argument("--snapshot-images", type=int, nargs="+", default=list(BUDGETS), help="the budgets, in images seen")
    ap.add_argument("--save-every", type=int, default=500, help="save the resumable state every this many steps")
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--out", default="reports/stability")
    ap.add_argument("--spike-on", choices=sorted(SPIKE), default="objective", help="the column a spike is found in")
    ap.add_argument(
        "--spike",
        type=float,
        help="a spike: the column above this x its running median (3 for the objective, 10 for the bound)",
    )
    ap.add_argument("--report", nargs="+", help="summarise these probe CSVs and exit")
    ap.add_argument("--windows", type=int, help="with --report: also one summary line per this many steps")
    ap.add_argument("--plot", help="with --report: draw the probes side by side into this PNG")
    args = ap.parse_args()
    if args.report:
        for path in args.report:
            report(Path(path), args.spike, args.spike_on)
            if args.windows:
                windows(Path(path), args.windows, args.spike_on)
        if args.plot:
            plot([Path(p) for p in args.report], Path(args.plot))
        return
    report(run(args), args.spike, args.spike_on)


if __name__ == "__main__":
    main()
