"""Model files and resumable checkpoints.

models/ (a DVC output):   model.pt, ema.pt (state dicts: tensors only), config.json
checkpoints/ (not DVC):   <config hash>.pt, written atomically every train.checkpoint_every
                          steps and on SIGINT/SIGTERM; removed when training completes.

The checkpoint's name is a hash of everything that decides the trained weights (model and
train params, image size, the processed data's manifest), so a run with other params or
data never resumes from it, and never overwrites it either. Everything is loaded with
torch.load(weights_only=True): no pickled code ever runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from vdm.atomic import atomic_dir, atomic_path, write_bytes, write_json
from vdm.errors import UserError
from vdm.params import Params, as_dict

# train keys that do not change what a run computes, so not part of the config hash: a checkpoint
# resumes across them (processes: the global batch and its draws are the same whatever the count,
# to float rounding)
_NOT_HASHED = ("wandb", "num_workers", "device", "compile", "processes")


def config_hash(params: Params, processed: str | os.PathLike) -> str:
    manifest = Path(processed) / "manifest.csv"
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "none"
    train = {k: v for k, v in as_dict(params.train).items() if k not in _NOT_HASHED}
    blob = json.dumps(
        {"model": as_dict(params.model), "train": train, "image_size": params.data.image_size, "data": data_id},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically, then its checksum file (see the module docstring).

    Serialised in memory first: the bytes are hashed without reading the file back, the zip's
    inner folder is always "archive" (saving to a path names it after the temporary file, so
    identical weights gave different bytes), and a full disk is an OSError from a plain write.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    side = checksum_path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        side.unlink(missing_ok=True)  # before the rename: a stale checksum never sits beside a new file
    write_bytes(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())


def _read_verified(path: Path, what: str, fix: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found. {fix}") from None
    side = checksum_path(path)
    if not side.is_file():
        print(
            f"note: {path} has no checksum file {side.name} (written before checksums existed, or the run "
            "stopped between the two writes): checked by loading only",
            file=sys.stderr,
        )
        return data
    expected = (side.read_text(errors="replace").split() or ["<empty>"])[0]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"{what} {path} is damaged (truncated or changed on disk after it was written): its sha256 is "
            f"{actual} but {side.name} records {expected}. Both files are left in place. {fix}"
        )
    return data


def load(path: str | os.PathLike, what: str, fix: str = "Delete or move it to start over") -> dict:
    path = Path(path)
    data = _read_verified(path, what, fix)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL \S+", str(e))
        if found is None:
            raise UserError(f"{what} {path} cannot be loaded ({_first_line(e)}). It is left in place. {fix}") from None
        raise UserError(
            f"{what} {path} holds pickled Python objects, not only tensors ({found.group(0).rstrip('.')}): refusing "
            f"to load it, and nothing in it was run. This pipeline never writes such files; it is left in place. {fix}"
        ) from None
    except Exception as e:  # truncated zip, bad pickle opcode, ...
        raise UserError(f"{what} {path} cannot be loaded ({_first_line(e)}). It is left in place. {fix}") from None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, key: str):
        self.dir, self.key = Path(directory), key
        self.path = self.dir / f"{key}.pt"
        self.grids = self.dir / f"{key}-samples"  # the run's sample grids until they move to plots/samples

    def others(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.pt") if p != self.path) if self.dir.is_dir() else []

    def load(self) -> dict | None:
        # Temporary files of this config's checkpoint left by a killed run (SIGKILL cannot clean
        # up). Safe: only the training run that owns this config writes them, and it has not yet.
        for tmp in self.dir.glob(f".{self.key}.pt*.tmp") if self.dir.is_dir() else ():
            tmp.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        state = load(self.path, "checkpoint", "Delete or move it (and its .sha256) to start over from step 0")
        if not isinstance(state, dict) or state.get("config_hash") != self.key:
            raise UserError(f"checkpoint {self.path} belongs to another config; delete it to start over")
        return state

    def save(self, state: dict) -> None:
        save({**state, "config_hash": self.key}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        checksum_path(self.path).unlink(missing_ok=True)
        shutil.rmtree(self.grids, ignore_errors=True)


def write_model(directory: Path, model: torch.nn.Module, ema: torch.nn.Module, config: dict) -> None:
    """model.pt, ema.pt and config.json into an (empty, staged) directory."""
    save(model.state_dict(), directory / "model.pt")
    save(ema.state_dict(), directory / "ema.pt")
    write_json(directory / "config.json", config)


def save_model(models_dir: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module, config: dict) -> None:
    """models/ is replaced whole: a failure (a full disk) leaves the previous model files intact and matching."""
    with atomic_dir(models_dir) as tmp:
        write_model(tmp, model, ema, config)


MODEL_KEYS_ADDED = {"self_condition": False}
# state-dict entries added since a model was saved: a model saved without them takes the fresh
# model's value (eps_scale: all ones, the network's own eps estimate)
STATE_KEYS_ADDED = ("eps_scale",)


def load_model(models_dir: str | os.PathLike, which: str = "ema", device: str | torch.device = "cpu"):
    """The trained VDM (EMA weights by default) and its config, as saved by the train stage."""
    from vdm.diffusion import build_vdm
    from vdm.params import ModelParams, parse_section

    d = Path(models_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} not found: train a model first (`dvc repro train`)")
    config = json.loads(cfg_path.read_text())
    # keys added to the model section since a model was saved take the behaviour from before them
    model_params = parse_section(ModelParams, {**MODEL_KEYS_ADDED, **config["params"]["model"]}, "model")
    model = build_vdm(model_params, config["params"]["data"]["image_size"])
    fix = "Restore it with `dvc checkout models`, or retrain with `dvc repro -f train`"
    state = load(d / f"{which}.pt", f"{which} weights", fix)
    fresh = model.state_dict()
    state.update({k: fresh[k] for k in STATE_KEYS_ADDED if k not in state})
    model.load_state_dict(state)
    return model.to(device).eval(), config
