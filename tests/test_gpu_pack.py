"""The GPU pack (scripts/gpu_pack.py) and the GPU check run from it (scripts/gpu_check.py).

The main test builds the pack on tiny synthetic splits, in a copy of the working tree, and runs
`gpu_check.py --tiny` with an interpreter that can import only what the GPU machine has (the
standard library, torch and what it requires, torchvision, numpy, pillow, pandas, scikit-learn,
scipy, matplotlib, pyyaml, tqdm: linked from this environment) plus the pack's wheels: proof that
the check's imports fit that machine. Offline: the wheels are rebuilt from this environment's
installed files (`--wheels installed`), for this interpreter.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, subprocess_env


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_pack = _script("gpu_pack")
gpu_check = _script("gpu_check")

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# what the GPU machine lacks: none of it may be importable without the pack
ABSENT = ("dvc", "wandb", "pydantic", "pydantic_core", "torch_fidelity", "pytest", "kagglehub", "fastapi", "vdm")
PRESENT = ("torch", "torchvision", "numpy", "PIL", "pandas", "sklearn", "scipy", "matplotlib", "yaml", "tqdm")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", **extra}


def _gpu_machine_python(base: Path) -> Path:
    """A virtual environment without this one's packages that sees, through a .pth file, a folder
    of links to exactly the GPU machine's packages as installed here (and everything they require)."""
    allowed = base / "allowed"
    allowed.mkdir(parents=True)
    for name in gpu_pack.closure(gpu_pack.MACHINE_HAS, PYTHON):
        dist = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (allowed / top).exists():
                (allowed / top).symlink_to(src)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=_clean_env())
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "gpu-machine.pth").write_text(f"{allowed}\n")
    return venv / "bin" / "python"


def _working_tree_copy(dest: Path) -> int:
    """The files the GPU machine receives (tracked, and untracked ones git does not ignore) copied
    to `dest`, made a git repository; their bytes."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    total = 0
    for name in {n for n in names.split("\0") if n}:
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / name)
            total += src.stat().st_size
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return total


def _mib(text: str, what: str) -> float:
    return float(re.search(rf"{what} ([0-9.]+) MiB", text).group(1))


def test_the_check_runs_from_the_pack_with_only_the_gpu_machines_packages(tmp_path, processed):
    proj = tmp_path / "proj"
    tree = _working_tree_copy(proj)

    # the pack, built in the copy from synthetic splits
    p = subprocess.run(
        [sys.executable, "scripts/gpu_pack.py", "--processed", str(processed), "--wheels", "installed"],
        cwd=proj,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    pack = proj / "gpu-pack"
    info = json.loads((pack / "PACK.json").read_text())
    assert info["python"] == PYTHON and set(info["data"]) == {"train.npy", "val.npy", "test.npy", "manifest.csv"}
    carried = {w["name"] for w in info["wheels"]}
    assert {"pydantic", "pydantic-core", "pytest", "typing-extensions"} <= carried
    assert not carried & {"torch", "numpy", "dvc", "wandb", "torch-fidelity"}
    # the size it reports is the real one, and within the limit
    pack_bytes = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
    assert abs(_mib(p.stdout, "working tree") - tree / 2**20) < 0.1
    assert abs(_mib(p.stdout, r"\+ pack") - pack_bytes / 2**20) < 0.1
    assert _mib(p.stdout, "=") < gpu_pack.LIMIT_MIB
    assert 'python3 scripts/gpu_check.py --pack gpu-pack --out "${OUT:-reports/gpu-check}"' in p.stdout

    # an interpreter that has only the GPU machine's packages
    python = _gpu_machine_python(tmp_path / "machine")
    probe = (
        "import importlib.util as u, sys; print(sys.flags.no_user_site, [m for m in sys.argv[1:] if u.find_spec(m)])"
    )
    p = subprocess.run([python, "-c", probe, *ABSENT, *PRESENT], cwd=tmp_path, env=_clean_env(), capture_output=True)
    assert p.stdout.decode().split(maxsplit=1) == ["1", f"{list(PRESENT)}\n"], p.stderr.decode()

    # the check, from the pack, with that interpreter
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [python, "scripts/gpu_check.py", "--tiny", "--pack", "gpu-pack", "--out", str(out), "--work", str(work)]
    p = subprocess.run(cmd, cwd=proj, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr + (out / "check.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["tiny"] and report["tests"]["exit"] == 0
    assert {f.name for f in out.iterdir()} == set(gpu_check.OUT_FILES)
    f = report["figures"]
    assert f["images_seen"] == f["images_target"] == 20 * 16 and f["training_complete"] and f["train_img_s"] > 0
    for name in ("test_bpd", "parts", "palette", "flatness", "swd", "swd_floor", "graininess"):
        assert f[name] is not None and f[name] >= 0, name
    assert report["pack"]["wheels"] and report["reused"] == []
    # the splits were unpacked into the copy's data/processed, byte for byte; the compiled module
    # of pydantic_core was extracted as a file
    for name in info["data"]:
        assert (proj / "data/processed" / name).read_bytes() == (processed / name).read_bytes()
    assert list((work / "site" / "pydantic_core").glob("_pydantic_core*.so"))


def test_bad_input_is_one_line_naming_the_problem_and_the_fix(tmp_path, processed):
    env = subprocess_env()

    def run(*args, cwd=ROOT):
        p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in p.stderr, p.stderr
        return p.returncode, p.stderr.strip()

    no_val = tmp_path / "no-val"
    shutil.copytree(processed, no_val)
    (no_val / "val.npy").unlink()
    rc, err = run(
        "scripts/gpu_pack.py", "--processed", str(no_val), "--out", str(tmp_path / "p1"), "--wheels", "installed"
    )
    assert (
        rc == 2
        and err == f"error: {no_val}/val.npy not found: run `dvc repro preprocess` first (or pass --processed DIR)"
    )
    assert not (tmp_path / "p1").exists()

    check = ["scripts/gpu_check.py", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    rc, err = run(*check, "--pack", str(tmp_path / "nowhere"))
    assert rc == 2 and err.startswith(f"error: {tmp_path}/nowhere/PACK.json not found: build it with `make gpu-pack`")
    assert len(err.splitlines()) == 1

    pack = tmp_path / "pack"
    rc, _ = run("scripts/gpu_pack.py", "--processed", str(processed), "--out", str(pack), "--wheels", "installed")
    assert rc == 0
    (pack / "data" / "val.npy.xz").unlink()
    dest = tmp_path / "processed"
    rc, err = run(*check, "--tiny", "--pack", str(pack), "--processed", str(dest))
    assert (
        rc == 2
        and err == f"error: {pack}/data/val.npy.xz is missing: rebuild the pack with `make gpu-pack` and carry it whole"
    )

    info = json.loads((pack / "PACK.json").read_text())
    (pack / "PACK.json").write_text(json.dumps({**info, "python": "3.0"}))
    rc, err = run(*check, "--tiny", "--pack", str(pack))
    assert rc == 2 and err.startswith(f"error: {pack}'s wheels are for Python 3.0, this is Python {PYTHON}: rebuild")

    # a split already there and different is never overwritten
    (pack / "PACK.json").write_text(json.dumps(info))
    (dest / "train.npy").write_bytes(b"other")
    rc, err = run(*check, "--tiny", "--pack", str(pack), "--processed", str(dest))
    assert rc == 2 and err.startswith(f"error: {dest}/train.npy exists and differs from the pack's train.npy")
    assert (dest / "train.npy").read_bytes() == b"other"


def test_a_run_cut_short_is_sampled_from_its_checkpoint(tmp_path, processed):
    """write_interim: the checkpoint's weights as a models/ folder the sample stage loads (the
    strict loader accepts its config), and its loss rows as plots/train.csv."""
    import torch
    import yaml

    from vdm.core.params import parse_params
    from vdm.model import checkpoint as ckpt
    from vdm.training.step import build_training

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "processed").symlink_to(processed)
    raw = gpu_check.run_params(tiny=True, image_size=32)
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    model, ema, opt, sched = build_training(params, torch.device("cpu"))
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # the EMA weights differ from the raw ones: the interim model must be the EMA's
    rows = [{"step": 5, "total": 7.5}, {"step": 10, "total": 6.5}]
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
    state |= {"scheduler": sched.state_dict(), "step": 10, "train_rows": rows, "val_rows": []}
    ckpt.Checkpoints(run / "checkpoints", ckpt.config_hash(params, processed)).save(state)

    assert gpu_check.write_interim(run) == 10
    loaded, config = ckpt.load_model(run / "models", "ema")
    assert config["steps"] == 10
    for k, v in ema.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert (run / "plots" / "train.csv").read_text().splitlines() == ["step,total", "5,7.5", "10,6.5"]
    assert not gpu_check.finished(run, raw["train"]["steps"])


def test_each_phase_is_asked_to_stop_then_stopped_at_its_budget(tmp_path):
    log = gpu_check.Log(tmp_path / "check.log")
    phases = gpu_check.Phases(log, "")
    # a process that ignores the stop request (as training does after its last step) is killed at the budget
    ignores = (
        "import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('noted', flush=True)); time.sleep(30)"
    )
    rc, asked, text = phases.run("slow", [sys.executable, "-c", ignores], tmp_path, budget=3, stop_at=1.5)
    assert rc == 124 and asked and "noted" in text and phases.seconds["slow"] < 5
    # one that stops when asked ends there
    stops = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); time.sleep(30)"
    rc, asked, _ = phases.run("stops", [sys.executable, "-c", stops], tmp_path, budget=20, stop_at=1)
    assert rc == 3 and asked and phases.seconds["stops"] < 5


def test_the_plan_keeps_each_later_phase_its_budget():
    plan = gpu_check.Plan(dict(gpu_check.PLAN), total=470, train_cap=None)
    fixed = sum(gpu_check.PLAN.values())
    assert plan.budget("tests") == gpu_check.PLAN["tests"]
    later = sum(v for k, v in gpu_check.PLAN.items() if k in ("interim", "sample", "evaluate"))
    assert abs(plan.budget("train") - (470 - later)) < 1
    assert "train the rest" in plan.describe() and f"(about {470 - fixed})" in plan.describe()
    assert gpu_check.Plan(dict(gpu_check.PLAN), total=470, train_cap=100).budget("train") == 100
    assert gpu_check.run_params(tiny=False)["train"]["cosine_decay"] is False
    steps, batch = gpu_check.train_steps(tiny=False)
    assert steps * batch >= 500_000 > (steps - 1) * batch


def test_a_wheel_rebuilt_from_installed_files_holds_them_all(tmp_path):
    import zipfile

    version = importlib.metadata.version("pydantic-core")
    whl = gpu_pack.wheel_from_installed("pydantic-core", version, tmp_path)
    assert whl.name.startswith(f"pydantic_core-{version}-cp{sys.version_info.major}{sys.version_info.minor}-")
    names = zipfile.ZipFile(whl).namelist()
    assert any(re.fullmatch(r"pydantic_core/_pydantic_core.*\.so", n) for n in names)
    assert f"pydantic_core-{version}.dist-info/RECORD" in names and not any("__pycache__" in n for n in names)
