"""Reliability: faults injected into every stage, and what survives them.

Each test asserts what was *kept* (weights bit for bit, every good image, the previous
artifact byte for byte, nothing written outside the target), not only that nothing crashed.
All random choices are seeded. The figures in README.md ("Reliability") come from here:
`python -m pytest tests/test_reliability.py -q -s -k figures` prints them.

 1. SIGKILL during training, three times at random points        -> final weights bit-identical
 2. truncated / bit-flipped checkpoint or model file              -> checksum error, file kept
 3. a pickle that runs code, as a checkpoint or as models/ema.pt   -> refused, the code never runs
 4. 100 corrupted files in a path source                          -> each counted by reason, every good image kept
 5. hostile archives and folders                                  -> refused, nothing written outside, old data kept
 6. every params.yaml key with a wrong type and out of range      -> one line naming the key, no traceback
 7. a full disk while writing each kind of artifact               -> the old artifact intact, no temp files
 8. credentials in the environment and ~/.kaggle during a pipeline -> in no file and no log
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import vdm.atomic
import vdm.checkpoint as ckpt
from stages import _cli
from tests.helpers import (
    LONG,
    ROOT,
    add_tar_member,
    copy_project,
    data_params,
    make_zip,
    outs,
    project,
    run,
    start,
    subprocess_env,
    tiny,
    wait_for_checkpoint,
)
from vdm.errors import ParamError, UnsafeArchive, UserError
from vdm.images import decode
from vdm.params import parse_params
from vdm.preprocess import preprocess
from vdm.sources import fetch
from vdm.synthetic import write_synthetic
from vdm.training import train


def tree(root: Path) -> dict[str, object]:
    """Every path under root (links not followed) -> its bytes, link target or "dir"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage(name: str, proj: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`python -m stages.<name>` in-process (stages/_cli.py included): (exit code, stderr)."""
    import importlib

    monkeypatch.chdir(proj)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _cli.run(importlib.import_module(f"stages.{name}").main)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


# --- 1. SIGKILL during training ---------------------------------------------------------------

KILL_SEED = 2024
ARTIFACTS = ("models/model.pt", "models/ema.pt", "models/model.pt.sha256", "models/ema.pt.sha256")
RECORDS = ("metrics/train.json", "plots/train.csv", "plots/val.csv")


def test_training_killed_three_times_at_random_points_ends_bit_identical(tmp_path, processed, uninterrupted):
    """kill -9 after 1-2 new checkpoints plus a random delay (so mid-step, mid-checkpoint-write,
    or between a checkpoint and its checksum), three times; the fourth run completes."""
    rng = random.Random(KILL_SEED)
    proj = project(tmp_path, processed, **LONG)
    resumed_at = []
    for _ in range(3):
        p = start(proj)
        wait_for_checkpoint(proj, p, new=rng.randint(1, 2))
        time.sleep(rng.uniform(0.0, 0.25))
        p.kill()
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        (ck,) = (proj / "checkpoints").glob("*.pt")  # kept: a complete checkpoint that verifies
        resumed_at.append(ckpt.load(ck, "checkpoint")["step"])
    p = start(proj)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"resuming from checkpoints/{ck.name} at step {resumed_at[-1]}/30" in err
    assert resumed_at == sorted(set(resumed_at)) and 0 < resumed_at[0] and resumed_at[-1] < 30  # progress each time
    for name in ARTIFACTS + RECORDS:
        assert (proj / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not list((proj / "checkpoints").iterdir())  # the checkpoint, and temp files of killed writes, are gone


# --- 2. and 3. damaged and malicious weight files -------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, processed):
    """A finished tiny run whose last checkpoint (step 4 of 6) was kept: models/, checkpoints/,
    metrics/, plots/, and the params.yaml and data/processed to rerun it as a stage."""
    root = tmp_path_factory.mktemp("checkpointed")
    params = tiny(steps=6, checkpoint_every=2, eval_every=0, sample_every=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt.Checkpoints, "remove", lambda self: None)
        train(parse_params(params), processed, outs(root))
    shutil.copytree(processed, root / "data/processed")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "samples").mkdir()
    (root / "samples/grid.png").write_bytes(b"the previous samples")
    return root


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[rng.randrange(len(data) // 2, len(data) - 1) :]
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
@pytest.mark.parametrize("which", ["checkpoint", "ema.pt"])
def test_damaged_weights_are_caught_by_the_checksum_and_kept(tmp_path, checkpointed, monkeypatch, capsys, which, how):
    proj = copy_of(checkpointed, tmp_path / "p")
    (target,) = (proj / "checkpoints").glob("*.pt") if which == "checkpoint" else [proj / "models/ema.pt"]
    recorded = ckpt.checksum_path(target).read_text().split()[0]
    damage(target, how, random.Random(f"{which}-{how}"))
    before = tree(proj)

    code, err = run_stage("train" if which == "checkpoint" else "sample", proj, monkeypatch, capsys)

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    rel = target.relative_to(proj).as_posix()
    assert err.startswith("error: ") and f"{rel} is damaged" in err
    assert f"its sha256 is {sha256(target)} but {target.name}.sha256 records {recorded}" in err
    assert ("start over from step 0" if which == "checkpoint" else "dvc checkout models") in err
    assert tree(proj) == before  # the damaged file, its checksum, models/, samples/: all kept as they were


class RunsCode:
    """Unpickling this runs a shell command (it would create `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("with_checksum", [True, False], ids=["with-matching-checksum", "without-checksum"])
@pytest.mark.parametrize("which", ["checkpoint", "ema.pt"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(
    tmp_path, checkpointed, monkeypatch, capsys, which, with_checksum
):
    proj = copy_of(checkpointed, tmp_path / "p")
    marker = tmp_path / "PWNED"
    (target,) = (proj / "checkpoints").glob("*.pt") if which == "checkpoint" else [proj / "models/ema.pt"]
    evil = {"model": {"w": torch.zeros(1)}, "step": 4, "payload": RunsCode(marker)}
    if with_checksum:
        ckpt.save(evil, target)  # a matching checksum proves nothing about what a file holds
    else:
        torch.save(evil, target)
        ckpt.checksum_path(target).unlink()
    before = tree(proj)

    code, err = run_stage("train" if which == "checkpoint" else "sample", proj, monkeypatch, capsys)

    assert not marker.exists()
    assert code == 2 and "Traceback" not in err
    assert f"{target.relative_to(proj).as_posix()} holds pickled Python objects, not only tensors" in err
    assert "(GLOBAL posix.system)" in err and "nothing in it was run" in err
    assert tree(proj) == before


@pytest.mark.parametrize("stop", ["before the rename", "before the checksum"])
def test_a_kill_between_a_file_and_its_checksum_is_never_reported_as_damage(tmp_path, monkeypatch, capsys, stop):
    """The two windows of ckpt.save: the old checksum is already removed / the new one not yet written."""

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed

    path = tmp_path / "x.pt"
    ckpt.save({"v": torch.tensor(1)}, path)
    with monkeypatch.context() as m:
        if stop == "before the rename":
            m.setattr(os, "replace", die)
        else:
            m.setattr(ckpt, "write_bytes", die)
        with pytest.raises(Killed):
            ckpt.save({"v": torch.tensor(2)}, path)
    capsys.readouterr()
    kept = 1 if stop == "before the rename" else 2
    assert ckpt.load(path, "checkpoint")["v"] == kept  # a complete file: loaded, not called corrupt
    assert "has no checksum file x.pt.sha256" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]
    ckpt.save({"v": torch.tensor(3)}, path)  # the next save restores the checksum
    assert ckpt.checksum_path(path).read_text() == f"{sha256(path)}  x.pt\n"


# --- 4. corrupted files in a path source ------------------------------------------------------

CORRUPT_SEED, N_CORRUPT, N_GOOD, N_DUPLICATES = 11, 100, 60, 6


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(w: int, h: int) -> bytes:
    """A well-formed PNG header (valid CRCs) declaring w x h pixels, with a few bytes of data."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _encode(png: bytes, fmt: str) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB" if fmt == "JPEG" else "RGBA")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def corrupted_files(rng: random.Random, good: list[bytes]) -> list[tuple[str, bytes, str, str]]:
    """N_CORRUPT (file name, bytes, expected skip reason, kind), every kind about equally often."""

    def truncated(fmt, ext):
        def make():
            data = _encode(rng.choice(good), fmt)
            return f".{ext}", data[: rng.randrange(40, len(data) - 12)]

        return make

    def header_bit_flip():
        data = bytearray(rng.choice(good))
        data[rng.randrange(16, 29)] ^= 1 << rng.randrange(8)  # IHDR: its CRC no longer matches
        return ".png", bytes(data)

    kinds = {
        "zero bytes": ("empty", lambda: (rng.choice([".png", ".gif", ".jpg"]), b"")),
        "random bytes": ("not_image", lambda: (".png", b"\0" + rng.randbytes(rng.randrange(1, 4096)))),
        "text named .png (an HTML error page)": (
            "not_image",
            lambda: (rng.choice([".png", ".gif"]), b"<html><body>404 Not Found</body></html>\n" * rng.randint(1, 9)),
        ),
        "truncated PNG": ("corrupt", truncated("PNG", "png")),
        "truncated GIF": ("corrupt", truncated("GIF", "gif")),
        "truncated JPEG": ("corrupt", truncated("JPEG", "jpg")),
        "truncated WebP": ("corrupt", truncated("WEBP", "webp")),
        "truncated BMP": ("corrupt", truncated("BMP", "bmp")),
        "PNG header bit flip": ("corrupt", header_bit_flip),
        "PNG declaring 0 pixels wide": ("corrupt", lambda: (".png", _png_declaring(0, rng.randint(1, 96)))),
        "PNG without image data": ("corrupt", lambda: (".png", _png_declaring(96, 96)[:33] + _chunk(b"IEND", b""))),
        "PNG declaring 100000x100000": ("too_large", lambda: (".png", _png_declaring(100_000, 100_000))),
        "PNG declaring 5000x5000": ("too_large", lambda: (".png", _png_declaring(5000, 5000))),
    }
    names = list(kinds)
    out = []
    for i in range(N_CORRUPT):
        kind = names[i % len(names)]
        reason, make = kinds[kind]
        ext, data = make()
        folder = rng.choice(["", "junk/", f"species-{rng.randrange(N_GOOD // 2):05d}/"])
        out.append((f"{folder}bad-{i:03d}{ext}", data, reason, kind))
    return out


def test_corrupted_files_are_counted_by_reason_and_every_good_image_is_kept(tmp_path):
    rng = random.Random(CORRUPT_SEED)
    src = tmp_path / "sprites"
    write_synthetic(src, N_GOOD, seed=3)
    good = sorted(p for p in src.rglob("*.png"))
    # good images with the wrong extension are still images (decoded by content)
    for p in rng.sample(good, 5):
        p.rename(p.with_suffix(rng.choice([".gif", ".jpg", ".txt", ""])))
    good = sorted(p for p in src.rglob("*") if p.is_file())
    for i, p in enumerate(rng.sample(good, N_DUPLICATES)):
        (src / f"copy-{i}.png").write_bytes(p.read_bytes())  # exact duplicates (sort after species-*)
    bad = corrupted_files(rng, [p.read_bytes() for p in good])
    for name, data, *_ in bad:
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(data)

    data = data_params(source=str(src), image_size=32)
    fetch(data, tmp_path / "raw")
    m = preprocess(data, tmp_path / "raw", tmp_path / "processed", tmp_path / "data.json", workers=1)

    expected = Counter(reason for _, _, reason, _ in bad)
    assert m["skipped"] == {r: expected[r] for r in m["skipped"]} and m["skipped_total"] == N_CORRUPT
    assert m["images"] == N_GOOD and m["duplicates"] == N_DUPLICATES and m["files"] == N_GOOD + N_DUPLICATES + N_CORRUPT
    df = pd.read_csv(tmp_path / "processed/manifest.csv", keep_default_na=False).set_index("file")
    assert {name: df.status[name] for name, *_ in bad} == {name: reason for name, _, reason, _ in bad}
    # every good image survives, pixel for pixel, exactly once
    kept = np.concatenate([np.load(tmp_path / f"processed/{s}.npy") for s in ("train", "val", "test")])
    want = sorted(decode(p.read_bytes(), 32).pixels.tobytes() for p in good)
    assert sorted(x.tobytes() for x in kept) == want


# --- 5. hostile archives and folders -----------------------------------------------------------


def _tar(path: Path, *members: tuple) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for name, data, kw in members:
            add_tar_member(tf, name, data, **kw)
    return path


def _zip_symlink(path: Path, name: str, target: str) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(info, target)
        zf.writestr(f"{name}/evil.png", b"x")
    return path


def _folder_with_link(path: Path, target: Path) -> Path:
    path.mkdir()
    (path / "1.png").write_bytes(b"png")
    (path / "victim.png").symlink_to(target)
    return path


SYM, HARD = dict(type=tarfile.SYMTYPE), dict(type=tarfile.LNKTYPE)
# kind -> (build(dir, sentinel) -> source path, what the refusal says)
HOSTILE = {
    "zip ../ traversal": (lambda d, s: make_zip(d / "a.zip", {"ok.png": b"1", "../sentinel/x.png": b"x"}), "'..'"),
    "zip absolute path": (lambda d, s: make_zip(d / "a.zip", {f"{s}/evil.png": b"x"}), "absolute path"),
    "zip symlink escape": (lambda d, s: _zip_symlink(d / "a.zip", "link", str(s)), "outside the target"),
    "tar ../ traversal": (lambda d, s: _tar(d / "a.tar", ("a/../../sentinel/evil.png", b"x", {})), r"'\.\.'"),
    "tar absolute path": (lambda d, s: _tar(d / "a.tar", (f"{s}/evil.png", b"x", {})), "absolute path"),
    "tar symlink escape, then a file through it": (
        lambda d, s: _tar(d / "a.tar", ("link", b"", dict(SYM, linkname=str(s))), ("link/evil.png", b"x", {})),
        "outside the target",
    ),
    "tar relative symlink escape": (
        lambda d, s: _tar(d / "a.tgz", ("a/link", b"", dict(SYM, linkname="../../../sentinel"))),
        "outside the target",
    ),
    "tar hardlink to an absolute path, then overwritten": (
        lambda d, s: _tar(d / "a.tar", ("h.png", b"", dict(HARD, linkname=f"{s}/victim.txt")), ("h.png", b"pwned", {})),
        "outside the target",
    ),
    "tar hardlink escape with ../": (
        lambda d, s: _tar(d / "a.tar.gz", ("h.png", b"", dict(HARD, linkname="../sentinel/victim.txt"))),
        "outside the target",
    ),
    "tar device file": (lambda d, s: _tar(d / "a.tar", ("dev", b"", dict(type=tarfile.CHRTYPE))), "not a regular"),
    "zip bomb (8 MB of zeros in 8 kB)": (
        lambda d, s: make_zip(d / "bomb.zip", {"zeros.png": b"\0" * (8 << 20)}),
        "more than 1 MB",
    ),
    "tar.gz bomb": (lambda d, s: _tar(d / "bomb.tar.gz", ("zeros.png", b"\0" * (8 << 20), {})), "more than 1 MB"),
    "too many files": (lambda d, s: make_zip(d / "many.zip", {f"{i}.png": b"x" for i in range(51)}), "more than 50"),
    "folder with a link out": (lambda d, s: _folder_with_link(d / "src", s / "victim.txt"), "links outside"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_archive_is_refused_and_nothing_outside_is_touched(tmp_path, kind):
    build, message = HOSTILE[kind]
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "victim.txt").write_text("untouched")
    raw = tmp_path / "project/data/raw"
    fetch(data_params(source="synthetic", synthetic={"count": 4, "seed": 0}), raw)  # the previous download
    (tmp_path / "in").mkdir()
    source = build(tmp_path / "in", sentinel)
    before = tree(tmp_path)

    with pytest.raises(UnsafeArchive, match=message):
        fetch(data_params(source=str(source), limits={"max_files": 50, "max_mb": 1}), raw)

    assert tree(tmp_path) == before  # nothing written anywhere: sentinel, raw data and no temp folders


# --- 6. every params.yaml key, wrong type and out of range --------------------------------------

REAL_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# Keys with no invalid value of the right type: any string is a valid path; booleans.
# (model.attention_resolutions has one: a size the UNet never reaches.)
NO_RANGE = {"evaluate.inception_weights"}
WRONG_TYPE = {  # by the type of the value in params.yaml
    bool: ["yes", 1],
    int: [2.5, True, "7"],  # True: a bool is an int in Python, not in params.yaml
    float: ["fast", True],
    str: [7],
    list: ["1,2", ["x"]],
    dict: [5, [1]],
}
# keys that take more than one type: their own wrong-type values
WRONG_TYPE_FOR = {"train.processes": [2.5, True, None, [2]]}  # auto or an integer
OUT_OF_RANGE = {int: [-1, 0, 10**9], float: [-1.0, 2.0, 1e9, -1e9], str: ["tpu", "nowhere/at/all"], list: [[0], [99]]}


def all_keys(d: dict, prefix: str = "") -> list[str]:
    """Every key, sections included: data, data.synthetic, data.synthetic.count, ..."""
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += all_keys(v, f"{prefix}{k}.")
    return out


def with_value(key: str, value) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(REAL_PARAMS))
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[leaf] = value
    return raw


def rejection(key: str, value) -> ParamError | None:
    try:
        parse_params(with_value(key, value))
    except ParamError as e:
        return e
    return None


def real_value(key: str):
    node = REAL_PARAMS
    for k in key.split("."):
        node = node[k]
    return node


def bad_values() -> list[tuple[str, str, object]]:
    """(key, "wrong type" | "out of range", value) for every key of the real params.yaml."""
    cases = []
    for key in all_keys(REAL_PARAMS):
        tp = type(real_value(key))
        cases += [(key, "wrong type", value) for value in WRONG_TYPE_FOR.get(key, WRONG_TYPE[tp])]
        for value in OUT_OF_RANGE.get(tp, []):
            if rejection(key, value) is not None:
                cases.append((key, "out of range", value))
                break
    return cases


BAD = bad_values()


def test_every_key_has_a_wrong_type_case_and_every_ranged_key_an_out_of_range_case():
    keys = all_keys(REAL_PARAMS)
    ranged = {k for k, what, _ in BAD if what == "out of range"}
    unranged = {k for k in keys if k not in ranged and type(real_value(k)) not in (bool, dict)}
    assert len(keys) == len({k for k, what, _ in BAD if what == "wrong type"}) and unranged == NO_RANGE


@pytest.mark.parametrize("key,what,value", BAD, ids=[f"{k}={v!r}" for k, _, v in BAD])
def test_a_bad_value_is_one_error_naming_the_key(key, what, value):
    e = rejection(key, value)
    assert e is not None, f"{key} = {value!r} was accepted"
    section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    assert e.key.startswith(section) and leaf in e.key  # "model.gamma_min/gamma_max" names gamma_max too
    assert str(e).startswith(f"params.yaml: {e.key} = ") and "\n" not in str(e)
    if e.key == key:
        assert repr(value) in str(e)


CLI_SEED = 5
STAGE_OF = {"data": "download", "model": "train", "train": "train", "sample": "sample", "evaluate": "evaluate"}


def test_bad_values_through_every_stage_cli(tmp_path):
    """A seeded sample, one per stage (preprocess included), through `python -m stages.X`."""
    rng = random.Random(CLI_SEED)
    picks = []
    for section, stage in [*STAGE_OF.items(), ("data", "preprocess")]:
        picks.append((stage, rng.choice([c for c in BAD if c[0].split(".")[0] == section and "." in c[0]])))
    procs = []
    for i, (stage, (key, _, value)) in enumerate(picks):
        proj = tmp_path / f"p{i}"
        proj.mkdir()
        for name in ("vdm", "stages"):
            (proj / name).symlink_to(ROOT / name)
        (proj / "params.yaml").write_text(yaml.safe_dump(with_value(key, value)))
        cmd = [sys.executable, "-m", f"stages.{stage}"]
        env = subprocess_env()
        procs.append((proj, key, subprocess.Popen(cmd, cwd=proj, env=env, stderr=subprocess.PIPE, text=True)))
    for proj, key, p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.startswith("error: params.yaml: ") and err.count("\n") == 1, err
        assert key.rsplit(".", 1)[1] in err and "Traceback" not in err
        assert sorted(os.listdir(proj)) == ["params.yaml", "stages", "vdm"]  # no work started


# --- 7. a full disk ------------------------------------------------------------------------------


class FullDisk:
    """A disk with `free` bytes left, for files that vdm opens for writing: the write that does
    not fit writes what fits, then raises OSError(ENOSPC), as a real one does."""

    def __init__(self, free: int):
        self.free = free

    def open(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return _FillingFile(f, self) if any(c in mode for c in "wa+") else f

    def take(self, n: int) -> int:
        fits = min(n, self.free)
        self.free -= fits
        return fits

    def fallocate(self, fd, offset, length):
        if self.take(length) < length:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingFile:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        fits = self._disk.take(view.nbytes)
        self._f.write(view[:fits])
        if fits < view.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, free: int) -> FullDisk:
    disk = FullDisk(free)
    for module in (vdm.atomic, ckpt):
        monkeypatch.setattr(module, "open", disk.open, raising=False)
    monkeypatch.setattr(os, "posix_fallocate", disk.fallocate)
    return disk


DISK_SEED = 3


def _write_models(d: Path, seed: int):
    from vdm.diffusion import build_vdm

    p = parse_params(tiny())
    torch.manual_seed(seed)
    model = build_vdm(p.model, 32)
    ckpt.save_model(d, model, model, {"seed": seed})


def _write_json(d: Path, seed: int):
    vdm.atomic.write_json(d / "train.json", {"val_bpd": seed, "rows": list(range(200))})


def _save_npy(d: Path, seed: int):
    vdm.atomic.save_npy(d / "x.npy", np.random.default_rng(seed).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))


def _save_npy_rows(d: Path, seed: int):
    a = np.random.default_rng(seed).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    vdm.atomic.save_npy_rows(d / "rows.npy", a, np.arange(0, 16, 2))


WRITERS = {
    "save_model": _write_models,  # models/: model.pt, ema.pt, their checksums, config.json
    "write_json": _write_json,  # metrics
    "save_npy": _save_npy,
    "save_npy_rows": _save_npy_rows,  # data/processed/*.npy (memory-mapped)
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_keeps_the_old_artifact_and_leaves_no_temp_files(tmp_path, monkeypatch, writer):
    """The disk fills at 0 bytes and at 4 random points of the new artifact's bytes."""
    write = WRITERS[writer]
    write(tmp_path / "probe", 1)
    size = sum(len(v) for v in tree(tmp_path / "probe").values() if isinstance(v, bytes))
    rng = random.Random(f"{DISK_SEED}-{writer}")
    for free in [0, *sorted(rng.sample(range(size), 4))]:
        d = tmp_path / f"free-{free}"
        write(d, 0)  # the previous artifact
        before = tree(tmp_path)
        with monkeypatch.context() as m:
            fill_disk(m, free)
            with pytest.raises(OSError) as e:
                write(d, 1)
        assert e.value.errno == errno.ENOSPC and Path(e.value.filename).parent in (d, d.parent)
        assert ".tmp" not in e.value.filename  # the artifact, not a temporary name
        assert tree(tmp_path) == before, free


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_a_full_disk_is_one_clear_line_from_the_stage(tmp_path, checkpointed, monkeypatch, capsys, stage):
    """preprocess: the disk fills at its first array. train: it resumes from the kept checkpoint
    (step 4 of 6) and the disk is full when it writes its outputs: the checkpoint is still there
    for the rerun, and the previous models/, metrics/ and plots/ are untouched."""
    proj = copy_of(checkpointed, tmp_path / "p")
    if stage == "preprocess":
        params = yaml.safe_load((proj / "params.yaml").read_text())
        fetch(parse_params(params).data, proj / "data/raw")
        vdm.atomic.write_json(proj / "metrics/data.json", {"images": "the previous run's"})
    before = tree(proj)
    fill_disk(monkeypatch, 0)

    code, err = run_stage(stage, proj, monkeypatch, capsys)

    *_, last = err.splitlines()
    assert code == 2 and last.startswith("error: ") and "Traceback" not in err
    artifact = last.removeprefix("error: no space left on device while writing ").split(":")[0]
    assert artifact == "data/processed/train.npy" if stage == "preprocess" else artifact.split("/")[0] in before
    assert "free space and rerun" in last and "previous outputs are kept" in last
    assert tree(proj) == before


# --- 7b. outputs that change together ------------------------------------------------------------

OUTPUTS = (
    "models/model.pt",
    "models/config.json",
    "plots/samples/step-000002.png",
    "plots/train.csv",
    "metrics/train.json",
)


def _commit_outputs(root: Path, version: str) -> None:
    """The train stage's commit, with each output's content naming its run."""
    with vdm.atomic.Commit(vdm.atomic.journal_for(root / "models")) as c:
        m = c.dir(root / "models")
        (m / "model.pt").write_text(version)
        (m / "config.json").write_text(version)
        (c.dir(root / "plots/samples") / "step-000002.png").write_text(version)
        c.file(root / "plots/train.csv").write_text(version)
        vdm.atomic.write_json(c.file(root / "metrics/train.json"), version)


def _versions(root: Path) -> set[str]:
    """Which runs the outputs come from ({"old"}, {"new"}, or a mix); "missing" for one that is not there."""
    found = set()
    for rel in OUTPUTS:
        p = root / rel
        found.add(p.read_text().strip().strip('"') if p.is_file() else "missing")
    return found


def _leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*"))


def _count_renames(tmp_path: Path, monkeypatch) -> int:
    calls = []
    real = os.replace
    _commit_outputs(tmp_path / "count", "old")
    with monkeypatch.context() as m:
        m.setattr(vdm.atomic.os, "replace", lambda a, b: (calls.append(1), real(a, b)))
        _commit_outputs(tmp_path / "count", "new")
    return len(calls)


def test_a_commit_failing_at_any_rename_leaves_every_output_as_it_was(tmp_path, monkeypatch):
    """The disk or the file system refuses the k-th rename of the commit (the journal's, each
    output's move aside, each new output's move into place), for every k."""
    renames = _count_renames(tmp_path, monkeypatch)
    assert renames == 1 + 1 + 2 * 4  # metrics' own atomic write, the journal; aside and place for the 4 outputs
    real = os.replace
    for k in range(renames):
        root = tmp_path / f"fail-{k}"
        _commit_outputs(root, "old")
        calls = []

        def flaky(a, b, calls=calls, k=k):
            calls.append(1)
            if len(calls) == k + 1:
                raise OSError(errno.EIO, "injected", str(b))
            return real(a, b)

        with monkeypatch.context() as m:
            m.setattr(vdm.atomic.os, "replace", flaky)
            with pytest.raises((OSError, UserError)) as e:  # OSError: a staged write (the body of the commit)
                _commit_outputs(root, "new")
        assert isinstance(e.value, OSError) or "every output is as it was before this run" in str(e.value)
        assert _versions(root) == {"old"}, k
        assert _leftovers(root) == [], k
        _commit_outputs(root, "newer")  # and the next run works
        assert _versions(root) == {"newer"} and _leftovers(root) == []


KILL_AT_RENAME = """
import os
from pathlib import Path
import vdm.atomic
real, calls = os.replace, []
def kill(a, b):
    calls.append(1)
    if len(calls) == K + 1:
        os._exit(9)
    return real(a, b)
vdm.atomic.os.replace = kill
"""


def test_a_commit_killed_at_any_rename_ends_all_old_or_all_new(tmp_path, monkeypatch):
    """SIGKILL-like exits (os._exit: no cleanup runs) at each rename of the commit. The next
    start recovers: all outputs are then from one run, and the run after leaves no temporary or
    .old file behind."""
    import inspect

    renames = _count_renames(tmp_path, monkeypatch)
    commit = inspect.getsource(_commit_outputs)  # the same commit, in a process of its own
    seen = Counter()
    for k in range(renames):
        root = tmp_path / f"kill-{k}"
        _commit_outputs(root, "old")
        code = subprocess.run(
            [sys.executable, "-c", f"K = {k}\n{KILL_AT_RENAME}{commit}\n_commit_outputs(Path({str(root)!r}), 'new')"],
            cwd=ROOT,
        ).returncode
        assert code == 9
        vdm.atomic.recover(vdm.atomic.journal_for(root / "models"))  # what the stage does first
        versions = _versions(root)
        assert versions in ({"old"}, {"new"}), (k, versions)
        seen[versions.pop()] += 1
        _commit_outputs(root, "newer")
        assert _versions(root) == {"newer"} and _leftovers(root) == [], k
    # only a kill before the journal is in place (at the staged metrics' own write or the
    # journal's rename) loses the run
    assert seen["old"] == 2 and seen["new"] == renames - 2


def test_the_train_stage_commits_its_outputs_together(tmp_path, checkpointed, monkeypatch, capsys):
    """The train stage resumes (step 4 of 6) and the rename that places metrics/train.json fails:
    one line, models/, plots/ and metrics/ are all still the previous run's, the checkpoint is
    kept, and the rerun writes them all, leaving nothing staged or moved aside."""
    proj = copy_of(checkpointed, tmp_path / "p")
    before = tree(proj)
    real = os.replace

    def refuse_metrics(a, b):
        if str(b).endswith("metrics/train.json") and ".tmp" in str(a):
            raise OSError(errno.EIO, "injected", str(b))
        return real(a, b)

    with monkeypatch.context() as m:
        m.setattr(vdm.atomic.os, "replace", refuse_metrics)
        code, err = run_stage("train", proj, monkeypatch, capsys)
    assert code != 0 and "Traceback" not in err
    assert tree(proj) == before
    assert err.splitlines()[-1].startswith("error: could not move the new outputs into place (injected")
    code, err = run_stage("train", proj, monkeypatch, capsys)
    assert code == 0, err
    after = tree(proj)
    kept = {k for k in before if not k.startswith("checkpoints/")}  # the rerun's checkpoint is removed at the end
    assert {k for k in after if not k.startswith("checkpoints/")} == kept  # nothing staged or moved aside is left
    # the same run resumed from the same checkpoint: the same weights, metrics and plots
    assert all(after[k] == before[k] for k in kept if k != "metrics/train_perf.json")


# --- 8. credentials ------------------------------------------------------------------------------


def test_no_credential_reaches_any_file_or_log(pipeline):
    """`dvc repro` of all five stages (and, when tests/test_pipeline.py ran first, two `dvc exp
    run`s), W&B offline, with WANDB_API_KEY, KAGGLE_USERNAME/KAGGLE_KEY and ~/.kaggle/kaggle.json set."""
    token = pipeline.home / ".kaggle/kaggle.json"
    files = [
        f for root in (pipeline.proj, pipeline.home) for f in root.rglob("*") if f.is_file() and not f.is_symlink()
    ]
    files.remove(token)
    names = {f.relative_to(pipeline.proj).parts[0] for f in files if f.is_relative_to(pipeline.proj)}
    assert {"dvc.lock", ".dvc", "wandb", "models", "metrics", "samples", "data", ".git"} <= names
    assert list((pipeline.proj / "wandb").glob("offline-run-*/*.wandb"))  # W&B ran, with the key in its env
    for name, secret in pipeline.secrets.items():
        assert secret in token.read_text() or name == "WANDB_API_KEY"
        leaked = [str(f) for f in files if secret.encode() in f.read_bytes()]
        assert not leaked, f"{name} leaked into {leaked}"
        assert not any(secret in log for log in pipeline.logs)


# --- the README figures --------------------------------------------------------------------------


def test_figures(tmp_path, capsys, pytestconfig):
    """Prints the numbers quoted in README.md "Reliability" (run with -s)."""
    write_synthetic(tmp_path, 8, seed=0)
    good = [p.read_bytes() for p in tmp_path.rglob("*.png")]
    bad = corrupted_files(random.Random(CORRUPT_SEED), good)
    kinds, reasons = Counter(kind for *_, kind in bad), Counter(reason for _, _, reason, _ in bad)
    figures = {
        "SIGKILLs during training": 3,
        "damaged weight files (truncated, bit-flipped)": 4,
        "malicious pickles": 4,
        "corrupted input files": N_CORRUPT,
        "corruption kinds": len(kinds),
        "skipped by reason": dict(reasons),
        "hostile archives/folders": len(HOSTILE),
        "params.yaml keys": len(all_keys(REAL_PARAMS)),
        "bad params values": len(BAD),
        "of them wrong types": sum(1 for _, what, _ in BAD if what == "wrong type"),
        "of them out of range": sum(1 for _, what, _ in BAD if what == "out of range"),
        "disk-full points": 5 * len(WRITERS) + 2,
    }
    if pytestconfig.getoption("capture") == "no":
        print("\nreliability figures:", figures)
    assert figures["corrupted input files"] == sum(kinds.values())


# --- wandb's environment ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "nonsense"])
def test_an_empty_or_unknown_wandb_mode_is_one_line_naming_the_variable(tmp_path, value):
    proj = copy_project(tmp_path / "p", train={"wandb": "offline"})
    env = subprocess_env() | {"WANDB_MODE": value}
    p = run([sys.executable, "-m", "stages.validate"], proj, check=False, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "WANDB_MODE" in line and "unset it" in line


def test_wandb_online_with_the_service_out_of_reach_fails_in_seconds(monkeypatch):
    from vdm.tracking import Tracker

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached.*train.wandb: offline"):
        Tracker("online", {}, "t")
    assert time.monotonic() - t0 < 10
