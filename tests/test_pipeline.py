"""The stages as users run them: through `python -m stages.X` and through DVC in a fresh
git repository on synthetic data (no network)."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, subprocess_env

PROJECT_FILES = ["vdm", "stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"]


def run(cmd, cwd, check=True):
    p = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


TINY_TRAIN = {
    "steps": 4,
    "batch_size": 4,
    "warmup_steps": 1,
    "log_every": 2,
    "eval_every": 0,
    "eval_images": 4,
    "sample_every": 0,
    "sample_count": 2,
    "sample_steps": 2,
    "checkpoint_every": 2,
    "device": "cpu",
    "wandb": "disabled",
}
TINY_MODEL = {"channels": 32, "channel_mult": [1, 2], "attention_resolutions": [8], "patch_size": 2}


TINY_SAMPLE = {"count": 4, "steps": 2, "batch_size": 4, "strip_rows": 2, "strip_points": 2, "device": "cpu"}


def copy_project(dest, model=None, train=None, **data):
    dest.mkdir(exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"].update(data)
    params["model"].update(model or {})
    params["train"].update(train or {})
    params["sample"].update(TINY_SAMPLE)
    params["evaluate"].update(time_samples=1, device="cpu")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.mark.parametrize(
    "data,message",
    [
        ({"source": "nowhere/at/all"}, "data.source = 'nowhere/at/all' is invalid"),
        ({"split": {"train": 0.5, "val": 0.2, "test": 0.2, "seed": 0}}, "sum to 1"),
        ({"image_size": "large"}, "data.image_size"),
    ],
)
def test_bad_params_give_one_clear_line_and_no_traceback(tmp_path, data, message):
    proj = copy_project(tmp_path / "p", **data)
    p = run([sys.executable, "-m", "stages.download"], proj, check=False)
    assert p.returncode == 2 and message in p.stderr
    assert "Traceback" not in p.stderr and not (proj / "data").exists()


def test_bad_archive_source_is_refused_by_the_stage(tmp_path):
    import zipfile

    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../evil", b"x")
    proj = copy_project(tmp_path / "p", source=str(z))
    p = run([sys.executable, "-m", "stages.download"], proj, check=False)
    assert p.returncode == 2 and "'..'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "evil").exists() and not (proj / "data/evil").exists()


def test_preprocess_before_download_says_what_to_run(tmp_path):
    proj = copy_project(tmp_path / "p", source="synthetic")
    p = run([sys.executable, "-m", "stages.preprocess"], proj, check=False)
    assert p.returncode == 2 and "dvc repro download" in p.stderr and "Traceback" not in p.stderr


def test_dvc_repro_end_to_end_in_a_fresh_repo(tmp_path):
    proj = copy_project(
        tmp_path / "repo", TINY_MODEL, TINY_TRAIN, source="synthetic", synthetic={"count": 60, "seed": 0}, image_size=32
    )
    run(["git", "init", "-q"], proj)
    run(["git", "config", "user.email", "t@example.invalid"], proj)
    run(["git", "config", "user.name", "test"], proj)
    run(["dvc", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "init"], proj)

    first = run(["dvc", "repro"], proj)
    for stage in ("download", "preprocess", "train", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((proj / "metrics/data.json").read_text())
    assert metrics["images"] == 60 and metrics["source"] == "synthetic"
    assert json.loads((proj / "data/raw/SOURCE.json").read_text())["files"] == 60
    for split in ("train", "val", "test"):
        assert (proj / f"data/processed/{split}.npy").is_file()
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "preprocess", "train", "sample", "evaluate"}
    ev = json.loads((proj / "metrics/eval.json").read_text())
    assert ev["test_bpd"] > 0 and ev["samples"] == 4 and (ev["fid"] is None) == bool(ev["fidelity_skipped_reason"])
    assert (proj / "samples/grid.png").is_file() and (proj / "samples/strip.png").is_file()
    assert (proj / "models/ema.pt").is_file() and json.loads((proj / "metrics/train.json").read_text())["steps"] == 4

    second = run(["dvc", "repro"], proj)
    assert "Running stage" not in second.stdout and "up to date" in second.stdout

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], proj).stdout)
    assert json.dumps(shown).count('"images": 60') == 1
    plots = json.loads(run(["dvc", "plots", "show", "--json"], proj).stdout)["data"]
    assert {"train loss (bits/dim)", "validation bits/dim (EMA)"} <= set(plots)
    assert "step-000004.png" in json.dumps(plots)

    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)
    exp = run(["dvc", "exp", "run", "-S", "data.synthetic.count=80", "preprocess"], proj)
    assert "Running stage 'download'" in exp.stdout  # the changed param reruns its stage and what follows
    assert json.loads((proj / "metrics/data.json").read_text())["images"] == 80
    diff = run(["dvc", "metrics", "diff", "--json"], proj).stdout
    assert json.loads(diff)["metrics/data.json"]["images"] == {"old": 60, "new": 80, "diff": 20}

    lr = run(["dvc", "exp", "run", "-S", "train.lr=0.003"], proj)
    assert "Running stage 'train'" in lr.stdout and "Running stage 'preprocess'" not in lr.stdout
    assert "Running stage 'evaluate'" in lr.stdout
    assert "0.003" in run(["dvc", "exp", "show", "--no-pager", "--csv"], proj).stdout
