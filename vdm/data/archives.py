"""Safe extraction of .zip / .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz archives.

Refused (the whole archive, with a message naming the member): absolute paths, `..`
components, drive letters, links whose target leaves the destination, device files,
paths more than 32 folders deep or with a name over 255 bytes, and archives over the
entry-count or total-size caps (entries: every member, folder and link, and every folder
extraction creates; bytes: what is written, plus a tar's headers and a zip's directory). Sizes are counted as bytes are
actually written, so a zip whose headers lie about sizes cannot exceed the cap.
Links that stay inside are skipped (sprites are regular files). Extraction goes to
a temporary directory and is moved into place only when complete.

A damaged archive is refused, not half read: a tar must end with its end-of-archive blocks
(a tar cut short, or with a broken header in the middle, would otherwise just stop early),
its compressed stream is read to the end so that the compressor's own check runs (gzip's
CRC-32 and length, bz2's block CRCs, xz's check), and a zip member's CRC-32 is checked as it
is read. Any of these is one UserError naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import lzma
import os
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vdm.core.atomic import atomic_dir
from vdm.core.errors import UnsafeArchive, UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_CHUNK = 1 << 20
_MAX_LINK = 4096  # bytes of a zip symlink's target that are read (PATH_MAX)
MAX_DEPTH = 32  # levels (folders and the file) in a member's path: a sprite dataset has a few
MAX_NAME = 255  # bytes in one name (the usual file-system limit, NAME_MAX)

# select(name) -> new relative name, or None to leave the member out
Selector = Callable[[str], "str | None"]


@dataclass
class ExtractStats:
    files: int = 0
    bytes: int = 0
    skipped_links: int = 0


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_relpath(name: str, archive: str | os.PathLike = "archive") -> str:
    """Normalise a member name to a safe relative POSIX path, or raise UnsafeArchive."""
    n = name.replace("\\", "/")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if n.startswith("/") or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise UnsafeArchive(f"{archive}: member {name!r} has an absolute path; refusing to extract this archive")
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: member {name!r} climbs out with '..'; refusing to extract this archive")
    return "/".join(parts)


def _check_link(name: str, target: str, archive: object, hard: bool = False) -> None:
    """A link target must stay inside the destination (relative to the link, or to the root if hard)."""
    t = target.replace("\\", "/")
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, t))
    if t.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive(
            f"{archive}: member {name!r} is a link to {target!r}, outside the target folder; "
            "refusing to extract this archive"
        )


class _Budget:
    """The caps, counted on everything an archive or folder holds: every member or entry (files,
    folders, links, the ones left out), the folders extraction creates, the bytes written and read
    (a tar's headers included), the depth of every path and the length of every name in it."""

    def __init__(self, archive: object, max_files: int, max_bytes: int):
        self.archive, self.max_files, self.max_bytes = archive, max_files, max_bytes
        self.stats = ExtractStats()
        self.entries, self.total = 0, 0
        self.made: set[Path] = set()

    def entry(self, rel: str, header_bytes: int = 0) -> None:
        """One member (or folder entry) seen, whatever it is and whether it is kept."""
        self.entries += 1
        if self.entries > self.max_files:
            raise UnsafeArchive(
                f"{self.archive}: more than {self.max_files} entries (files, folders and links); refusing "
                "(raise data.limits.max_files if this archive is trusted)"
            )
        parts = rel.split("/") if rel else []
        if len(parts) > MAX_DEPTH:
            raise UnsafeArchive(
                f"{self.archive}: {rel[:80]!r}... is {len(parts)} levels deep (at most {MAX_DEPTH}); refusing"
            )
        long = [p for p in parts if len(os.fsencode(p)) > MAX_NAME]
        if long:
            raise UnsafeArchive(
                f"{self.archive}: a name in {rel[:80]!r}... is {len(os.fsencode(long[0]))} bytes long "
                f"(at most {MAX_NAME}); refusing"
            )
        self.add_bytes(header_bytes)

    def add_bytes(self, n: int, written: bool = False) -> None:
        """n bytes read (headers, link targets, padding) or, with `written`, written: both count."""
        self.total += n
        if written:
            self.stats.bytes += n
        if self.total > self.max_bytes:
            raise UnsafeArchive(
                f"{self.archive}: unpacks to more than {self.max_bytes // 2**20} MB; refusing "
                "(a zip bomb? raise data.limits.max_mb if this archive is trusted)"
            )

    def add_file(self) -> None:
        self.stats.files += 1

    def _make_parents(self, dst: Path) -> None:
        new = []
        for d in dst.parents:
            if d in self.made or d.is_dir():
                break
            new.append(d)
        for _ in new:  # folders extraction creates count as entries too
            self.entry("")
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.made.update(new)

    def copy(self, src, dst: Path) -> None:
        self._make_parents(dst)
        with open(dst, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.add_bytes(len(chunk), written=True)
                out.write(chunk)


def _extract_zip(archive: Path, dest: Path, select: Selector, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > budget.max_files:  # the central directory says so: refuse before reading any
            budget.entries = len(infos) - 1
        for info in infos:
            rel = safe_relpath(info.filename, archive)
            budget.entry(rel, len(info.filename) + 46)  # a central-directory record
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # a symlink stored in a zip: its data is the target
                with zf.open(info) as f:
                    raw = f.read(_MAX_LINK + 1)
                if len(raw) > _MAX_LINK:
                    raise UnsafeArchive(
                        f"{archive}: member {info.filename!r} is a link whose target is longer than {_MAX_LINK} "
                        "bytes; refusing to extract this archive"
                    )
                budget.add_bytes(len(raw))
                _check_link(rel, raw.decode("utf-8", "replace"), archive)
                budget.stats.skipped_links += 1
                continue
            if info.is_dir() or not rel:
                continue
            new = select(rel)
            if new is None:
                continue
            budget.add_file()
            with zf.open(info) as src:
                budget.copy(src, dest / safe_relpath(new, archive))


def _extract_tar(archive: Path, dest: Path, select: Selector, budget: _Budget) -> None:
    # "r:*" reads through any compression; members are checked one at a time.
    with tarfile.open(archive, "r:*") as tf:
        members = 0
        for m in tf:
            members += 1
            rel = safe_relpath(m.name, archive)
            budget.entry(rel, tarfile.BLOCKSIZE)
            if m.issym() or m.islnk():
                _check_link(rel, m.linkname, archive, hard=m.islnk())
                budget.stats.skipped_links += 1
                continue
            if m.isdir() or not rel:
                continue
            if not m.isfile():  # device, fifo, ...
                raise UnsafeArchive(f"{archive}: member {m.name!r} is not a regular file; refusing")
            new = select(rel)
            if new is None:
                continue
            budget.add_file()
            src = tf.extractfile(m)
            budget.copy(src, dest / safe_relpath(new, archive))
        _check_tar_end(tf, archive, members, budget)


def _check_tar_end(tf: tarfile.TarFile, archive: Path, members: int, budget: _Budget) -> None:
    """tarfile stops quietly at a header it cannot read after the first one, and at the end of a
    file cut short: require the two zero blocks that end every tar, then read the (decompressed)
    stream to its end, which is where gzip, bz2 and xz verify their checksums."""
    f = tf.fileobj
    f.seek(tf.offset)
    end = f.read(2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
        what = "ends early" if len(end) < 2 * tarfile.BLOCKSIZE else "has a damaged header"
        raise UserError(
            f"{archive} is truncated or damaged: after {members} members it {what} (byte {tf.offset} of the tar) "
            "instead of the end-of-archive blocks; nothing was kept. Download it again"
        )
    while chunk := f.read(_CHUNK):  # padding after the end; bounded like the members
        budget.add_bytes(len(chunk))


def safe_extract(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_files: int,
    max_bytes: int,
    select: Selector = lambda name: name,
) -> ExtractStats:
    """Extract `archive` into `dest` (replaced whole, atomically) and return what was written."""
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"archive {archive} not found")
    budget = _Budget(archive, max_files, max_bytes)
    try:
        with atomic_dir(dest) as tmp:
            if archive.name.lower().endswith(".zip"):
                _extract_zip(archive, tmp, select, budget)
            elif is_archive(archive):
                _extract_tar(archive, tmp, select, budget)
            else:
                raise UserError(f"{archive}: not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
        raise UserError(
            f"{archive} is damaged or not a readable archive ({e}); nothing was kept. Download it again"
        ) from None
    except OSError as e:
        if e.errno is not None:  # a real I/O error (a full disk): not the archive's fault
            raise
        # bz2 reports a corrupt stream as a bare OSError
        raise UserError(
            f"{archive} is damaged or not a readable archive ({e}); nothing was kept. Download it again"
        ) from None
    return budget.stats


def copy_tree(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_files: int,
    max_bytes: int,
    select: Selector = lambda name: name,
) -> ExtractStats:
    """Copy the regular files of folder `src` into `dest` (replaced whole), under the same caps.

    Symlinks are not followed out of `src`: a link whose target leaves the folder is refused.
    """
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"folder {src} not found")
    budget = _Budget(src, max_files, max_bytes)
    root = src.resolve()
    with atomic_dir(dest) as tmp:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in dirnames:
                budget.entry((Path(dirpath) / name).relative_to(src).as_posix())
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                rel = p.relative_to(src).as_posix()
                budget.entry(rel)
                if p.is_symlink():
                    if not p.resolve().is_relative_to(root):
                        raise UnsafeArchive(f"{src}: {rel} links outside the folder (to {os.readlink(p)}); refusing")
                    budget.stats.skipped_links += 1
                    continue
                if not p.is_file():
                    continue
                new = select(rel)
                if new is None:
                    continue
                budget.add_file()
                with open(p, "rb") as f:
                    budget.copy(f, tmp / safe_relpath(new, src))
    return budget.stats
