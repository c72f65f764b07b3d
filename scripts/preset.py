"""Run a DVC experiment with a preset of params (presets/<name>.yaml laid over params.yaml).

    python scripts/preset.py gpu                 # dvc exp run -n gpu -S model.channels=128 -S ...
    python scripts/preset.py gpu --dry-run       # print the command only
    python scripts/preset.py gpu -- --queue      # extra arguments go to `dvc exp run`

The merged params are validated before DVC starts; every value the preset sets is passed
with -S, so `dvc exp show` and `dvc params diff` show exactly what it changed.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's vdm

from stages._cli import run  # noqa: E402
from vdm.core.params import flatten, parse_params, read_preset  # noqa: E402


def command(name: str, params_path: str = "params.yaml", extra: tuple = ()) -> list[str]:
    preset, raw = read_preset(name, params_path)
    parse_params(raw)  # fail before DVC starts
    sets = [arg for k, v in flatten(preset).items() for arg in ("-S", f"{k}={json.dumps(v)}")]
    return ["dvc", "exp", "run", "-n", name, *sets, *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("extra", nargs="*", help="arguments passed on to `dvc exp run` (after --)")
    args = ap.parse_args()
    cmd = command(args.name, extra=tuple(args.extra))
    print(shlex.join(cmd))
    if not args.dry_run:
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    run(main)  # a UserError or a full disk: one line, exit 2
