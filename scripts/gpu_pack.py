"""The GPU pack: what `scripts/gpu_check.py` needs on a bare GPU machine beyond that machine's own packages.

    make gpu-pack                                   # = python scripts/gpu_pack.py: gpu-pack/ from data/processed
    python scripts/gpu_pack.py --wheels installed   # offline: the wheels rebuilt from this environment's
                                                    # installed files (for a machine with this Python version)

The GPU machine has Python 3.12 with torch, torchvision, numpy, pillow, pandas, scikit-learn,
scipy, matplotlib, pyyaml and tqdm, no network, and takes at most 64 MiB of working tree and
carried files. The pack (git-ignored; carry it with the working tree) holds:

    data/{train,val,test}.npy.xz  data/processed's splits, xz-compressed (the sprites are mostly
    data/manifest.csv.xz          white); the manifest too: the training checkpoint's name hashes it
    wheels/*.whl                  pydantic (params.yaml's sections) and pytest (the CUDA tests) with
                                  their dependencies: exact versions (requirements.txt's pins, else
                                  this environment's), CPython 3.12 x86-64 (`pip download --no-deps`)
    PACK.json                     what is in it: checksums, sizes, versions, the command to run

The working tree (tracked plus untracked files git does not ignore) and the pack together must
stay under 60 MiB: the build measures both, fails past the limit, and prints the command line
to run on the GPU machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what the GPU machine has (and so the pack leaves out), and what the check imports beyond it
MACHINE_HAS = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pandas",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "pyyaml",
    "tqdm",
)
CARRIED = ("pydantic", "pytest")
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64")
SPLITS = ("train.npy", "val.npy", "test.npy", "manifest.csv")
LIMIT_MIB = 60
XZ_PRESET = 9
CHUNK = 1 << 20
FORMAT = 1


class PackError(Exception):
    """A problem the user can fix, said in one line."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_environment(python: str) -> dict:
    """The environment markers of CPython `python` (e.g. "3.12") on Linux x86-64."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "linux",
        "extra": "",
    }


def closure(roots: tuple[str, ...], python: str) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require (no extras),
    from this environment's metadata, with markers evaluated for CPython `python` on Linux."""
    from packaging.requirements import Requirement

    env, found, todo = marker_environment(python), {}, list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise PackError(f"{name} is not installed in this environment: run `make setup` first") from None
        found[name] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def requirement_pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def wheel_pins(python: str = TARGET_PYTHON) -> dict[str, str]:
    """The carried packages and their exact versions: requirements.txt's pin where it lists the
    package (it must be the installed one: the tests ran with it), else the installed version."""
    installed, listed = closure(CARRIED, python), requirement_pins()
    for name, version in installed.items():
        if name in listed and listed[name] != version:
            raise PackError(
                f"requirements.txt pins {name}=={listed[name]} but {version} is installed: run `make setup` first"
            )
    return dict(sorted(installed.items()))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def npy_shape(path: Path) -> list[int] | None:
    if path.suffix != ".npy":
        return None
    import numpy as np

    return list(np.load(path, mmap_mode="r", allow_pickle=False).shape)


def pack_data(processed: Path, dest: Path) -> dict:
    """Each of SPLITS xz-compressed into dest; {name: checksums and sizes}."""
    missing = [name for name in SPLITS if not (processed / name).is_file()]
    if missing:
        raise PackError(
            f"{processed}/{missing[0]} not found: run `dvc repro preprocess` first (or pass --processed DIR)"
        )
    dest.mkdir(parents=True)
    out = {}
    for name in SPLITS:
        src, packed = processed / name, dest / f"{name}.xz"
        with open(src, "rb") as f, lzma.open(packed, "wb", preset=XZ_PRESET) as g:
            shutil.copyfileobj(f, g, CHUNK)
        out[name] = {
            "file": f"data/{packed.name}",
            "bytes": src.stat().st_size,
            "packed_bytes": packed.stat().st_size,
            "sha256": sha256_file(src),
            "shape": npy_shape(src),
        }
    return out


def download_wheels(pins: dict[str, str], dest: Path, python: str) -> None:
    """`pip download` of exactly these versions, binary wheels for CPython `python` on x86-64 Linux."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "--dest", str(dest)]
    for platform in TARGET_PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in pins.items()]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        why = ([line for line in p.stderr.splitlines() if line.strip()] or ["no output"])[-1].strip()
        raise PackError(
            f"pip download failed ({why[:300]}): the wheels need the package index; offline, run "
            "`python scripts/gpu_pack.py --wheels installed` in a Python environment of the GPU machine's version"
        )


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_from_installed(name: str, version: str, dest: Path) -> Path:
    """A wheel of installed distribution `name` rebuilt from its installed files (its RECORD),
    with the tag its WHEEL file records: valid only for this interpreter's Python version."""
    dist = importlib.metadata.distribution(name)
    if dist.version != version:
        raise PackError(f"{name} {dist.version} is installed, not {version}: run `make setup` first")
    files = [f for f in dist.files or () if ".." not in f.parts and "__pycache__" not in f.parts]
    info = next((f.parent for f in files if f.name == "METADATA" and f.parent.name.endswith(".dist-info")), None)
    if info is None:
        raise PackError(f"{name}: no .dist-info among its installed files: reinstall it with pip")
    tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:")]
    skip = {info / n for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    wheel = dest / f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{version}-{tags[0]}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files, key=str):
            if f in skip:
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            zf.writestr(zipfile.ZipInfo(f.as_posix(), (1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
            record.append(f"{f.as_posix()},{_record_hash(data)},{len(data)}")
        record.append(f"{(info / 'RECORD').as_posix()},,")
        zf.writestr(zipfile.ZipInfo((info / "RECORD").as_posix(), (1980, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
    return wheel


def installed_wheels(pins: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True)
    for name, version in pins.items():
        wheel_from_installed(name, version, dest)


def wheel_entries(folder: Path, pins: dict[str, str]) -> list[dict]:
    """One entry per wheel; every pinned package has exactly one, at its pinned version."""
    entries, seen = [], set()
    for whl in sorted(folder.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        entries.append(
            {"file": f"wheels/{whl.name}", "name": canonical(name), "version": version, "sha256": sha256_file(whl)}
        )
        seen.add((canonical(name), version))
    missing = sorted(set(pins.items()) - seen)
    if missing:
        raise PackError(f"no wheel for {missing[0][0]}=={missing[0][1]} in {folder}")
    return entries


def working_tree_bytes(root: Path) -> int:
    """Bytes of the files the GPU machine receives without the pack: tracked files and untracked
    files git does not ignore."""
    try:
        p = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise PackError(
            f"`git ls-files` failed in {root} ({e}): the working tree's size needs a git checkout"
        ) from None
    total = 0
    for name in {n for n in p.stdout.decode().split("\0") if n}:
        try:
            total += (root / name).lstat().st_size
        except FileNotFoundError:  # deleted, not yet committed
            pass
    return total


def folder_bytes(folder: Path) -> int:
    return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() or f.is_symlink())


def check_command(pack: Path, root: Path) -> str:
    where = pack.relative_to(root) if pack.is_relative_to(root) else pack
    return f'python3 scripts/gpu_check.py --pack {where} --out "${{OUT:-reports/gpu-check}}"'


def build(processed: Path, out: Path, wheels: str, root: Path = ROOT) -> dict:
    """The pack at `out` (replaced whole), and what PACK.json says about it."""
    python = TARGET_PYTHON if wheels == "download" else f"{sys.version_info.major}.{sys.version_info.minor}"
    pins = wheel_pins(python)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data = pack_data(processed, tmp / "data")
        if wheels == "download":
            download_wheels(pins, tmp / "wheels", python)
        else:
            installed_wheels(pins, tmp / "wheels")
        info = {
            "format": FORMAT,
            "python": python,
            "wheels_from": wheels,
            "data": data,
            "wheels": wheel_entries(tmp / "wheels", pins),
            "command": check_command(out, root),
        }
        (tmp / "PACK.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pack = folder_bytes(out)
    tree = working_tree_bytes(root)
    info["size"] = {"tree_bytes": tree, "pack_bytes": pack, "total_bytes": tree + pack, "limit_bytes": LIMIT_MIB << 20}
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processed", default=str(ROOT / "data" / "processed"), help="the splits to pack")
    ap.add_argument("--out", default=str(ROOT / "gpu-pack"), help="the pack folder (replaced whole)")
    ap.add_argument(
        "--wheels",
        choices=("download", "installed"),
        default="download",
        help="download: `pip download` for CPython 3.12 x86-64 (the GPU machine); installed: rebuilt, "
        "offline, from this environment's installed files (for a machine with this Python version)",
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    try:
        info = build(Path(args.processed).resolve(), out, args.wheels)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raw = sum(d["bytes"] for d in info["data"].values())
    packed = sum(d["packed_bytes"] for d in info["data"].values())
    wheels = sum((out / w["file"]).stat().st_size for w in info["wheels"])
    size = info["size"]
    mib = {k: v / 2**20 for k, v in size.items()}
    print(f"data: {raw / 2**20:.1f} MiB -> {packed / 2**20:.2f} MiB ({raw / max(packed, 1):.0f}x, xz)")
    print(
        f"wheels: {len(info['wheels'])} for Python {info['python']} ({wheels / 2**20:.2f} MiB): "
        + ", ".join(f"{w['name']}=={w['version']}" for w in info["wheels"])
    )
    print(
        f"size: working tree {mib['tree_bytes']:.1f} MiB + pack {mib['pack_bytes']:.1f} MiB = "
        f"{mib['total_bytes']:.1f} MiB (limit {LIMIT_MIB} MiB)"
    )
    if size["total_bytes"] >= size["limit_bytes"]:
        print(f"error: working tree and pack exceed {LIMIT_MIB} MiB: shrink the largest files", file=sys.stderr)
        return 1
    print(f"on the GPU machine (carry {out.name}/ with the working tree), from the repository root:")
    print(f"    {info['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
