"""Experiment tracking: Weights & Biases (offline by default) and DVC's plot files.

wandb modes: `offline` (no account needed; `wandb sync wandb/offline-run-*` uploads later),
`online` (needs WANDB_API_KEY in the environment: it is read from there only and never
written by this project), `disabled` (tests). The run is named after the DVC experiment
(DVC_EXP_NAME, set by `dvc exp run`) or, for `dvc repro`, after the config hash. Runs land in
the repository's wandb/, also those of experiments DVC runs in a temporary copy (see wandb_root).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from vdm.core.atomic import write_bytes
from vdm.core.errors import UserError

WANDB_MODES = ("offline", "online", "disabled")


def check_wandb_environment(mode: str) -> None:
    """Refuse, in one line, what wandb would refuse with a traceback (or a long wait): an empty or
    unknown WANDB_MODE in the environment, and online mode with the service out of reach."""
    if "WANDB_MODE" in os.environ and os.environ["WANDB_MODE"] not in (*WANDB_MODES, "dryrun", "run"):
        raise UserError(
            f"environment variable WANDB_MODE = {os.environ['WANDB_MODE'][:40]!r} is not one of "
            f"{', '.join(WANDB_MODES)}: unset it (train.wandb in params.yaml then decides) or set it to one of those"
        )
    if mode == "online" and os.environ.get("WANDB_MODE", "online") in ("online", "run"):
        import socket
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
        host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as e:
            raise UserError(
                f"train.wandb = 'online' but {host}:{port} cannot be reached ({e.__class__.__name__}): "
                "use train.wandb: offline and upload later with `wandb sync wandb/offline-run-*`"
            ) from None


def wandb_root(cwd: str | os.PathLike | None = None) -> Path:
    """The folder whose wandb/ receives the runs: the working directory, except in the temporary
    copy of the repository that DVC runs an experiment in (`dvc exp run --temp` and queued
    experiments: <repo>/.dvc/tmp/exps/...), which DVC deletes afterwards: there, the repository's own."""
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def run_name(config_key: str) -> str:
    return os.environ.get("DVC_EXP_NAME") or f"repro-{config_key[:8]}"


class Tracker:
    def __init__(self, mode: str, config: dict, name: str, enabled: bool = True):
        self.run = None
        if mode == "disabled" or not enabled:
            return
        check_wandb_environment(mode)
        import wandb  # slow to import; only when tracking

        self._wandb = wandb
        self.run = wandb.init(
            project="vdm-pokemon",
            name=name,
            mode=mode,
            config=config,
            dir=str(wandb_root()),
            settings=wandb.Settings(console="off"),
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def image(self, key: str, grid: np.ndarray, step: int, caption: str = "") -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(grid, caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def write_csv(path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) as a CSV file for `dvc plots`, written atomically."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())
