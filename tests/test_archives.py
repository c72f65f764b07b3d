import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import add_tar_member, make_zip
from vdm.core.errors import UnsafeArchive, UserError
from vdm.data.archives import copy_tree, safe_extract

CAPS = dict(max_files=100, max_bytes=1 << 20)


def outside_files(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.parent.iterdir()}


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "target"
    d.mkdir()
    (d / "old.txt").write_text("keep me")
    return d


def assert_refused_and_nothing_written(archive, dest, tmp_path, match):
    before = outside_files(tmp_path)
    with pytest.raises(UnsafeArchive, match=match):
        safe_extract(archive, dest, **CAPS)
    assert outside_files(tmp_path) == before  # nothing written next to the sandbox
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]  # the old target survives
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".target")]  # no temp left


def test_zip_extracts_selected_members_with_new_names(tmp_path, dest):
    z = make_zip(tmp_path / "a.zip", {"pre/x/1.png": b"one", "pre/2.png": b"two", "other/3.png": b"no"})
    stats = safe_extract(z, dest, **CAPS, select=lambda n: n[4:] if n.startswith("pre/") else None)
    assert (dest / "x/1.png").read_bytes() == b"one" and (dest / "2.png").read_bytes() == b"two"
    assert not (dest / "old.txt").exists()  # replaced whole
    assert stats.files == 2 and stats.bytes == 6


def test_zip_with_parent_traversal_is_refused(tmp_path, dest):
    z = make_zip(tmp_path / "a.zip", {"ok.png": b"1", "../evil": b"x"})
    assert_refused_and_nothing_written(z, dest, tmp_path, r"'\.\.'")


@pytest.mark.parametrize("name", ["/tmp/evil", "C:/evil", "a\\..\\..\\evil"])
def test_zip_with_absolute_or_backslash_paths_is_refused(tmp_path, dest, name):
    z = make_zip(tmp_path / "a.zip", {name: b"x"})
    assert_refused_and_nothing_written(z, dest, tmp_path, "absolute|'\\.\\.'")


def test_tar_with_symlink_to_etc_is_refused(tmp_path, dest):
    t = tmp_path / "a.tar"
    with tarfile.open(t, "w") as tf:
        add_tar_member(tf, "img.png", b"png")
        add_tar_member(tf, "etc", type=tarfile.SYMTYPE, linkname="/etc")
        add_tar_member(tf, "etc/passwd", b"pwned")
    assert_refused_and_nothing_written(t, dest, tmp_path, "link to '/etc'")


def test_tar_with_hardlink_outside_is_refused(tmp_path, dest):
    t = tmp_path / "a.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        add_tar_member(tf, "sub/x", type=tarfile.LNKTYPE, linkname="../../evil")
    assert_refused_and_nothing_written(t, dest, tmp_path, "outside the target")


def test_tar_with_relative_symlink_escaping_is_refused(tmp_path, dest):
    t = tmp_path / "a.tgz"
    with tarfile.open(t, "w:gz") as tf:
        add_tar_member(tf, "a/b/link", type=tarfile.SYMTYPE, linkname="../../../evil")
    assert_refused_and_nothing_written(t, dest, tmp_path, "outside the target")


def test_tar_with_inner_symlink_skips_it_and_keeps_the_files(tmp_path, dest):
    t = tmp_path / "a.tar"
    with tarfile.open(t, "w") as tf:
        add_tar_member(tf, "a/1.png", b"one")
        add_tar_member(tf, "a/alias.png", type=tarfile.SYMTYPE, linkname="1.png")
    stats = safe_extract(t, dest, **CAPS)
    assert stats.files == 1 and stats.skipped_links == 1
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["a/1.png"]


def test_tar_with_device_file_is_refused(tmp_path, dest):
    t = tmp_path / "a.tar"
    with tarfile.open(t, "w") as tf:
        add_tar_member(tf, "dev", type=tarfile.CHRTYPE)
    assert_refused_and_nothing_written(t, dest, tmp_path, "not a regular file")


def test_zip_bomb_is_stopped_at_the_size_cap(tmp_path, dest):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * (8 << 20))  # 8 MB of zeros compresses to ~8 kB
    assert z.stat().st_size < 64 << 10
    assert_refused_and_nothing_written(z, dest, tmp_path, "more than 1 MB")


def test_file_count_cap(tmp_path, dest):
    z = make_zip(tmp_path / "many.zip", {f"{i}.png": b"x" for i in range(101)})
    assert_refused_and_nothing_written(z, dest, tmp_path, "more than 100 entries")


def _tar_of(path, members):
    """A .tar.gz of (name, kind) members: 'dir', 'link' (to a sibling) or 'file' (one byte)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "x.png"
                tf.addfile(info)
            else:
                info.size = 1
                tf.addfile(info, io.BytesIO(b"x"))
    return path


@pytest.mark.parametrize("kind", ["dir", "link"])
def test_entries_that_write_no_file_count_too(tmp_path, dest, kind):
    """A tar of 101 empty folders or in-tree links: nothing selected to write, yet each is an
    entry to read and keep in memory; the cap counts them."""
    t = _tar_of(tmp_path / f"{kind}s.tar.gz", [(f"d{i}", kind) for i in range(101)])
    assert_refused_and_nothing_written(t, dest, tmp_path, "more than 100 entries")


def test_folders_that_extraction_creates_count_too(tmp_path, dest):
    """60 files, each in its own folder: 120 entries for a cap of 100."""
    z = make_zip(tmp_path / "spread.zip", {f"f{i}/x.png": b"x" for i in range(60)})
    assert_refused_and_nothing_written(z, dest, tmp_path, "more than 100 entries")
    ok = make_zip(tmp_path / "ok.zip", {f"f{i}/x.png": b"x" for i in range(40)})
    assert safe_extract(ok, dest, **CAPS).files == 40


def test_a_path_too_deep_or_a_name_too_long_is_refused(tmp_path, dest):
    deep = make_zip(tmp_path / "deep.zip", {"/".join(["d"] * 40) + "/x.png": b"x"})
    assert_refused_and_nothing_written(deep, dest, tmp_path, "41 levels deep")
    long = _tar_of(tmp_path / "long.tar.gz", [("a/" + "n" * 300 + ".png", "file")])
    assert_refused_and_nothing_written(long, dest, tmp_path, "304 bytes long")
    src = tmp_path / "folder"
    (src / "/".join(["d"] * 33)).mkdir(parents=True)
    with pytest.raises(UnsafeArchive, match="33 levels deep"):
        copy_tree(src, tmp_path / "copy", **CAPS)


def test_corrupt_archive_is_a_clear_error(tmp_path, dest):
    z = tmp_path / "broken.zip"
    z.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="not a readable archive"):
        safe_extract(z, dest, **CAPS)
    assert (dest / "old.txt").read_text() == "keep me"


def test_copy_tree_refuses_links_out_of_the_folder(tmp_path, dest):
    src = tmp_path / "src"
    src.mkdir()
    (src / "1.png").write_bytes(b"one")
    (src / "inner.png").symlink_to(src / "1.png")
    stats = copy_tree(src, dest, **CAPS)
    assert stats.files == 1 and stats.skipped_links == 1 and (dest / "1.png").read_bytes() == b"one"
    (src / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchive, match="links outside"):
        copy_tree(src, dest, **CAPS)
    assert (dest / "1.png").exists()  # the previous copy survives


# --- damaged archives: refused whole, not half read ----------------------------------------------


def _tar_bytes(n=19, size=3000, seed=0):
    import io
    import random

    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            add_tar_member(tf, f"sprites/{i}.png", bytes(rng.getrandbits(8) for _ in range(size)))
    return buf.getvalue()


def _assert_damaged(archive, dest, words):
    with pytest.raises(UserError, match=words) as e:
        safe_extract(archive, dest, **CAPS)
    assert str(archive) in str(e.value) and "nothing was kept" in str(e.value)
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]  # the previous target survives, alone


@pytest.mark.parametrize(("fmt", "opener"), [("gz", "gzip"), ("bz2", "bz2"), ("xz", "lzma")])
def test_a_bit_flip_in_a_compressed_tar_is_refused(tmp_path, dest, fmt, opener):
    import importlib

    packed = bytearray(importlib.import_module(opener).compress(_tar_bytes()))
    mid = len(packed) // 2
    packed[mid : mid + 16] = bytes(b ^ 0xFF for b in packed[mid : mid + 16])
    archive = tmp_path / f"sprites.tar.{fmt}"
    archive.write_bytes(bytes(packed))
    _assert_damaged(archive, dest, "damaged")


def test_a_tar_cut_at_a_header_boundary_is_refused(tmp_path, dest):
    raw = _tar_bytes()
    archive = tmp_path / "cut.tar"
    archive.write_bytes(raw[: 4 * (512 + 3072)])  # 4 of 19 members, then the file ends
    _assert_damaged(archive, dest, "after 4 members it ends early")


def test_a_tar_with_a_broken_header_mid_way_is_refused(tmp_path, dest):
    raw = bytearray(_tar_bytes())
    at = 6 * (512 + 3072)
    raw[at + 100 : at + 120] = b"X" * 20  # mode/uid fields of the 7th header: its checksum fails
    archive = tmp_path / "broken.tar"
    archive.write_bytes(bytes(raw))
    _assert_damaged(archive, dest, "after 6 members it has a damaged header")


def test_a_truncated_tar_gz_is_refused(tmp_path, dest):
    import gzip

    packed = gzip.compress(_tar_bytes())
    archive = tmp_path / "short.tar.gz"
    archive.write_bytes(packed[: len(packed) * 2 // 3])
    _assert_damaged(archive, dest, "damaged")


def test_intact_compressed_tars_still_extract_every_member(tmp_path, dest):
    import bz2
    import gzip
    import lzma

    raw = _tar_bytes(n=5)
    for name, pack in (
        ("a.tar", bytes),
        ("a.tar.gz", gzip.compress),
        ("a.tar.bz2", bz2.compress),
        ("a.tar.xz", lzma.compress),
    ):
        archive = tmp_path / name
        archive.write_bytes(pack(raw))
        stats = safe_extract(archive, dest, **CAPS)
        assert stats.files == 5 and sorted(p.name for p in (dest / "sprites").iterdir()) == [
            f"{i}.png" for i in range(5)
        ]


def test_a_zip_symlink_with_a_huge_target_is_refused_unread(tmp_path, dest):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("sprites/link.png")
        info.external_attr = 0o120777 << 16  # a symlink
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, b"a" * (64 << 20))  # 64 MB of "target", 64 KB compressed
    assert z.stat().st_size < 1 << 20
    assert_refused_and_nothing_written(z, dest, tmp_path, "longer than 4096 bytes")
