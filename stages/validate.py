"""validate: params.yaml -> params.ok, before any stage that could lose outputs runs.

DVC deletes a stage's outputs just before it runs the stage's command, so a bad value found by
the train stage itself would come after models/ and the metrics were gone. Every stage depends
on params.ok, so DVC runs this check first whenever params.yaml changed: it parses the whole
file (every section, every key, the network's shape rules, the names it chooses from the
registries of samplers and loss weightings: the same checks each stage makes) and
checks what only this machine can tell: that the devices asked for exist here, that the training
processes fit its GPUs and split the batch evenly, and wandb's environment (WANDB_MODE; the
service, in online mode). On a bad value it prints one line and stops the pipeline; nothing else
has been touched. params.ok never changes (a DVC output with `persist: true`, so it is not
deleted either), so no stage reruns because of it.
"""

from pathlib import Path

from stages._cli import run
from vdm.core.errors import ParamError
from vdm.core.params import batch_split, load_params

OK = Path("params.ok")
TEXT = "params.yaml passed `python -m stages.validate` (this file never changes; see dvc.yaml)\n"


def main() -> None:
    p = load_params()
    from vdm.core.registry import check_params
    from vdm.model.weightings import WEIGHTINGS
    from vdm.sampling.steps import SAMPLERS

    check_params(p, WEIGHTINGS, SAMPLERS)  # the names params.yaml chooses from the registries
    from vdm.core.runtime import process_count, resolve_device

    resolve_device(p.train.device, "train.device")
    resolve_device(p.sample.device, "sample.device")
    resolve_device(p.evaluate.device, "evaluate.device")
    processes = process_count(p.train.processes, p.train.device)  # auto: how many this machine runs
    if why := batch_split(p.train.batch_size, processes):
        raise ParamError("train.batch_size", p.train.batch_size, f"{why} (train.processes = {p.train.processes})")
    if p.train.wandb != "disabled":
        from vdm.training.tracking import check_wandb_environment

        check_wandb_environment(p.train.wandb)
    if not OK.is_file() or OK.read_text() != TEXT:
        OK.write_text(TEXT)
    print("validate: params.yaml is valid")


if __name__ == "__main__":
    run(main, __doc__)
