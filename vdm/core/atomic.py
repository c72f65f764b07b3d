"""Atomic writes: a killed process never leaves a half-written artifact.

Everything is written to a temporary sibling first and renamed into place, so the
old artifact survives until the new one is complete. A failed write (a full disk) removes
the temporary file and names the artifact in the OSError (stages/_cli.py turns ENOSPC into
one line: free space and rerun).

A stage with several outputs (models/, plots, metrics) commits them together (`Commit`): all
are staged as temporary siblings, then a journal naming every rename is written (the commit
point), then the renames run. A failure before the journal leaves every output as it was; a
failure or kill after it is finished by `recover`, which the stage runs first thing next time:
the outputs are then all from the new run, never a mix. Temporary siblings carry their
process id; any left by a process that no longer runs are removed the next time the same
artifact is written.
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

from vdm.core.errors import UserError

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid the OS cannot hold): leave its files alone
    return True


def _remove(path: Path) -> None:
    """Delete a file or a tree, also one whose folders were made read-only (we created them)."""
    if path.is_dir() and not path.is_symlink():

        def writable_then_retry(func, name, _exc):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(name), 0o700)
                func(name)

        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        shutil.rmtree(path, onerror=writable_then_retry)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary and `.old` siblings of `path` left by processes that no longer run
    (a SIGKILL, a power cut); returns what was removed. Temporaries are `.NAME.PID.XXXX.tmp` (and
    `..NAME.PID.XXXX.tmp.PID.XXXX.tmp`, an atomic write into a staged file), olds `.NAME.old-PID`."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for sib in path.parent.iterdir():
        name = sib.name
        if not (name.startswith(f".{path.name}.") or name.startswith(f"..{path.name}.")):
            continue
        if name.endswith(".tmp"):
            pid = name.rsplit(".", 3)[-3]
        elif name == f".{path.name}.old-{name.rsplit('-', 1)[-1]}":
            pid = name.rsplit("-", 1)[-1]
        else:
            continue
        if pid.isdigit() and not _alive(int(pid)):
            _remove(sib)
            removed.append(sib)
    return removed


def _tmp_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _tmp_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))


def _finish_file(tmp: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    tmp = _tmp_file(path)
    try:
        yield tmp
        _finish_file(tmp)
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
    tmp = _tmp_dir(path)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _apply([(tmp, path, path.with_name(f".{path.name}.old-{os.getpid()}"))])
    except OSError as e:
        _name_artifact(e, path, tmp)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Commit:
    """Outputs that change together. Stage each one, write into what it returns, and leave the
    `with` block: all are moved into place, or (on an exception inside the block) none.

        with Commit(journal_for("models")) as c:
            save(c.dir("models") / "model.pt")
            c.file("metrics/train.json").write_text(...)

    Leaving the block writes the journal (a JSON list of [staged, final, old] paths): the commit
    point. Then each final path is moved aside to `old` and the staged one renamed onto it; the
    old ones are removed only when every rename has succeeded. A rename that fails puts back what
    had moved (every output as it was); a kill is finished by `recover(journal)` at the next start.
    """

    def __init__(self, journal: str | os.PathLike):
        self.journal = Path(journal)
        self.staged: list[tuple[Path, Path]] = []

    def file(self, path: str | os.PathLike) -> Path:
        tmp = _tmp_file(Path(path))
        self.staged.append((tmp, Path(path)))
        return tmp

    def dir(self, path: str | os.PathLike) -> Path:
        tmp = _tmp_dir(Path(path))
        self.staged.append((tmp, Path(path)))
        return tmp

    def __enter__(self) -> Commit:
        recover(self.journal)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self._abort()
            return
        entries = [(t, p, p.with_name(f".{p.name}.old-{os.getpid()}")) for t, p in self.staged]
        try:
            for tmp, _ in self.staged:
                if tmp.is_dir():
                    os.chmod(tmp, 0o777 & ~_umask())
                else:
                    _finish_file(tmp)
            write_json(self.journal, [[str(x) for x in e] for e in entries])
        except OSError as e:
            self._abort()
            if e.errno in _DISK_FULL:
                _name_artifact(e, self.staged[0][1] if self.staged else self.journal)
                raise
            raise UserError(
                f"could not write {self.journal} ({e.strerror or e}); every output is as it was before this run: "
                "fix that and rerun"
            ) from None
        try:
            _apply(entries)
        except OSError as e:
            if not getattr(e, "undone", False):  # keep the journal and what is staged: recover finishes it
                raise UserError(
                    f"could not move the new outputs into place ({e.strerror or e}: {e.filename}); the next run "
                    f"finishes the move ({self.journal} records it)"
                ) from None
            self._abort()
            self.journal.unlink(missing_ok=True)
            if e.errno in _DISK_FULL:
                _name_artifact(e, Path(e.filename or self.journal))
                raise
            raise UserError(
                f"could not move the new outputs into place ({e.strerror or e}: {e.filename}); every output "
                "is as it was before this run: fix that and rerun"
            ) from None
        self.journal.unlink(missing_ok=True)

    def _abort(self) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)


def _apply(entries: list[tuple[Path, Path, Path]]) -> None:
    """Move every staged path onto its final one (the final moved aside to `old` first), then
    remove the olds. On an OSError, undo the moves made here (outputs as before) and re-raise.
    Entries whose staged path is gone were moved by an earlier, killed run: only their old is
    removed. The undo is best effort: it uses the same renames that just worked."""
    moved: list[tuple[Path, Path, Path, bool, bool]] = []  # tmp, final, old, aside, placed
    try:
        for tmp, final, old in entries:
            if not tmp.exists() and not tmp.is_symlink():
                continue
            aside = False
            if final.exists() or final.is_symlink():
                _remove(old)
                os.replace(final, old)
                aside = True
            moved.append((tmp, final, old, aside, False))
            os.replace(tmp, final)
            moved[-1] = (tmp, final, old, aside, True)
    except OSError as e:
        e.undone = True
        for tmp, final, old, aside, placed in reversed(moved):
            try:
                if placed:
                    os.replace(final, tmp)
                if aside:
                    os.replace(old, final)
            except OSError:
                e.undone = False
        raise
    for _, _, old in entries:
        _remove(old)


def journal_for(path: str | os.PathLike) -> Path:
    """Where the commit journal of a stage whose first output is `path` lives: a hidden sibling."""
    path = Path(path)
    return path.parent / f".{path.name}.commit.json"


def recover(journal: str | os.PathLike) -> bool:
    """Finish the commit its journal records, if a kill stopped it: every staged output still
    there is moved into place (a final already moved aside stays aside, and is removed). True
    if there was one."""
    journal = Path(journal)
    try:
        entries = [tuple(Path(x) for x in e) for e in json.loads(journal.read_text())]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, TypeError):
        journal.unlink(missing_ok=True)  # a journal is written atomically: a damaged one was never complete
        return False
    _apply(entries)  # a final moved aside by the killed run is simply absent: the staged one takes its place
    journal.unlink(missing_ok=True)
    return True
