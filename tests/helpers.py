"""Shared test helpers. No test touches the network: data comes from vdm.synthetic or
from small files the tests write."""

from __future__ import annotations

import copy
import io
import os
import sys
from pathlib import Path

from PIL import Image

from vdm.params import parse_params

ROOT = Path(__file__).resolve().parents[1]

BASE_PARAMS = {
    "data": {
        "source": "synthetic",
        "synthetic": {"count": 40, "seed": 0},
        "limits": {"max_files": 1000, "max_mb": 64},
        "image_size": 96,
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
        "preview": 16,
    },
    "model": {
        "schedule": "learned_nn",
        "gamma_min": -13.3,
        "gamma_max": 5.0,
        "channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [8],
        "dropout": 0.0,
        "patch_size": 2,
        "fourier_min": 6,
        "fourier_max": 8,
        "checkpointing": False,
        "antithetic": True,
        "timesteps": 0,
        "prediction": "v",
        "loss_weighting": "sigmoid",
        "sigmoid_bias": -2.0,
        "seed": 0,
    },
    "train": {
        "steps": 6,
        "batch_size": 4,
        "lr": 0.001,
        "warmup_steps": 2,
        "cosine_decay": True,
        "final_lr_fraction": 0.1,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "log_every": 2,
        "eval_every": 3,
        "eval_images": 4,
        "sample_every": 3,
        "sample_count": 2,
        "sample_steps": 3,
        "checkpoint_every": 2,
        "seed": 0,
        "device": "cpu",
        "compile": False,
        "num_workers": 0,
        "wandb": "disabled",
    },
    "sample": {
        "count": 4,
        "steps": 4,
        "batch_size": 4,
        "seed": 0,
        "strip_rows": 2,
        "strip_points": 3,
        "clip_denoised": True,
        "device": "cpu",
    },
    "evaluate": {
        "time_samples": 2,
        "batch_size": 8,
        "seed": 0,
        "inception_weights": "",
        "closest_pairs": 2,
        "device": "cpu",
    },
}


def raw_params(**data_overrides) -> dict:
    """A deep copy of BASE_PARAMS with data.<key> overridden."""
    p = copy.deepcopy(BASE_PARAMS)
    p["data"].update(data_overrides)
    return p


def model_params(**overrides):
    p = copy.deepcopy(BASE_PARAMS)
    p["model"].update(overrides)
    return parse_params(p).model


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
