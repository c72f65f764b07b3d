"""Which torch device a setting names, checked against this machine.

A setting is auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps, spelled exactly
(ASCII digits only). Asking for a device the machine lacks is a UserError naming the setting.
"""

from __future__ import annotations

import torch

from vdm.errors import UserError
from vdm.params import DEVICE_PATTERN


def resolve_device(name: str, key: str = "device", local_rank: int = 0) -> torch.device:
    """The device of setting `key` = `name`; a bare cuda (or auto on a GPU machine) is
    cuda:local_rank, so each torchrun process takes its own GPU."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"{key} = {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if mps else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key} = {name!r} but CUDA is not available here: use auto or cpu")
        if dev.index is None:
            return torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"{key} = {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not mps:
        raise UserError(f"{key} = {name!r} but MPS is not available here: use auto or cpu")
    return dev
