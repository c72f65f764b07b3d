"""Fixtures shared by several test modules (session-scoped: built once per run)."""

import json
import uuid

import pytest

from tests.helpers import LONG, TINY_MODEL, TINY_TRAIN, copy_project, project, run, start, subprocess_env, tiny
from vdm.core.params import parse_params
from vdm.data.preprocess import preprocess
from vdm.data.sources import fetch
from vdm.model.checkpoint import save_model
from vdm.model.diffusion import build_vdm


@pytest.fixture(scope="session")
def processed(tmp_path_factory):
    """data/processed of 40 synthetic 32x32 sprites."""
    root = tmp_path_factory.mktemp("data")
    data = parse_params(tiny()).data
    fetch(data, root / "raw")
    preprocess(data, root / "raw", root / "processed", root / "data.json", workers=1)
    return root / "processed"


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, processed):
    """The project folder of an uninterrupted `python -m stages.train` run of LONG: the reference
    that interrupted-and-resumed runs must match bit for bit."""
    proj = project(tmp_path_factory.mktemp("ref"), processed, **LONG)
    p = start(proj)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return proj


class Pipeline:
    """A fresh git + DVC repository after `dvc repro` of all five stages on tiny synthetic data,
    run with credentials in the environment (see `pipeline`)."""

    def __init__(self, proj, home, env, secrets, logs):
        self.proj, self.home, self.env, self.secrets, self.logs = proj, home, env, secrets, logs

    def run(self, cmd, check=True):
        p = run(cmd, self.proj, check, self.env)
        self.logs.append(p.stdout + p.stderr)
        return p


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Shared by tests/test_pipeline.py (DVC behaviour, experiments) and tests/test_reliability.py
    (no credential leaks): one pipeline run for both. Every command runs with a W&B API key and a
    Kaggle token (environment and ~/.kaggle/kaggle.json in a temporary HOME), each a unique random
    string, and with train.wandb: offline."""
    names = ("WANDB_API_KEY", "KAGGLE_USERNAME", "KAGGLE_KEY")
    secrets = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in names}
    home = tmp_path_factory.mktemp("home")
    (home / ".kaggle").mkdir()
    token = home / ".kaggle/kaggle.json"
    token.write_text(json.dumps({"username": secrets["KAGGLE_USERNAME"], "key": secrets["KAGGLE_KEY"]}))
    token.chmod(0o600)
    env = subprocess_env() | secrets | {"HOME": str(home), "WANDB_SILENT": "true"}
    proj = copy_project(
        tmp_path_factory.mktemp("pipeline") / "repo",
        TINY_MODEL,
        {**TINY_TRAIN, "wandb": "offline"},
        source="synthetic",
        synthetic={"count": 60, "seed": 0},
        image_size=32,
    )
    pl = Pipeline(proj, home, env, secrets, [])
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.invalid"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        pl.run(cmd)
    pl.first = pl.run(["dvc", "repro"])
    return pl


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A models/ folder as the train stage writes it: a tiny 32x32 VDM, untrained (its output
    layer starts at zero, so its probability-flow ODE is smooth; random weights make it chaotic)."""
    raw = tiny()
    raw["model"].update(channels=16, channel_mult=[1, 2], attention_resolutions=[], patch_size=2)
    p = parse_params(raw)
    model = build_vdm(p.model, p.data.image_size)
    ema = build_vdm(p.model, p.data.image_size)
    d = tmp_path_factory.mktemp("m") / "models"
    save_model(d, model, ema, {"params": raw, "steps": 3, "config_hash": "x", "run_name": "t"})
    return d


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: a worker a core, `--dist loadgroup`), a file's tests run in one
    worker, so its module fixtures are built once, and the tests of the two shared fixtures that
    cost a minute (the pipeline, the uninterrupted training run) share one worker, whatever file
    they are in. Without xdist (a plain `pytest`, the GPU check) nothing is marked."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        shared = [name for name in ("pipeline", "uninterrupted") if name in getattr(item, "fixturenames", ())]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::")[0]))
