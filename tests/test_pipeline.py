"""The stages as users run them: through `python -m stages.X` and through DVC in a fresh
git repository on synthetic data (no network)."""

import json
import sys

import pytest
import yaml

from tests.helpers import ROOT, copy_project, run


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


@pytest.mark.parametrize("stage", ["download", "preprocess", "train", "sample", "evaluate"])
def test_every_stage_answers_help_and_refuses_unknown_arguments_before_any_work(tmp_path, stage):
    proj = copy_project(tmp_path / "p")
    before = sorted(p.relative_to(proj) for p in proj.rglob("*"))
    h = run([sys.executable, "-m", f"stages.{stage}", "--help"], proj, check=False)
    assert h.returncode == 0 and h.stdout.startswith(f"usage: python -m stages.{stage}") and "params.yaml" in h.stdout
    bad = run([sys.executable, "-m", f"stages.{stage}", "--steps", "3"], proj, check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --steps 3" in bad.stderr and "Traceback" not in bad.stderr
    assert sorted(p.relative_to(proj) for p in proj.rglob("*")) == before  # nothing written, nothing removed


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


def test_dvc_repro_end_to_end_in_a_fresh_repo(pipeline):
    """The shared `pipeline` fixture ran `dvc repro` in a fresh repository; then experiments."""
    proj, first = pipeline.proj, pipeline.first

    for stage in ("download", "preprocess", "train", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((proj / "metrics/data.json").read_text())
    assert metrics["images"] == 60 and metrics["source"] == "synthetic"
    assert json.loads((proj / "data/raw/SOURCE.json").read_text())["files"] == 60
    for split in ("train", "val", "test"):
        assert (proj / f"data/processed/{split}.npy").is_file()
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "download", "preprocess", "train", "sample", "evaluate"}
    ev = json.loads((proj / "metrics/eval.json").read_text())
    assert ev["test_bpd"] > 0 and ev["sample_count"] == 4 and (ev["fid"] is None) == bool(ev["fidelity_skipped"])
    assert (proj / "samples/grid.png").is_file() and (proj / "samples/strip.png").is_file()
    assert (proj / "models/ema.pt").is_file() and json.loads((proj / "metrics/train.json").read_text())["steps"] == 4

    second = pipeline.run(["dvc", "repro"])
    assert "Running stage" not in second.stdout and "up to date" in second.stdout

    shown = json.loads(pipeline.run(["dvc", "metrics", "show", "--json"]).stdout)
    assert json.dumps(shown).count('"images": 60') == 1
    plots = json.loads(pipeline.run(["dvc", "plots", "show", "--json"]).stdout)["data"]
    assert {"train loss (bits/dim)", "validation bits/dim (EMA)"} <= set(plots)
    assert "step-000004.png" in json.dumps(plots)

    pipeline.run(["git", "add", "-A"])
    pipeline.run(["git", "commit", "-qm", "baseline"])
    exp = pipeline.run(["dvc", "exp", "run", "-S", "data.synthetic.count=80", "preprocess"])
    assert "Running stage 'download'" in exp.stdout  # the changed param reruns its stage and what follows
    assert json.loads((proj / "metrics/data.json").read_text())["images"] == 80
    diff = pipeline.run(["dvc", "metrics", "diff", "--json"]).stdout
    assert json.loads(diff)["metrics/data.json"]["images"] == {"old": 60, "new": 80, "diff": 20}

    lr = pipeline.run(["dvc", "exp", "run", "-n", "lr-3e-3", "-S", "train.lr=0.003"])
    assert "Running stage 'train'" in lr.stdout and "Running stage 'preprocess'" not in lr.stdout
    assert "Running stage 'evaluate'" in lr.stdout
    # W&B (offline) names the run after the DVC experiment
    assert json.loads((proj / "models/config.json").read_text())["run_name"] == "lr-3e-3"
    assert len(list((proj / "wandb").glob("offline-run-*/*.wandb"))) == 2  # dvc repro, then this experiment
    assert "0.003" in pipeline.run(["dvc", "exp", "show", "--no-pager", "--csv"]).stdout


def test_smoke_preset_runs_the_whole_pipeline_in_a_temporary_copy(pipeline):
    """`python scripts/preset.py smoke -- --temp`: all five stages on synthetic data, recorded as an
    experiment, the workspace's outputs untouched; `dvc exp show` filters and exports it."""
    proj = pipeline.proj
    before = {p: p.read_bytes() for p in (proj / "metrics").glob("*.json")}
    runs = set((proj / "wandb").glob("offline-run-*"))
    run = pipeline.run([sys.executable, str(ROOT / "scripts/preset.py"), "smoke", "--", "--temp"])
    for stage in ("download", "preprocess", "train", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout
    assert {p: p.read_bytes() for p in (proj / "metrics").glob("*.json")} == before
    # its W&B run outlives the temporary copy DVC ran it in: it is in the repository's wandb/
    (new,) = set((proj / "wandb").glob("offline-run-*")) - runs
    assert list(new.glob("*.wandb")) and b"smoke" in b"".join(f.read_bytes() for f in new.rglob("*") if f.is_file())
    table = pipeline.run(
        ["dvc", "exp", "show", "--no-pager", "--csv", "--drop", ".*", "--keep", r"^(Experiment|test_bpd|train\.steps)$"]
    ).stdout
    header, *rows = table.strip().splitlines()
    assert header.split(",") == ["Experiment", "test_bpd", "train.steps"]
    (smoke,) = [r.split(",") for r in rows if r.startswith("smoke,")]
    assert float(smoke[1]) > 0 and smoke[2] == "60"


def _snapshot(proj):
    """Every file of the project outside .git and DVC's own folder, as bytes."""
    skip = (".git", ".dvc")
    return {
        p.relative_to(proj): p.read_bytes()
        for p in proj.rglob("*")
        if p.is_file() and p.relative_to(proj).parts[0] not in skip
    }


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lr", -1, "train.lr = -1"),
        ("sample.steps", 0, "sample.steps = 0 is invalid"),
        ("train.device", "cuda:7", "train.device = 'cuda:7'"),
        # the network's shape rules (the project: 32x32 images, patch 2, channels 32, channel_mult [1, 2])
        ("data.image_size", 33, "model.patch_size = 2 is invalid"),
        ("model.patch_size", 4, "model.channels = 32 is invalid"),
        ("data.image_size", 34, "model.channel_mult = [1, 2] is invalid"),
        ("model.attention_resolutions", [5], "model.attention_resolutions = [5] is invalid"),
        ("train.processes", 3, "train.batch_size = 4 is invalid"),
    ],
)
def test_a_bad_param_stops_dvc_repro_before_any_output_is_deleted(pipeline, key, value, message):
    proj = pipeline.proj
    params_path = proj / "params.yaml"
    original = params_path.read_text()
    before = _snapshot(proj)
    params = yaml.safe_load(original)
    section, leaf = key.split(".")
    params[section][leaf] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        p = pipeline.run(["dvc", "repro"], check=False)
        assert p.returncode != 0 and message in p.stderr + p.stdout
        assert "Running stage 'train'" not in p.stdout and "Running stage 'sample'" not in p.stdout
        after = _snapshot(proj)
        assert set(after) == set(before)
        changed = sorted(str(k) for k in before if before[k] != after[k])
        assert changed == ["params.yaml"]
    finally:
        params_path.write_text(original)


def test_a_config_trained_before_comes_from_the_run_cache(pipeline):
    """Train with another lr, then go back: the train stage is restored from DVC's run cache
    (its plots are declared as plots, so the stage is cacheable), not retrained."""
    proj = pipeline.proj
    pipeline.run(["dvc", "repro"])
    ema = (proj / "models/ema.pt").read_bytes()
    params_path = proj / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = 0.0005
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'train'" in pipeline.run(["dvc", "repro", "train"]).stdout
    params_path.write_text(original)
    back = pipeline.run(["dvc", "repro", "train"])
    assert "Stage 'train' is cached - skipping run, checking out outputs" in back.stdout, back.stdout
    assert (proj / "models/ema.pt").read_bytes() == ema


# Modules no stage's outputs can depend on: the packages' docstrings (every __init__.py), and the
# error classes (they only word messages). Everything else a stage imports, at any depth, must be a
# dep in dvc.yaml: a module itself, or a folder whose every module the stage imports.
NOT_DEPS = {"vdm/core/errors.py"}


def _not_dep(path: str) -> bool:
    return path in NOT_DEPS or path.endswith("__init__.py")


def _imported_modules(path):
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # module-level and function-local imports
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def import_closure(root, module):
    """The project's .py files that `python -m module` can import, followed transitively."""
    seen, todo = set(), [root / (module.replace(".", "/") + ".py")]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imported_modules(f):
            p = root / (name.replace(".", "/") + ".py")
            if name.split(".")[0] in ("vdm", "stages") and p.is_file():
                todo.append(p)
    return {p.relative_to(root).as_posix() for p in seen}


def covered(root, deps):
    """The modules the .py deps and the folder deps among `deps` name: {folder: its modules}, the files."""
    folders, files = {}, set()
    for d in deps:
        if d.endswith(".py"):
            files.add(d)
        elif (root / d).is_dir() and d.split("/")[0] in ("vdm", "stages"):
            folders[d] = {p.relative_to(root).as_posix() for p in (root / d).rglob("*.py")}
    return folders, files


def check_deps(root, stages):
    """For each stage: the modules it imports (at any depth) are exactly those its deps name, and
    every folder it lists holds only modules it imports, so a change to any other reruns nothing."""
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ")
        needed = {m for m in import_closure(root, module) if not _not_dep(m)}
        folders, files = covered(root, stage["deps"])
        listed = {m for m in files.union(*folders.values()) if not _not_dep(m)}
        assert not needed - listed, f"{name}: imports {sorted(needed - listed)}, not in its deps"
        assert not listed - needed, f"{name}: lists {sorted(listed - needed)}, which it never imports"
        for folder, mods in folders.items():
            assert any(not _not_dep(m) for m in mods), f"{name}: {folder} holds no module"


def test_every_stage_lists_exactly_the_modules_it_imports_as_deps():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"validate", "download", "preprocess", "train", "sample", "evaluate"}
    check_deps(ROOT, stages)
    for init in (ROOT / "vdm").rglob("__init__.py"):  # docstrings only: they are no stage's dep
        assert not _imported_modules(init), init


def test_the_dep_check_fails_on_a_missing_module_or_a_folder_with_one_not_imported(tmp_path):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train = stages["train"]
    short = {"train": {**train, "deps": [d for d in train["deps"] if d != "vdm/model"]}}
    with pytest.raises(AssertionError, match="not in its deps"):
        check_deps(ROOT, short)
    wide = {"train": {**train, "deps": [*train["deps"], "vdm/app"]}}  # the train stage imports no app module
    with pytest.raises(AssertionError, match="never imports"):
        check_deps(ROOT, wide)
