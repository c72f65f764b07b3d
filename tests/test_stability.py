"""benchmarks/stability.py: the probes read what a divergence needs, and the report finds the spike."""

import csv
import json
import subprocess
import sys

import numpy as np
import torch
import yaml

from tests.helpers import ROOT, outs, same_weights
from vdm.core.params import parse_params
from vdm.model.checkpoint import load_model
from vdm.training.loop import train

SCRIPT = ROOT / "benchmarks" / "stability.py"


SETS = [
    "data.image_size=32",
    "model.channels=16",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "train.batch_size=8",
    "train.device=cpu",
    "train.precision=fp32",
]


def probe(processed, out, *extra, steps=6):
    cmd = [sys.executable, str(SCRIPT), "--steps", str(steps), "--every", "2", "--processed", str(processed)]
    cmd += ["--out", str(out), *[a for s in SETS for a in ("--set", s)], *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_probe_records_every_block_and_band(processed, tmp_path):
    probe(processed, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "probe.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    cols = rows[0].keys()
    for name in ("stem", "out", "down.0.0", "mid.0", "mid.1"):  # every block's output RMS and weights
        assert f"act:{name}" in cols and f"w:{name}" in cols and f"upd:{name}" in cols
    assert "logit_max:mid.1" in cols  # the attention at 8x8 (32 px, patch 2, one level down)
    bands = [c for c in cols if c.startswith("loss_band_")]
    assert len(bands) == 4
    for r in rows:
        assert float(r["bound"]) > 0 and float(r["grad_norm"]) > 0 and float(r["act:stem"]) > 0
        assert 0 < float(r["upd:stem"]) < 1  # a step moves the weights, by less than their norm


def test_the_report_names_the_first_spike(tmp_path):
    path = tmp_path / "probe.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "bound", "act:mid.0"])
        for step in range(10, 510, 10):
            spike = step >= 400
            w.writerow([step, 300.0 if spike else 20.0 + step % 30 / 10, 1e6 if spike else 1.5])
    out = subprocess.run([sys.executable, str(SCRIPT), "--report", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "first spike at step 400 (bound 300, running median 21" in out.stdout  # no objective column: the bound
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("act:mid.0"))
    assert line.split()[-1] == "666666.67"  # 1e6 at the spike against 1.5 ten rows before


def test_the_spike_is_the_objectives_not_a_heavy_tailed_batch_bounds(tmp_path):
    path = tmp_path / "probe.csv"
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "bound", "objective"])
        for step in range(10, 1010, 10):  # the bound one draw per image: now and then 30x its median
            bound = 15.0 * (30.0 if rng.random() < 0.1 else rng.uniform(0.5, 1.5))
            w.writerow([step, bound, (5.0 if step >= 800 else 1.0) * 0.02 * rng.uniform(0.8, 1.2)])

    def first_spike(*args):
        cmd = [sys.executable, str(SCRIPT), "--report", str(path), *args]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[0]

    assert first_spike().startswith("first spike at step 800 (objective 0.")
    assert first_spike("--spike-on", "bound").startswith("first spike at step ")  # one of the bound's draws
    assert not first_spike("--spike-on", "bound").startswith("first spike at step 800 ")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", str(path), "--windows", "500"], capture_output=True, text=True
    )
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [ln[0] for ln in lines] == ["1-500", "501-1000"]
    assert float(lines[0][2]) < 1.6 < 4.0 < float(lines[1][2])  # the objective's largest jump: in the second window


def test_a_probe_stopped_and_rerun_writes_the_rows_of_an_uninterrupted_one(processed, tmp_path):
    probe(processed, tmp_path / "whole")
    first = probe(processed, tmp_path / "parts", "--until", "3")
    assert "resuming" not in first
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "parts" / "probe.csv"))] == ["2"]
    second = probe(processed, tmp_path / "parts")
    assert "resuming from" in second and "at step 3/6" in second
    whole = (tmp_path / "whole" / "probe.csv").read_text()
    assert (tmp_path / "parts" / "probe.csv").read_text() == whole  # step for step, every figure
    other = probe(processed, tmp_path / "parts", "--set", "train.lr=0.001")  # another probe's state
    assert "starting fresh" in other


def test_a_held_probe_runs_on_past_its_steps_and_a_decayed_one_does_not(processed, tmp_path):
    held = ("--set", "train.cosine_decay=false")
    probe(processed, tmp_path / "whole", *held, steps=8)
    probe(processed, tmp_path / "parts", *held, steps=4)
    more = probe(processed, tmp_path / "parts", *held, steps=8)  # no step depends on --steps
    assert "resuming from" in more and "at step 4/8" in more
    assert (tmp_path / "parts" / "probe.csv").read_text() == (tmp_path / "whole" / "probe.csv").read_text()
    probe(processed, tmp_path / "decayed", steps=4)
    assert "starting fresh" in probe(processed, tmp_path / "decayed", steps=8)  # the cosine's length moved
    again = probe(processed, tmp_path / "parts", *held, steps=6)  # a shorter rerun keeps the longer state
    assert "at step 8 already" in again
    assert (tmp_path / "parts" / "probe.csv").read_text() == (tmp_path / "whole" / "probe.csv").read_text()


def test_a_held_probe_writes_the_scaling_runs_snapshots(processed, tmp_path):
    # the same steps as the training loop: its weights at a budget are the scaling run's snapshot
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep import apply, parse_row

    held = ("--set", "train.cosine_decay=false")
    snaps = tmp_path / "snapshots"
    probe(processed, tmp_path / "probe", *held, "--snapshots", str(snaps), "--snapshot-images", "16", "48", "20")
    assert sorted(p.name for p in snaps.iterdir()) == ["step-000002", "step-000006"]  # 20 is no whole batch
    _, sets = parse_row(" ".join(["loop", *SETS, "train.cosine_decay=false", "train.steps=6", "train.eval_every=0"]))
    raw = apply(yaml.safe_load((ROOT / "params.yaml").read_text()), {**sets, "train.sample_every": 0})
    out = outs(tmp_path / "loop")
    out.snapshots = tmp_path / "loop" / "snapshots"
    train(parse_params(apply(raw, {"train.wandb": "disabled"})), processed, out, snapshot_steps=(2, 6))
    for step in ("step-000002", "step-000006"):
        for name in ("model.pt", "ema.pt"):
            ours, theirs = (torch.load(d / step / name, weights_only=True) for d in (snaps, out.snapshots))
            assert same_weights(ours, theirs)
    assert json.loads((snaps / "step-000006" / "config.json").read_text())["steps"] == 6
    assert load_model(snaps / "step-000006", "ema") is not None  # a model folder the scorers read


def test_the_plot_draws_a_column_per_probe_titled_by_its_folder(tmp_path, monkeypatch):
    """Every probe writes OUT/probe.csv, so the plot names each column by OUT, not by the file."""
    import importlib.util

    import matplotlib.figure

    spec = importlib.util.spec_from_file_location("stability_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paths = []
    for name in ("adamw", "clip"):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "probe.csv")
        with open(paths[-1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "bound", "act:mid.0", "logit_max:mid.1", "upd:mid.0"])
            for step in (10, 20, 30):
                w.writerow([step, 30.0, 1.5, 4.0, 0.01])
    titles = []
    save = matplotlib.figure.Figure.savefig

    def keep_titles(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_titles)
    script.plot(paths, tmp_path / "probes.png")
    assert (tmp_path / "probes.png").stat().st_size > 0
    firsts = [t for t in titles if ": " in t]
    assert firsts == ["adamw: batch bound, bits/dim (log)", "clip: batch bound, bits/dim (log)"]
