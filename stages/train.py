"""train: data/processed -> models/ (model.pt, ema.pt, config.json), metrics/train.json,
metrics/train_perf.json, plots/ (train.csv, val.csv, samples/).

With train.processes > 1 (auto: one per CUDA device) the stage launches that many processes
itself (DistributedDataParallel; train.batch_size is the global batch). Under torchrun it is one
of torchrun's processes: torchrun --standalone --nproc_per_node=N -m stages.train
"""

import os

from stages._cli import run
from vdm.core.params import load_params
from vdm.core.registry import check_params
from vdm.core.runtime import launch, process_count
from vdm.model.weightings import WEIGHTINGS
from vdm.training.loop import train


def main() -> None:
    params = load_params()
    check_params(params, WEIGHTINGS)
    n = process_count(params.train.processes, params.train.device)
    if n > 1 and "WORLD_SIZE" not in os.environ:
        launch(n, "stages.train")
        return
    r = train(params)
    if r:
        print(
            f"train: {r['steps']} steps, val {r['val_bpd']:.3f} +- {r['val_bpd_se']:.3f} bits/dim (EMA), "
            f"train {r['train_bpd']:.3f}, {r['img_per_s']:.1f} img/s on {r['device']} x{r['processes']}, "
            f"{r['wall_s']:.0f} s + {r['fits_s']:.0f} s fits + {r['final_eval_s']:.0f} s final bits/dim and grid, "
            f"peak {r['peak_memory_mb']} MB"
        )


if __name__ == "__main__":
    run(main, __doc__)
