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
 9. every fault of a model folder's files (config.json, the weights)  -> one line naming the file and the fix,
    from the API, `vdm generate`, `vdm serve` and the sample stage; the optional guide.pt
10. damaged artifacts between stages (processed arrays, samples/,     -> one line naming the file and the stage
    checkpoints)                                                          that rebuilds it; every file kept
11. SIGKILL of a scaling run at a random step, then the same command  -> snapshots and final weights byte-identical
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
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

import vdm.core.atomic
import vdm.model.checkpoint as ckpt
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
from vdm.core.errors import ParamError, UnsafeArchive, UserError
from vdm.core.images import decode
from vdm.core.params import parse_params
from vdm.data.preprocess import preprocess
from vdm.data.sources import fetch
from vdm.data.synthetic import write_synthetic
from vdm.training.loop import train


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
    for module in (vdm.core.atomic, ckpt):
        monkeypatch.setattr(module, "open", disk.open, raising=False)
    monkeypatch.setattr(os, "posix_fallocate", disk.fallocate)
    return disk


DISK_SEED = 3


def _write_models(d: Path, seed: int):
    from vdm.model.diffusion import build_vdm

    p = parse_params(tiny())
    torch.manual_seed(seed)
    model = build_vdm(p.model, 32)
    ckpt.save_model(d, model, model, {"seed": seed})


def _write_json(d: Path, seed: int):
    vdm.core.atomic.write_json(d / "train.json", {"val_bpd": seed, "rows": list(range(200))})


def _save_npy(d: Path, seed: int):
    vdm.core.atomic.save_npy(d / "x.npy", np.random.default_rng(seed).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))


def _save_npy_rows(d: Path, seed: int):
    a = np.random.default_rng(seed).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    vdm.core.atomic.save_npy_rows(d / "rows.npy", a, np.arange(0, 16, 2))


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
        vdm.core.atomic.write_json(proj / "metrics/data.json", {"images": "the previous run's"})
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
    with vdm.core.atomic.Commit(vdm.core.atomic.journal_for(root / "models")) as c:
        m = c.dir(root / "models")
        (m / "model.pt").write_text(version)
        (m / "config.json").write_text(version)
        (c.dir(root / "plots/samples") / "step-000002.png").write_text(version)
        c.file(root / "plots/train.csv").write_text(version)
        vdm.core.atomic.write_json(c.file(root / "metrics/train.json"), version)


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
        m.setattr(vdm.core.atomic.os, "replace", lambda a, b: (calls.append(1), real(a, b)))
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
            m.setattr(vdm.core.atomic.os, "replace", flaky)
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
import vdm.core.atomic
real, calls = os.replace, []
def kill(a, b):
    calls.append(1)
    if len(calls) == K + 1:
        os._exit(9)
    return real(a, b)
vdm.core.atomic.os.replace = kill
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
        vdm.core.atomic.recover(vdm.core.atomic.journal_for(root / "models"))  # what the stage does first
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
        m.setattr(vdm.core.atomic.os, "replace", refuse_metrics)
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


# --- 9. a damaged model folder ------------------------------------------------------------------


def _edit_config(edit):
    """A fault that rewrites models/config.json (valid JSON) after `edit(config)`."""

    def damage(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        edit(config)
        (d / "config.json").write_text(json.dumps(config))

    return damage


def _model(config: dict) -> dict:
    return config["params"]["model"]


def _cut(name: str, keep: float):
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def _write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _edit_weights(edit):
    """A fault that rewrites ema.pt with `edit(state)` applied, with a matching checksum (so that
    the checks after the checksum's are what refuses it)."""

    def damage(d: Path) -> None:
        state = torch.load(d / "ema.pt", weights_only=True)
        state = edit(state)
        ckpt.save(state, d / "ema.pt")

    return damage


def _first_net_key(state: dict) -> str:
    return next(k for k in state if k.startswith("net.") and state[k].dim() > 1)


def _nan(state: dict) -> dict:
    k = _first_net_key(state)
    state[k] = state[k].clone()
    state[k].view(-1)[3] = float("nan")
    return state


def _delete(d: Path, name: str) -> None:
    (d / name).unlink()
    ckpt.checksum_path(d / name).unlink(missing_ok=True)


# fault -> (the file named, damage(models_dir), words of the message)
MODEL_FAULTS = {
    "config.json missing": ("config.json", lambda d: (d / "config.json").unlink(), "not found"),
    "config.json emptied": ("config.json", _write("config.json", b""), "is empty (0 bytes"),
    "config.json cut short": ("config.json", _cut("config.json", 0.6), "is cut short"),
    "config.json cut after its first byte": ("config.json", _cut("config.json", 0.001), "is cut short"),
    "config.json an HTML page": ("config.json", _write("config.json", b"<html>404</html>\n"), "is not valid JSON"),
    "config.json binary": ("config.json", _write("config.json", bytes(range(256))), "is not text"),
    "config.json 2 MB": ("config.json", _write("config.json", b" " * (2 << 20)), "more than such a file can be"),
    "config.json nested 100000 deep": (
        "config.json",
        _write("config.json", b"[" * 100_000 + b"]" * 100_000),
        "is not valid JSON",
    ),
    "config.json a 5000-digit number": ("config.json", _write("config.json", b"9" * 5000), "is not valid JSON"),
    "config.json a list": ("config.json", _write("config.json", b"[1, 2]"), "holds a list"),
    "an unknown key": ("config.json", _edit_config(lambda c: c.update(extra=1)), "'extra' is not a key"),
    "a missing key": ("config.json", _edit_config(lambda c: c.pop("steps")), "steps is missing"),
    "steps a string": ("config.json", _edit_config(lambda c: c.update(steps="3")), "expected a whole number"),
    "steps true": ("config.json", _edit_config(lambda c: c.update(steps=True)), "is true/false"),
    "steps negative": ("config.json", _edit_config(lambda c: c.update(steps=-1)), "steps = -1 is invalid"),
    "params a list": ("config.json", _edit_config(lambda c: c.update(params=[])), "params = [] is a list"),
    "params.model missing": ("config.json", _edit_config(lambda c: c["params"].pop("model")), "model is missing"),
    "an unknown section": (
        "config.json",
        _edit_config(lambda c: c["params"].update(extra={})),
        "params.'extra' is not a key",
    ),
    "an unknown model key": (
        "config.json",
        _edit_config(lambda c: _model(c).update(width=3)),
        "params.model.width is not a key",
    ),
    "a missing model key": (
        "config.json",
        _edit_config(lambda c: _model(c).pop("channels")),
        "params.model.channels is missing",
    ),
    "a model value of the wrong type": (
        "config.json",
        _edit_config(lambda c: _model(c).update(channels="16")),
        "params.model.channels = '16' is invalid",
    ),
    "a million channels": (
        "config.json",
        _edit_config(lambda c: _model(c).update(channels=1_000_000)),
        "params.model.channels = 1000000 is invalid: an integer from 1 to 1024",
    ),
    "gamma_min NaN": (
        "config.json",
        _edit_config(lambda c: _model(c).update(gamma_min=float("nan"))),
        "params.model.gamma_min = nan is invalid",
    ),
    "two bad model values": (
        "config.json",
        _edit_config(lambda c: _model(c).update(channels=0, dropout=2)),
        "(and 1 more)",
    ),
    "image_size 30000": (
        "config.json",
        _edit_config(lambda c: c["params"]["data"].update(image_size=30_000)),
        "params.data.image_size = 30000 is invalid: an integer from 8 to 512",
    ),
    "a net the image size cannot hold": (
        "config.json",
        _edit_config(lambda c: _model(c).update(channel_mult=[1, 1, 1, 1, 1, 1])),
        "does not describe a network for 32x32 images",
    ),
    "a config of another model": (
        "ema.pt",
        _edit_config(lambda c: _model(c).update(channels=32)),
        "does not match",
    ),
    "a config asking for a 1.7 TB net": (
        "ema.pt",
        _edit_config(lambda c: _model(c).update(channels=1024, channel_mult=[16, 16], num_res_blocks=16)),
        "does not match",
    ),
    "ema.pt missing": ("ema.pt", lambda d: _delete(d, "ema.pt"), "not found"),
    "ema.pt emptied": ("ema.pt", _write("ema.pt", b""), "is empty (0 bytes"),
    "ema.pt cut short": ("ema.pt", _cut("ema.pt", 0.5), "is damaged"),
    "ema.pt cut short, no checksum": (
        "ema.pt",
        lambda d: (_cut("ema.pt", 0.5)(d), ckpt.checksum_path(d / "ema.pt").unlink()),
        "cannot be loaded",
    ),
    "ema.pt a folder": ("ema.pt", lambda d: (_delete(d, "ema.pt"), (d / "ema.pt").mkdir()), "is a folder"),
    "ema.pt a tensor": ("ema.pt", _edit_weights(lambda s: torch.zeros(3)), "holds Tensor, not a model's weights"),
    "ema.pt missing an entry": (
        "ema.pt",
        _edit_weights(lambda s: {k: v for k, v in s.items() if k != "net.stem.weight"}),
        "lack net.stem.weight",
    ),
    "ema.pt with an extra entry": (
        "ema.pt",
        _edit_weights(lambda s: {**s, "net.extra.weight": torch.zeros(2)}),
        "hold net.extra.weight, which the config's model has not",
    ),
    "ema.pt of another shape": (
        "ema.pt",
        _edit_weights(lambda s: {**s, "net.stem.weight": torch.zeros(8, 3, 3, 3)}),
        "net.stem.weight is 8x3x3x3 in the weights but",
    ),
    "ema.pt in float16": ("ema.pt", _edit_weights(lambda s: {k: v.half() for k, v in s.items()}), "torch.float16"),
    "ema.pt with a NaN": ("ema.pt", _edit_weights(_nan), "non-finite values (NaN or inf)"),
    "model.pt cut short": ("model.pt", _cut("model.pt", 0.5), "is damaged"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_damaged_model_folder_is_one_line_naming_the_file_and_the_fix(model_dir, tmp_path, fault):
    name, damage, words = MODEL_FAULTS[fault]
    d = copy_of(model_dir, tmp_path / "models")
    damage(d)
    before = tree(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        ckpt.load_model(d, "model" if name == "model.pt" else "ema")
    message = str(e.value)
    assert "\n" not in message and words in message, message
    assert str(d / name) in message and "dvc checkout models" in message and "dvc repro -f train" in message
    assert time.monotonic() - t0 < 10  # nothing built before the files agree (the 1.7 TB net: 429e9 parameters)
    assert tree(tmp_path) == before


def test_the_optional_guide_weights_load_by_name_with_the_same_checks(model_dir, tmp_path):
    """guide.pt (the same net's EMA weights earlier in training, for autoguidance): its absence is
    no fault for ema and model, one line when asked for; when there, it is checked like ema.pt."""
    d = copy_of(model_dir, tmp_path / "models")
    with pytest.raises(UserError, match=r"guide\.pt not found: this model has no guide weights \(its folder holds "):
        ckpt.load_model(d, "guide")
    early = torch.load(d / "model.pt", weights_only=True)  # stands for the EMA weights of an earlier step
    ckpt.save(early, d / "guide.pt")
    guide, _ = ckpt.load_model(d, "guide")
    assert all(torch.equal(v, early[k]) for k, v in guide.state_dict().items())
    damage(d / "guide.pt", "bit-flipped", random.Random(0))
    with pytest.raises(UserError, match=r"guide weights .*guide\.pt is damaged"):
        ckpt.load_model(d, "guide")
    ckpt.load_model(d, "ema")  # the others are not affected
    for bad in ("../models/ema", "/etc/passwd", "", "ema.pt"):
        with pytest.raises(UserError, match="give a name such as ema or model"):
            ckpt.load_model(d, bad)


CLI_FAULTS = ("config.json cut short", "a config asking for a 1.7 TB net", "ema.pt with a NaN")


@pytest.mark.parametrize("fault", CLI_FAULTS)
@pytest.mark.parametrize("entry", ["vdm generate", "vdm serve", "sample stage"])
def test_every_entry_point_gives_the_loaders_line_and_exit_2(model_dir, tmp_path, fault, entry):
    """The command line, the demo server and the sample stage all load through load_model."""
    name, damage, words = MODEL_FAULTS[fault]
    proj = tmp_path / "p"
    d = copy_of(model_dir, proj / "models")
    damage(d)
    before = tree(tmp_path)
    if entry == "sample stage":
        (proj / "params.yaml").write_text(yaml.safe_dump(tiny()))
        cmd = [sys.executable, "-m", "stages.sample"]
        env = subprocess_env() | {"PYTHONPATH": str(ROOT)}
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = str(free.getsockname()[1])
        args = ["generate", "--out", "new", "--n", "2"] if entry == "vdm generate" else ["serve", "--port", port]
        cmd = [sys.executable, "-m", "vdm", *args, "--model", "models", "--device", "cpu"]
        env = subprocess_env()
    p = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert words in line and f"models/{name}" in line
    if entry == "sample stage":
        (proj / "params.yaml").unlink()
    assert tree(tmp_path) == before  # nothing written: no new/, no samples/


# --- 10. artifacts one stage reads that another wrote --------------------------------------------


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _rewrite_npy(change):
    def damage(path: Path) -> None:
        path.write_bytes(_npy_bytes(change(np.load(path))))

    return damage


def _cut_file(keep: float):
    return lambda path: path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# fault -> (damage(path), words of the message)
NPY_FAULTS = {
    "missing": (lambda p: p.unlink(), "not found"),
    "emptied": (lambda p: p.write_bytes(b""), "is empty (0 bytes"),
    "cut short": (_cut_file(0.7), "is cut short"),
    "cut inside its header": (_cut_file(0.0005), "is not a .npy array"),
    "grown": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 100), "but its header declares"),
    "replaced by an HTML page": (lambda p: p.write_bytes(b"<html>404</html>\n"), "is not a .npy array"),
    "replaced by pickled objects": (
        lambda p: p.write_bytes(_npy_bytes(np.array([{"a": 1}], dtype=object))),
        "is not a .npy array",
    ),
    "float32": (_rewrite_npy(lambda a: a.astype(np.float32)), "holds float32"),
    "grey (no colour axis)": (_rewrite_npy(lambda a: a[..., 0]), "expected square images (N, H, H, 3) uint8"),
    "not square": (_rewrite_npy(lambda a: a[:, :, :16]), "expected square images"),
    "no images": (_rewrite_npy(lambda a: a[:0]), "holds no images"),
}


@pytest.mark.parametrize("fault", NPY_FAULTS)
def test_a_damaged_processed_array_stops_the_train_stage_naming_the_file_and_preprocess(
    tmp_path, checkpointed, monkeypatch, capsys, fault
):
    proj = copy_of(checkpointed, tmp_path / "p")
    damage, words = NPY_FAULTS[fault]
    damage(proj / "data/processed/train.npy")
    before = tree(proj)

    code, err = run_stage("train", proj, monkeypatch, capsys)

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: data/processed/train.npy ") and words in err
    assert "`dvc checkout data/processed`" in err and "`dvc repro preprocess`" in err
    assert tree(proj) == before  # the checkpoint, models/ and the damaged file: all as they were


def _with_samples(proj: Path, n: int = 4) -> Path:
    """samples/ as the sample stage writes it: samples.npy and info.json of the same run."""
    rng = np.random.default_rng(0)
    vdm.core.atomic.save_npy(proj / "samples/samples.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    info = {"count": n, "sampler": "ancestral", "steps": 4, "spacing": "t", "clip_denoised": True, "seconds": 0.1}
    vdm.core.atomic.write_json(proj / "samples/info.json", {**info, "img_per_s": 40.0, "device": "cpu"})
    return proj


def _edit_info(edit):
    def damage(path: Path) -> None:
        info = json.loads(path.read_text())
        edit(info)
        path.write_text(json.dumps(info))

    return damage


# (file, damage(path), words of the message)
SAMPLE_FAULTS = {
    **{f"samples.npy {k}": ("samples/samples.npy", *v) for k, v in NPY_FAULTS.items()},
    "samples.npy of another image size": (
        "samples/samples.npy",
        _rewrite_npy(lambda a: a[:, :16, :16]),
        "holds 16x16 sprites but the model draws 32x32",
    ),
    "samples.npy of another run": (
        "samples/samples.npy",
        _rewrite_npy(lambda a: a[:3]),
        "records 4 sprites but samples/samples.npy holds 3",
    ),
    "info.json missing": ("samples/info.json", lambda p: p.unlink(), "not found"),
    "info.json cut short": ("samples/info.json", _cut_file(0.5), "is cut short"),
    "info.json a list": ("samples/info.json", lambda p: p.write_text("[]"), "holds no object"),
    "info.json without the sampler": (
        "samples/info.json",
        _edit_info(lambda i: i.pop("sampler")),
        "sampler is missing",
    ),
    "info.json steps a string": (
        "samples/info.json",
        _edit_info(lambda i: i.update(steps="4")),
        "steps = '4' is a string, expected a whole number",
    ),
    "test split of another image size": (
        "data/processed/test.npy",
        _rewrite_npy(lambda a: np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)),
        "holds 64x64 images but the model in models/ was trained on 32x32",
    ),
}


@pytest.mark.parametrize("fault", SAMPLE_FAULTS)
def test_a_damaged_sample_or_split_stops_the_evaluate_stage_naming_the_file_and_the_stage(
    tmp_path, checkpointed, monkeypatch, capsys, fault
):
    proj = _with_samples(copy_of(checkpointed, tmp_path / "p"))
    name, damage, words = SAMPLE_FAULTS[fault]
    damage(proj / name)
    before = tree(proj)

    code, err = run_stage("evaluate", proj, monkeypatch, capsys)

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and name in err and words in err, err
    stage = "preprocess" if name.startswith("data/") else "sample"
    assert f"`dvc repro {stage}`" in err or "run `dvc repro`" in err
    assert tree(proj) == before  # no metrics, no eval/


CHECKPOINT_FAULTS = {
    "without its optimizer state": (lambda s: s.pop("optimizer") and s, "it has no 'optimizer'"),
    "a negative step": (lambda s: {**s, "step": -1}, "its 'step' is -1"),
    "rows that are no list": (lambda s: {**s, "train_rows": "x"}, "its 'train_rows' is a str, not a list"),
}


@pytest.mark.parametrize("fault", [*CHECKPOINT_FAULTS, "a folder"])
def test_a_checkpoint_that_is_not_one_is_one_line_and_kept(tmp_path, checkpointed, monkeypatch, capsys, fault):
    proj = copy_of(checkpointed, tmp_path / "p")
    (ck,) = (proj / "checkpoints").glob("*.pt")
    if fault == "a folder":
        ck.unlink()
        ck.mkdir()
        words = "is a folder, not a file"
    else:
        edit, words = CHECKPOINT_FAULTS[fault]
        ckpt.save(edit(ckpt.load(ck, "checkpoint")), ck)  # with a matching checksum
    before = tree(proj)

    code, err = run_stage("train", proj, monkeypatch, capsys)

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"checkpoints/{ck.name}" in err and words in err and "start over from step 0" in err
    assert tree(proj) == before


# --- 11. a scaling run killed at a random step ---------------------------------------------------

SCALING_KILL_SEED = 29
SCALING = [sys.executable, "benchmarks/scaling.py", "--train-only", "--images", "16", "32", "48", "--out", "out"]


def _scaling_project(root: Path, processed: Path) -> Path:
    """A project to run benchmarks/scaling.py in: code, processed data, tiny params (12 steps of 4
    images, a checkpoint every 2; snapshots at steps 4, 8 and 12)."""
    shutil.copytree(processed, root / "data/processed")
    for name in ("vdm", "benchmarks"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny(eval_images=4, checkpoint_every=2)))
    return root


def _scaling_outputs(root: Path) -> dict[str, bytes]:
    """The run's weights: every snapshot's files and the final models/, bytes by path."""
    d = root / "out/default"
    files = sorted((d / "snapshots").rglob("*")) + sorted((d / "models").iterdir())
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in files if f.is_file()}


def test_a_scaling_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path, processed):
    """SIGKILL after a seeded random count of new checkpoints (1-3 of the 5 a run writes) plus a
    random part of a step, then the same command again: every snapshot and the final weights are
    byte-identical to an uninterrupted run's, and no checkpoint or temporary file is left."""
    rng = random.Random(SCALING_KILL_SEED)
    ref = _scaling_project(tmp_path / "ref", processed)
    p = start(ref, *SCALING)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    want = _scaling_outputs(ref)
    assert sorted(k for k in want if k.endswith("ema.pt")) == [
        "models/ema.pt",
        "snapshots/step-000004/ema.pt",
        "snapshots/step-000008/ema.pt",
        "snapshots/step-000012/ema.pt",
    ]

    proj = _scaling_project(tmp_path / "killed", processed)
    p = start(proj, *SCALING)
    proj_ck = proj / "out/default"  # wait_for_checkpoint looks in <proj>/checkpoints
    wait_for_checkpoint(proj_ck, p, new=rng.randint(1, 3), timeout=300)
    time.sleep(rng.uniform(0.0, 0.05))
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    (ck,) = (proj_ck / "checkpoints").glob("*.pt")
    step = ckpt.load(ck, "checkpoint")["step"]
    assert 0 < step < 12 and not (proj_ck / "models").exists()

    p = start(proj, *SCALING)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert f"resuming from out/default/checkpoints/{ck.name} at step {step}/12" in err
    assert _scaling_outputs(proj) == want
    assert not list((proj_ck / "checkpoints").iterdir())
    assert not [f for f in proj_ck.rglob(".*")]  # no staged or moved-aside snapshot left


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
        "model folder faults": len(MODEL_FAULTS),
        "of them in config.json": sum(1 for name, *_ in MODEL_FAULTS.values() if name == "config.json"),
        "entry points x faults": len(CLI_FAULTS) * 3,
        "processed array faults": len(NPY_FAULTS),
        "samples/ and split faults": len(SAMPLE_FAULTS),
        "checkpoint faults": len(CHECKPOINT_FAULTS) + 1,
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
    from vdm.training.tracking import Tracker

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached.*train.wandb: offline"):
        Tracker("online", {}, "t")
    assert time.monotonic() - t0 < 10
