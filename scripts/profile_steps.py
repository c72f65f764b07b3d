"""Profile N training steps and N sampler steps of the params.yaml config with torch.profiler.

    python scripts/profile_steps.py [--train-steps 10] [--sample-steps 10] [--out reports/profile]

Not a DVC stage: a tool. Writes Chrome/Perfetto traces, top-operator tables and the
training step's phase breakdown (data loading, forward, backward, optimizer, EMA).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's vdm

from stages._cli import run  # noqa: E402
from vdm.core.params import load_params  # noqa: E402
from vdm.training.profiling import profile_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--out", default="reports/profile")
    args = ap.parse_args()
    b = profile_run(load_params(), args.processed, args.out, args.train_steps, args.sample_steps)
    print(json.dumps(b, indent=2))
    top = (args.out + "/train_top_ops.txt").replace("//", "/")
    print(
        f"profile: {b['step_s']:.3f} s/step ({b['img_per_s']} img/s); data loading "
        f"{100 * (b['phases_fraction']['data_load'] + b['phases_fraction']['data_to_device']):.2f}% of the step; "
        f"traces and tables in {args.out}/ (top operators: {top})"
    )


if __name__ == "__main__":
    run(main)  # a UserError or a full disk: one line, exit 2
