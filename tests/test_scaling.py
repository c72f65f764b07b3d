"""The scaling curve: weights saved at budgets during one run, and benchmarks/scaling.py scoring them."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
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
    # a setting no score reads (the filtered figures of the evaluate stage) keeps the cached rows
    stamp = (d / "scores" / "step-000002.json").stat().st_mtime_ns
    r = subprocess.run(
        [*cmd, "--set", "evaluate.filter_colours=0"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert r.returncode == 0 and (d / "scores" / "step-000002.json").stat().st_mtime_ns == stamp, r.stderr[-2000:]
    # other sampling settings score again (and train nothing); the rows record what they were scored with
    cached = json.loads((d / "scores" / "step-000002.json").read_text())["scored_with"]["sample"]
    assert cached["temperature"] == tiny()["sample"]["temperature"] != 0.5
    r = subprocess.run(
        [*cmd, "--set", "sample.temperature=0.5"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "train:" not in r.stderr, r.stderr[-2000:]
    assert json.loads((d / "scores" / "step-000002.json").read_text())["scored_with"]["sample"]["temperature"] == 0.5
    # a budget that is not a whole number of batches is one line
    bad = subprocess.run(
        [*cmd[:3], "10", "--out", "out"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "not multiples of train.batch_size" in bad.stderr


def test_denoiser_rows_tell_an_exact_denoiser_from_the_identity(processed):
    import numpy as np

    from benchmarks.denoiser import denoiser_rows
    from vdm.evaluation.metrics import flatness, palette
    from vdm.model.conversions import alpha_sigma, encode

    test = np.load(processed / "test.npy")[:4]
    clean = encode(torch.from_numpy(test).permute(0, 3, 1, 2))

    class Exact:  # knows the clean sprites
        def x_hat(self, z, gamma):
            return clean

    class Identity:  # z_t / alpha_t
        def x_hat(self, z, gamma):
            return z / alpha_sigma(gamma)[0].view(-1, 1, 1, 1)

    exact, same = denoiser_rows(Exact(), test), denoiser_rows(Identity(), test)
    looks = (np.mean([palette(im) for im in test]), np.mean([flatness(im) for im in test]))
    for e, s in zip(exact, same, strict=True):
        assert e["rms_x_hat"] == 0 and (e["palette"], e["flatness"]) == pytest.approx(looks)
        assert s["rms_x_hat"] == pytest.approx(s["rms_identity"]) and s["palette"] == s["palette_identity"]
    noise = [s["rms_identity"] for s in same]
    assert noise == sorted(noise) and noise[0] < 1.5 < 20 < noise[-1]  # levels: gamma -10 ... 2, clipped


def test_denoiser_command_on_a_trained_model(tmp_path, processed):
    import json

    train(parse_params(tiny(steps=2, eval_every=0, sample_every=0)), processed, outs(tmp_path / "run"))
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/denoiser.py"), str(tmp_path / "run/models")]
    cmd += ["--test", str(processed / "test.npy"), "--count", "3", "--json", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["gamma"] for row in rows] == [-10, -8, -6, -4, -2, 0, 2] and "3 test sprites" in r.stdout
    missing = subprocess.run(
        cmd[:2] + [str(tmp_path / "nowhere")], env=subprocess_env(), capture_output=True, text=True
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def _finished_run(path, channels, steps_timed=None, **figures):
    """A run's directory as `dvc repro` leaves it: params.yaml, metrics/train_perf.json, metrics/eval.json."""
    raw = tiny()
    raw["model"]["channels"] = channels
    (path / "metrics").mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    steps = raw["train"]["steps"] if steps_timed is None else steps_timed
    (path / "metrics/train_perf.json").write_text(json.dumps({"img_per_s": 30.5, "steps_this_run": steps}))
    ev = {"c2st": 0.7, "c2st_se": 0.04, "c2st_floor": 0.51, "palette": 250.0, "palette_se": 8.0, "swd": 40.0}
    (path / "metrics/eval.json").write_text(json.dumps(ev | figures))
    return raw


def test_the_isoflop_rows_come_from_finished_runs_and_a_shape_replaces_its_own_row(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks" / "isoflop.py")]
    files = ["--csv", str(tmp_path / "iso.csv"), "--png", str(tmp_path / "iso.png")]
    raw = _finished_run(tmp_path / "narrow", 16)
    _finished_run(tmp_path / "wide", 24, c2st=0.6)
    _finished_run(tmp_path / "wide-again", 24, c2st=0.55)
    for run, budget in [("narrow", "long"), ("wide", "long"), ("wide-again", "long"), ("narrow", "short")]:
        p = subprocess.run([*script, "add", str(tmp_path / run), "--budget", budget, *files], **_quiet())
        assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "iso.csv").open()))
    assert [(r["budget"], r["channels"], r["c2st"]) for r in rows] == [
        ("long", "16", "0.7"),
        ("long", "24", "0.55"),  # the rerun of a shape replaced its row
        ("short", "16", "0.7"),
    ]
    assert int(rows[0]["params"]) < int(rows[1]["params"])  # the net's size, from its shape
    assert int(rows[0]["images"]) == raw["train"]["steps"] * raw["train"]["batch_size"]
    assert rows[0]["img_s"] == "30.5" and rows[0]["palette_se"] == "8" and rows[0]["parts"] == ""
    assert (tmp_path / "iso.png").stat().st_size > 10_000
    # a resumed run's rate is not the whole run's; an unfinished run has no metrics: one line each
    _finished_run(tmp_path / "resumed", 16, steps_timed=1)
    (tmp_path / "unfinished").mkdir()
    for run, message in [
        ("resumed", "(a resumed run)"),
        ("unfinished", "not a finished run: params.yaml, metrics/eval.json"),
    ]:
        p = subprocess.run([*script, "add", str(tmp_path / run), "--budget", "long", *files], **_quiet())
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert len(list(csv.DictReader((tmp_path / "iso.csv").open()))) == 3  # nothing written


def _quiet() -> dict:
    return {"cwd": ROOT, "env": subprocess_env(), "capture_output": True, "text": True, "timeout": 300}


def test_a_sweep_row_trained_before_is_scored_without_training_it_again(tmp_path, processed):
    """benchmarks/sweep.py: a row whose training ended (models and metrics written) but whose
    scoring did not is found again, for the same settings and data only."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep import apply, finished_training

    raw = tiny(steps=3, eval_every=0, sample_every=0, wandb="disabled")
    p = parse_params(raw)
    assert finished_training(tmp_path, p, processed) is None  # nothing trained yet
    result = train(p, processed, outs(tmp_path))
    found = finished_training(tmp_path, p, processed)
    assert found["val_bpd"] == result["val_bpd"] and found["img_per_s"] == result["img_per_s"]
    assert finished_training(tmp_path, parse_params(apply(raw, {"train.steps": 4})), processed) is None
    assert finished_training(tmp_path, parse_params(apply(raw, {"train.lr": 1e-4})), processed) is None
    (tmp_path / "metrics" / "train_perf.json").unlink()
    assert finished_training(tmp_path, p, processed) is None
    with pytest.raises(SystemExit, match="sweep: train.learning_rate is not a key of params.yaml"):
        apply(raw, {"train.learning_rate": 1e-4})
