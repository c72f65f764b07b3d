#!/usr/bin/env bash
# The whole pipeline inside the image, on tiny data: `dvc repro` through all five stages on 60
# synthetic 32x32 sprites with a tiny model (4 training steps, 2 sampling steps; under a
# minute on a CPU), in a fresh git + DVC repository made from the copy of the project in the
# current directory. Fails (non-zero) if a stage fails, an output is missing, or a second
# `dvc repro` would not be a no-op.
#
#   bash scripts/container-selftest.sh             prepare, dvc repro, check (the Dockerfile's
#                                                  `selftest` target runs this during the build)
#   bash scripts/container-selftest.sh --prepare   only make the tiny repository
#   bash scripts/container-selftest.sh --check     only check the outputs of a `dvc repro`
# (scripts/container-check.sh uses the last two around the image's default command.)
set -euo pipefail

mode=${1:-all}
test -f dvc.yaml || { echo "container-selftest: run me in a copy of the project" >&2; exit 2; }

prepare() {
    # Outputs committed to git (metrics, plots) must be produced by this run, not inherited.
    rm -f metrics/*.json plots/*.csv
    python - <<'EOF'
import yaml

with open("params.yaml") as f:
    p = yaml.safe_load(f)
p["data"].update(source="synthetic", synthetic={"count": 60, "seed": 0}, image_size=32, preview=16)
p["model"].update(channels=32, channel_mult=[1, 2], attention_resolutions=[8], patch_size=2)
p["train"].update(
    steps=4, batch_size=4, warmup_steps=1, log_every=2, eval_every=0, eval_images=4, sample_every=0,
    sample_count=2, sample_steps=2, checkpoint_every=2, device="cpu", wandb="disabled",
)
p["sample"].update(count=4, steps=2, batch_size=4, strip_rows=2, strip_points=2, device="cpu")
p["evaluate"].update(time_samples=1, device="cpu")
with open("params.yaml", "w") as f:
    yaml.safe_dump(p, f, sort_keys=False)
EOF
    # In the build this directory belongs to another uid (root), like a mounted clone: git and
    # DVC must still accept it (safe.directory in the image's system git config).
    git init -q
    git add -A
    git -c user.name=selftest -c user.email=selftest@vdm-pokemon.invalid commit -qm "selftest: tiny synthetic params"
}

check() {
    for f in data/processed/train.npy models/ema.pt samples/grid.png samples/strip.png metrics/train.json metrics/eval.json; do
        test -s "$f" || { echo "container-selftest: FAILED: $f missing" >&2; exit 1; }
    done
    python - <<'EOF'
import json

ev = json.load(open("metrics/eval.json"))
assert ev["sample_count"] == 4 and ev["test_bpd"] > 0, ev
assert json.load(open("metrics/train.json"))["steps"] == 4
EOF
    # the installed `vdm` command on the trained model, writing outside the DVC outputs
    gen=$(mktemp -d)
    vdm generate --model models --n 2 --steps 2 --device cpu --out "$gen/new"
    test -s "$gen/new/grid.png" && test -s "$gen/new/sprite-0001.png" || {
        echo "container-selftest: FAILED: vdm generate wrote no sprites" >&2; exit 1; }
    rm -rf "$gen"
    status=$(dvc status)
    echo "$status"
    case "$status" in
        *"up to date"*) ;;
        *) echo "container-selftest: FAILED: a second run would not be a no-op" >&2; exit 1 ;;
    esac
    echo "container-selftest: OK (download, preprocess, train, sample, evaluate; outputs present; vdm generate)"
}

case "$mode" in
    all) prepare; dvc repro; check ;;
    --prepare) prepare ;;
    --check) check ;;
    *) echo "usage: $0 [--prepare | --check]" >&2; exit 2 ;;
esac
