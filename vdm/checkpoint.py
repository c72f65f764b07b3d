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
import json
import os
from pathlib import Path

import torch

from vdm.atomic import atomic_path, write_json
from vdm.errors import UserError
from vdm.params import Params, as_dict

# Params that provably do not change the trained weights: not part of the config hash.
_NOT_HASHED = ("wandb", "num_workers", "device", "compile")


def config_hash(params: Params, processed: str | os.PathLike) -> str:
    manifest = Path(processed) / "manifest.csv"
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "none"
    train = {k: v for k, v in as_dict(params.train).items() if k not in _NOT_HASHED}
    blob = json.dumps(
        {"model": as_dict(params.model), "train": train, "image_size": params.data.image_size, "data": data_id},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save(obj: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, forbidden global, ...
        raise UserError(
            f"{what} {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"It is left in place: delete or move it to start over"
        ) from None


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, key: str):
        self.dir, self.key = Path(directory), key
        self.path = self.dir / f"{key}.pt"

    def others(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.pt") if p != self.path) if self.dir.is_dir() else []

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = load(self.path, "checkpoint")
        if state.get("config_hash") != self.key:
            raise UserError(f"checkpoint {self.path} belongs to another config; delete it to start over")
        return state

    def save(self, state: dict) -> None:
        save({**state, "config_hash": self.key}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def save_model(models_dir: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module, config: dict) -> None:
    d = Path(models_dir)
    save(model.state_dict(), d / "model.pt")
    save(ema.state_dict(), d / "ema.pt")
    write_json(d / "config.json", config)


def load_model(models_dir: str | os.PathLike, which: str = "ema", device: str | torch.device = "cpu"):
    """The trained VDM (EMA weights by default) and its config, as saved by the train stage."""
    from vdm.diffusion import build_vdm
    from vdm.params import ModelParams, parse_section

    d = Path(models_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} not found: train a model first (`dvc repro train`)")
    config = json.loads(cfg_path.read_text())
    model_params = parse_section(ModelParams, config["params"]["model"], "model")
    model = build_vdm(model_params, config["params"]["data"]["image_size"])
    model.load_state_dict(load(d / f"{which}.pt", f"{which} weights"))
    return model.to(device).eval(), config
