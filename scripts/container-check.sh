#!/usr/bin/env bash
# Proves that the Dockerfile builds and that the image runs the whole pipeline, on a machine
# with no Docker daemon and no access to a container registry: only a Debian mirror and a
# Python package index (or local wheels).
#
#   sudo scripts/container-check.sh          # or as root; exits non-zero on any failure
#
# What it does (idempotent; a rerun reuses podman's layer cache and takes seconds):
#   1. installs podman and debootstrap with apt-get if either is missing;
#   2. unless the image $BASE_IMAGE exists already, bootstraps a minimal Debian bookworm with
#      debootstrap from the machine's Debian mirror and imports it as $BASE_IMAGE (the
#      Dockerfile installs bookworm's python3.11 on a base that has none);
#   3. builds the Dockerfile's `selftest` target on it (podman build --isolation chroot): the
#      requirements, the project, then `dvc repro` of all five stages on tiny synthetic data
#      as the non-root user (scripts/container-selftest.sh), failing if an output is missing;
#   4. builds the default (runtime) target from the same cached layers and checks its user,
#      working directory and command;
#   5. where `podman run` works (else it says SKIPPED): runs the image's default command,
#      `dvc repro`, on a tiny synthetic clone mounted at /work and owned by uid 4242, as
#      `--user 4242:4242` (a uid with no passwd entry in the image), checks the outputs and
#      that every file in the clone still belongs to 4242. On VMs where crun cannot set its
#      default rlimits or cgroups it retries with runc and modest --ulimit values;
#   prints the wall time and the image sizes.
#
# Package index: the host's own pip configuration (`pip config get global.index-url`, or
# PIP_INDEX_URL) is handed to the build; without one, pip inside the build uses its default.
# Local wheels: each folder of $LOCAL_WHEELS that exists is lent to the build read-only
# (--volume) and handed to pip: folders holding a simple/ index as extra indexes
# (PIP_EXTRA_INDEX_URL), other folders as --find-links. LOCAL_WHEELS="" (the default): none.
#
# CA bundle: the host's ($CA_BUNDLE) is lent to the build and given to pip (PIP_CERT), so that
# a proxy that intercepts TLS with a CA only the host trusts still works. CA_BUNDLE="": off.
#
# Environment: BASE_IMAGE (localhost/bookworm-min), IMAGE (localhost/vdm-pokemon),
# DEBIAN_MIRROR (the first Debian URI in the host's /etc/apt/sources.list*),
# LOCAL_WHEELS (folders of wheels or simple/ indexes, space-separated; none by default),
# CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm-min}
IMAGE=${IMAGE:-localhost/vdm-pokemon}
LOCAL_WHEELS=${LOCAL_WHEELS-}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}

say() { printf '\n== container-check: %s\n' "$*"; }
fail() { printf 'container-check: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (podman build with chroot isolation and debootstrap need it)"

# 1. Tools.
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing podman and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap >/dev/null
fi
# runc: only for step 5, where crun cannot start containers (optional).
command -v runc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runc >/dev/null 2>&1 || true

start=$(date +%s)

# 2. A base image made from the Debian mirror (no registry needed).
if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists: skipping debootstrap"
else
    mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)}
    [ -n "$mirror" ] || fail "no Debian mirror in /etc/apt sources: set DEBIAN_MIRROR"
    rootfs=$(mktemp -d /var/tmp/bookworm-min.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null || fail "debootstrap"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null || fail "podman import"
    rm -rf "$rootfs"
    trap - EXIT
fi

# Where pip gets wheels during the build.
build_args=(--isolation chroot --build-arg "BASE=$BASE_IMAGE")
indexes=() links=()
for dir in $LOCAL_WHEELS; do
    [ -d "$dir" ] || continue
    build_args+=(--volume "$dir:$dir:ro")
    if [ -d "$dir/simple" ]; then indexes+=("file://$dir/simple"); else links+=("$dir"); fi
done
# The host's index (its pip configuration), and local indexes beside it.
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
[ -z "$index" ] || build_args+=(--build-arg "PIP_INDEX_URL=$index")
[ ${#indexes[@]} -eq 0 ] || build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]}")
[ ${#links[@]} -eq 0 ] || build_args+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
# The host's CA bundle, for a proxy that intercepts TLS to the package index.
if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
    build_args+=(--volume "$CA_BUNDLE:/etc/ssl/host-ca-bundle.crt:ro" --build-arg PIP_CERT=/etc/ssl/host-ca-bundle.crt)
fi

# 3. The selftest target: requirements, project, the pipeline on tiny synthetic data.
say "podman build --target selftest (${build_args[*]})"
podman build "${build_args[@]}" --target selftest -t "$IMAGE:selftest" . || fail "selftest build"

# 4. The runtime target (the default), from the same layers.
say "podman build (runtime, the default target)"
podman build "${build_args[@]}" -t "$IMAGE:latest" . || fail "runtime build"

config=$(podman image inspect --format '{{.Config.User}} {{.Config.WorkingDir}} {{json .Config.Cmd}}' "$IMAGE:latest")
[ "$config" = '1000:1000 /work ["dvc","repro"]' ] || fail "runtime image config is '$config'"

build_end=$(date +%s)
say "builds OK in $((build_end - start)) s wall"

# 5. The image as users run it, where this machine can run containers: its default command
# (`dvc repro`) on a clone mounted at /work that belongs to a uid the image does not know,
# run as that uid (`--user`), then the outputs checked, all owned by that uid.
run_flags=(--rm)
if ! podman run "${run_flags[@]}" "$IMAGE:latest" true >/dev/null 2>&1; then
    # Some VMs refuse crun's default rlimits and its cgroup setup: try runc with modest limits.
    run_flags+=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    if ! command -v runc >/dev/null || ! podman run "${run_flags[@]}" "$IMAGE:latest" true >/dev/null 2>&1; then
        run_flags=()
    fi
fi
if [ ${#run_flags[@]} -eq 0 ]; then
    say "podman run does not work on this machine: run check SKIPPED (the selftest build above ran the pipeline)"
else
    clone=$(mktemp -d /var/tmp/vdm-clone.XXXXXX)
    trap 'rm -rf "$clone"' EXIT
    # The project as the image holds it (the build context: what git tracks, no outputs).
    mnt=$(podman image mount "$IMAGE:latest")
    cp -a "$mnt/opt/vdm-pokemon/." "$clone/"
    podman image unmount "$IMAGE:latest" >/dev/null
    chown -R 4242:4242 "$clone"
    as_user=("${run_flags[@]}" --user 4242:4242 -v "$clone:/work")
    say "podman run --user 4242:4242 -v CLONE:/work $IMAGE (the default command, dvc repro)"
    podman run "${as_user[@]}" "$IMAGE:latest" bash scripts/container-selftest.sh --prepare || fail "run: prepare"
    podman run "${as_user[@]}" "$IMAGE:latest" || fail "run: dvc repro"
    podman run "${as_user[@]}" "$IMAGE:latest" bash scripts/container-selftest.sh --check || fail "run: outputs"
    foreign=$(find "$clone" ! -user 4242 | head -n 5)
    [ -z "$foreign" ] || fail "files in the clone not owned by the --user uid: $foreign"
    rm -rf "$clone"
    trap - EXIT
fi

end=$(date +%s)
say "OK in $((end - start)) s wall"
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^($IMAGE|$BASE_IMAGE)[:]" || true
