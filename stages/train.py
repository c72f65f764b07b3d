"""train: data/processed -> models/ (model.pt, ema.pt, config.json), metrics/train.json,
metrics/train_perf.json, plots/ (train.csv, val.csv, samples/).

Also runs under torchrun for DistributedDataParallel: torchrun --nproc_per_node=N -m stages.train
"""

from stages._cli import run
from vdm.params import load_params
from vdm.training import train


def main() -> None:
    r = train(load_params())
    if r:
        print(
            f"train: {r['steps']} steps, val {r['val_bpd']:.3f} +- {r['val_bpd_se']:.3f} bits/dim (EMA), "
            f"train {r['train_bpd']:.3f}, {r['img_per_s']:.1f} img/s on {r['device']} x{r['processes']}, "
            f"{r['wall_s']:.0f} s, peak {r['peak_memory_mb']} MB"
        )


if __name__ == "__main__":
    run(main, __doc__)
