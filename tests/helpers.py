"""Shared test helpers. No test touches the network: data comes from vdm.data.synthetic or
from small files the tests write."""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import yaml
from PIL import Image

from vdm.core.params import ModelParams, overlay, parse_params, parse_section, read_yaml

ROOT = Path(__file__).resolve().parents[1]

# What the tests change in params.yaml: a tiny model on a few synthetic sprites, a few steps, on
# the CPU, no tracking. Everything else is params.yaml's, so a new key needs no edit here.
TEST_OVERRIDES = {
    "data": {
        "source": "synthetic",
        "synthetic": {"count": 40},
        "limits": {"max_files": 1000, "max_mb": 64},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "preview": 16,
    },
    "model": {
        "channels": 32,
        "channel_mult": [1, 2],
        "attention_resolutions": [],  # fits any image size (the tests build it at 16 to 96)
        "patch_size": 2,
        "fourier_min": 6,
        "fourier_max": 8,
    },
    "train": {
        "steps": 6,
        "batch_size": 4,
        "lr": 0.001,
        "warmup_steps": 2,
        "fit_gamma_0": False,
        "fit_eps_scale": False,
        "log_every": 2,
        "eval_every": 3,
        "eval_images": 4,
        "fit_images": 4,
        "sample_every": 3,
        "sample_count": 2,
        "sample_steps": 3,
        "checkpoint_every": 2,
        "ema_decay": 0.999,  # a real average (params.yaml's 0 samples the raw weights): its state is tested
        "device": "cpu",
        "wandb": "disabled",
    },
    "sample": {
        "count": 4,
        "steps": 4,
        "batch_size": 4,
        "strip_rows": 2,
        "strip_points": 3,
        "denoise_last": False,
        "device": "cpu",
    },
    "evaluate": {
        "time_samples": 2,
        "batch_size": 8,
        "closest_pairs": 2,
        "swd_repeats": 2,
        "c2st_repeats": 1,
        "device": "cpu",
    },
}


BASE_PARAMS = overlay(read_yaml(ROOT / "params.yaml"), TEST_OVERRIDES, "TEST_OVERRIDES")


def raw_params(**data_overrides) -> dict:
    """A deep copy of BASE_PARAMS with data.<key> overridden."""
    p = copy.deepcopy(BASE_PARAMS)
    p["data"].update(data_overrides)
    return p


def model_params(**overrides):
    """BASE_PARAMS' model section with model.<key> overridden, for a net of any image size (the
    shape rules are checked when it is built: UNet(model, image_size))."""
    p = copy.deepcopy(BASE_PARAMS)
    p["model"].update(overrides)
    return parse_section(ModelParams, p["model"], "model")


def data_params(**data_overrides):
    return parse_params(raw_params(**data_overrides)).data


def image_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(colour, size=(20, 20), mode="RGBA") -> Image.Image:
    return Image.new(mode, size, colour)


def subprocess_env() -> dict:
    """Environment for child processes: this interpreter's venv first on PATH, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONPATH"] = ""
    return env


# --- training runs ------------------------------------------------------------------------


def tiny(**train) -> dict:
    """BASE_PARAMS at 32x32 (a training step takes milliseconds), with train.<key> overridden."""
    p = copy.deepcopy(BASE_PARAMS)
    p["data"]["image_size"] = 32
    p["model"]["attention_resolutions"] = [8]
    p["train"].update(train)
    return p


# A run long enough to be interrupted (30 steps, a checkpoint every 3), short enough for CI.
LONG = dict(steps=30, checkpoint_every=3, eval_every=0, sample_every=0, log_every=3)


def outs(base: Path):
    from vdm.training.loop import Outputs

    return Outputs(base / "models", base / "metrics", base / "plots", base / "checkpoints")


def weights(base: Path, name: str = "model.pt") -> dict:
    import torch

    return torch.load(base / "models" / name, weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def project(tmp_path: Path, processed: Path, **train_over) -> Path:
    """A project folder to run `python -m stages.train` in: code, tiny params, processed data."""
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "data/processed").exists():
        shutil.copytree(processed, tmp_path / "data/processed")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny(**train_over)))
    for name in ("vdm", "stages"):
        if not (tmp_path / name).exists():
            shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def start(proj: Path, *cmd) -> subprocess.Popen:
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    cmd = cmd or (sys.executable, "-m", "stages.train")
    return subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_id(proj: Path):
    """(inode, mtime) of the checkpoint file, or None: changes with every checkpoint written (atomic rename)."""
    try:
        (ck,) = (proj / "checkpoints").glob("*.pt")
        st = ck.stat()
    except (ValueError, FileNotFoundError):
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_checkpoint(proj: Path, p: subprocess.Popen, timeout: float = 120, new: int = 1) -> None:
    """Wait until the running stage has written `new` checkpoints that were not there before."""
    t0, seen = time.time(), checkpoint_id(proj)
    while new > 0:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)
        now = checkpoint_id(proj)
        if now is not None and now != seen:
            seen, new = now, new - 1


# --- archives -----------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def add_tar_member(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if info.isreg():
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


# --- the project as users run it: stages and DVC in a copy of the repository --------------

PROJECT_FILES = ["vdm", "stages", "presets", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"]


def run(cmd, cwd, check=True, env=None):
    p = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=300)
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
    "fit_images": 4,
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


def bare_vdm(net, schedule, **model_overrides):
    """A VDM around a test net and schedule: the plain bound (eps prediction, the ELBO, no skip, no
    weighting) unless model_overrides say otherwise."""
    from vdm.model.diffusion import VDM

    bare = dict(prediction="eps", loss_weighting="elbo", x_skip_noise=0.0, sigmoid_bias=0.0, weight_floor=0.0)
    bare |= dict(antithetic=True, timesteps=0, self_condition=False)
    return VDM(model_params(**{**bare, **model_overrides}), net, schedule)


def walk(steps: int, sampler: str = "ancestral", spacing: str = "t", **fields):
    """Sampling options for a test: the model's own walk (temperature 1, no final denoising step)
    at `steps`, unless `fields` say otherwise."""
    from vdm.core.params import SamplingOptions

    base = SamplingOptions(steps=steps, sampler=sampler, spacing=spacing, denoise_last=False, temperature=1.0)
    return base.replace(**fields)
