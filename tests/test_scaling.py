"""The scaling curve: weights saved at budgets during one run, and benchmarks/scaling.py scoring them."""

import csv
import shutil
import subprocess
import sys

import torch
import yaml

from tests.helpers import ROOT, outs, same_weights, subprocess_env, tiny, weights
from vdm.core.params import parse_params
from vdm.training.loop import train


def test_a_snapshot_is_the_model_a_run_of_that_budget_ends_with(tmp_path, processed):
    # constant lr after warm-up: a 6-step run's weights at step 4 are those of a 4-step run
    long = parse_params(tiny(steps=6, cosine_decay=False, eval_every=0, sample_every=0, checkpoint_every=2))
    out = outs(tmp_path / "long")
    out.snapshots = tmp_path / "long" / "snapshots"
    train(long, processed, out, snapshot_steps=(2, 4))
    assert sorted(p.name for p in out.snapshots.iterdir()) == ["step-000002", "step-000004"]
    short = parse_params(tiny(steps=4, cosine_decay=False, eval_every=0, sample_every=0, checkpoint_every=2))
    train(short, processed, outs(tmp_path / "short"))
    snap = out.snapshots / "step-000004"  # weights(base) reads base/models/
    for name in ("model.pt", "ema.pt"):
        assert same_weights(torch.load(snap / name, weights_only=True), weights(tmp_path / "short", name))
    assert not same_weights(torch.load(snap / "ema.pt", weights_only=True), weights(tmp_path / "long", "ema.pt"))
    early = torch.load(out.snapshots / "step-000002" / "ema.pt", weights_only=True)
    assert not same_weights(early, torch.load(snap / "ema.pt", weights_only=True))


def test_scaling_command_scores_every_budget_and_reuses_its_rows(tmp_path, processed):
    shutil.copytree(processed, tmp_path / "data" / "processed")
    for name in ("vdm", "benchmarks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny(eval_images=4)))
    cmd = [sys.executable, "benchmarks/scaling.py", "--images", "8", "16", "--out", "out", "--threads", "1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "out" / "default"
    with (d / "scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["images"], row["step"]) for row in rows] == [("8", "2"), ("16", "4")]
    for row in rows:
        assert 0 <= float(row["flatness"]) <= 1 and float(row["palette"]) >= 0 and float(row["test_bpd"]) > 0
        assert float(row["flatness_test"]) > 0 and float(row["parts_test"]) >= 1
    assert (d / "scaling.png").stat().st_size > 10_000 and (d / "strip.png").is_file()
    saved = yaml.safe_load((d / "params.yaml").read_text())
    assert saved["train"]["cosine_decay"] is False and saved["train"]["steps"] == 4
    # a second call trains nothing and scores nothing: the same table from the cached rows
    table = (d / "scaling.csv").read_text()
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "train:" not in r.stderr and (d / "scaling.csv").read_text() == table
    # a budget that is not a whole number of batches is one line
    bad = subprocess.run(
        [*cmd[:3], "10", "--out", "out"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "not multiples of train.batch_size" in bad.stderr
