"""Where a stage runs: the device a setting names, the precision the network computes in, the
process group under torchrun.

A device setting is auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps, spelled exactly
(ASCII digits only). Asking for a device the machine lacks is a UserError naming the setting.
Training, sampling, evaluation and profiling all take their device from here.

A precision setting is auto | fp32 | bf16: the dtype the network's matmuls and convolutions run in
under autocast (vdm.model.diffusion.VDM.net_dtype); the schedule, the loss, the decoder and the
bound stay fp32 whatever it says. auto is bf16 on CUDA and on a CPU whose flags report bf16
dot-product instructions (avx512_bf16 or AMX), fp32 elsewhere: a CPU without them emulates bf16
more slowly than it runs fp32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vdm.core.errors import UserError
from vdm.core.params import DEVICE_PATTERN, PRECISIONS

CPUINFO = "/proc/cpuinfo"


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


def set_deterministic(device: torch.device) -> None:
    """Same params, same data, same CPU type => bit-identical results: on a CPU every op takes
    its deterministic kernel (warn-only: the few without one are already deterministic there)."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def allow_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (fp32 range, 10-bit mantissa; Ampere and later)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_bf16() -> bool:
    """Whether this CPU reports bf16 dot-product instructions (the flags avx512_bf16 or amx_bf16 in
    /proc/cpuinfo, CPUINFO); False where the file cannot be read (not Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def resolve_precision(setting: str, device: torch.device, key: str = "precision") -> torch.dtype:
    """The dtype the network computes in for precision setting `key` = `setting` on `device`."""
    if setting not in PRECISIONS:
        raise UserError(f"{key} = {setting!r} is not one of {', '.join(PRECISIONS)}")
    if setting == "fp32" or (setting == "auto" and device.type not in ("cpu", "cuda")):
        return torch.float32
    if setting == "auto" and device.type == "cpu" and not cpu_has_bf16():
        return torch.float32
    return torch.bfloat16


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Under torchrun (WORLD_SIZE > 1): join the process group, nccl when the processes train
    on CUDA (`device`, the train.device setting, resolves to it), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def process_count(setting: int | str, device: str) -> int:
    """How many training processes `train.processes` asks for on this machine: auto is one per
    CUDA device when train.device may take any of them (auto or cuda), else 1. (Several processes on
    one cuda:N device are refused by params validation.)"""
    if setting == "auto":
        return torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.device_count() > 1 else 1
    if device.startswith("cuda") and torch.cuda.is_available() and setting > torch.cuda.device_count():
        raise UserError(
            f"train.processes = {setting} but this machine has {torch.cuda.device_count()} CUDA device(s): "
            "use auto or at most that many"
        )
    return int(setting)


def launch(processes: int, module: str) -> None:
    """Run `python -m module` in `processes` processes on this machine through torch.distributed's
    elastic launcher (what torchrun --standalone does); each joins the process group in
    init_distributed. A process that fails has printed its own error: this says which one."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", module)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise UserError(
            f"{module}: process {rank} of {processes} failed (exit code {failure.exitcode}); its message is above"
        ) from None
