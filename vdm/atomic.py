"""Atomic writes: a killed process never leaves a half-written artifact.

Everything is written to a temporary sibling first and renamed into place, so the
old artifact survives until the new one is complete. A failed write (a full disk) removes
the temporary file and names the artifact in the OSError (stages/_cli.py turns ENOSPC into
one line: free space and rerun).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _name_artifact(e: OSError, path: Path, tmp_dir: Path | None = None) -> None:
    """A write to a full disk raises OSError without a file name (or with a temporary one): name the artifact."""
    if e.errno not in _DISK_FULL:
        return
    if not e.filename:
        e.filename = str(path)
    elif tmp_dir is not None and Path(e.filename).is_relative_to(tmp_dir):
        e.filename = str(path / Path(e.filename).relative_to(tmp_dir))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except OSError as e:
        _name_artifact(e, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save an array as .npy (memory-mappable with np.load(..., mmap_mode="r"))."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npy_rows(path: str | os.PathLike, array: np.ndarray, rows: np.ndarray, chunk: int = 1024) -> None:
    """Save array[rows] as .npy without materialising the selection in memory."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=(len(rows), *array.shape[1:]))
        _reserve(tmp)
        for i in range(0, len(rows), chunk):
            out[i : i + chunk] = array[rows[i : i + chunk]]
        out.flush()
        del out


def _reserve(path: Path) -> None:
    """Allocate a (sparse) file's blocks now: on a full disk, writing through a memory map would
    kill the process with SIGBUS; this raises OSError(ENOSPC) instead."""
    with open(path, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # filesystems without it
                raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` whole.

    On failure the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except OSError as e:
        _name_artifact(e, path, tmp)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
