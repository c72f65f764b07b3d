"""Finish a held run with a decay: write its state as the checkpoint of a run (a preset, or
params.yaml) whose decay (train.decay_steps) starts at or after the state's step; the train stage
then resumes from it. A checkpoint of a decaying run branches into runs with its own schedule
(other fits, another train.ema_decay) at any step. See vdm/training/branch.py.

    python scripts/branch.py reports/probe/state.pt --preset long   # then: python scripts/preset.py long
    python scripts/branch.py reports/probe/state.pt                 # for params.yaml: then dvc repro

The held run's settings must be the run's, but for its length, decay, logging and fits; every
difference is named. The run's existing checkpoint is never overwritten.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's vdm

from stages._cli import run  # noqa: E402
from vdm.core.params import load_params  # noqa: E402
from vdm.training.branch import branch  # noqa: E402
from vdm.training.loop import Outputs  # noqa: E402
from vdm.training.step import decay_start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", help="the held run's state: a stability probe's state.pt or a training checkpoint")
    ap.add_argument("--preset", help="the run is this preset (presets/NAME.yaml over params.yaml)")
    ap.add_argument("--processed", default="data/processed")
    args = ap.parse_args()
    params = load_params("params.yaml", args.preset)
    path = branch(args.state, params, args.processed, Outputs().checkpoints)
    then = f"python scripts/preset.py {args.preset}" if args.preset else "dvc repro"
    start = decay_start(params.train)
    print(f"branch: wrote {path}: the run resumes there (its decay starts at step {start}); now `{then}`")


if __name__ == "__main__":
    run(main)
