"""Turn data/raw into clean, deduplicated, group-split uint8 arrays.

    data/raw/files/**          whatever the source gave (SOURCE.json says which)
      -> decode (vdm.core.images)   skip unreadable/empty/non-image files, counting each reason
      -> dedupe                exact pixel duplicates dropped (first in path order kept)
      -> group                 one Pokémon per group (rule from SOURCE.json "grouping")
      -> split                 train/val/test by group (scikit-learn GroupShuffleSplit)
    data/processed/{train,val,test}.npy   (N, S, S, 3) uint8, memory-mappable
    data/processed/manifest.csv           one row per raw file: what became of it
    data/processed/preview.png            a grid of training images
    metrics/data.json                     counts for `dvc metrics show`

Each source's grouping rule (which files are one Pokémon) is in vdm/data/sources.py.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vdm.core.atomic import atomic_dir, save_npy_rows, write_bytes, write_json
from vdm.core.errors import UserError
from vdm.core.images import CORRUPT, SKIP_REASONS, Decoded, decode, image_grid, png_bytes
from vdm.data.codecs import codec_bits_per_subpixel
from vdm.core.params import SPLITS, DataParams
from vdm.data.sources import FILES, group_of, read_source


def printable_name(value):
    """A string as valid UTF-8: bytes of a non-UTF-8 file name (surrogate escapes) become \\xNN."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def list_files(root: Path) -> list[str]:
    """Sorted POSIX relative paths of the files under root, hidden files and folders left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        out.extend((rel_dir / f).as_posix() for f in filenames if not f.startswith("."))
    return sorted(out)


def _decode_file(args: tuple[str, int]):
    path, size = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Decoded(None, CORRUPT, f"unreadable: {e}")
    return decode(data, size)


def decode_all(root: Path, files: list[str], size: int, workers: int) -> Iterator[Decoded]:
    """Decoded files, in order; decoded in `workers` processes when that pays."""
    jobs = [(str(root / f), size) for f in files]
    bar = dict(total=len(jobs), desc="decode", unit="img", mininterval=1.0, disable=None)
    if workers <= 1 or len(jobs) < 256:
        yield from tqdm(map(_decode_file, jobs), **bar)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(_decode_file, jobs, chunksize=64), **bar)


def split_by_group(groups: list[str], train: float, val: float, test: float, seed: int) -> np.ndarray:
    """Assign each item a split name so that no group is in two splits.

    Fractions are of groups, not items. Deterministic in (groups, fractions, seed).
    """
    from sklearn.model_selection import GroupShuffleSplit

    groups_arr = np.asarray(groups)
    n_groups = len(set(groups))
    if n_groups < 3:
        raise UserError(
            f"only {n_groups} Pokémon group(s) in the data: a train/val/test split needs at least 3; "
            "use more data (e.g. raise data.synthetic.count)"
        )
    idx = np.arange(len(groups_arr))
    try:
        rest, te = next(GroupShuffleSplit(1, test_size=test, random_state=seed).split(idx, groups=groups_arr))
        tr, va = next(
            GroupShuffleSplit(1, test_size=val / (train + val), random_state=seed + 1).split(
                rest, groups=groups_arr[rest]
            )
        )
    except ValueError as e:
        raise UserError(
            f"cannot split {n_groups} groups with data.split fractions train={train} val={val} "
            f"test={test}: {e}. Use more data or larger fractions for the small splits"
        ) from None
    out = np.empty(len(groups_arr), dtype=object)
    out[te], out[rest[tr]], out[rest[va]] = "test", "train", "val"
    for name in SPLITS:
        if not (out == name).any():
            raise UserError(
                f"split {name!r} would be empty with {n_groups} groups and data.split fractions "
                f"train={train} val={val} test={test}: use more data or raise data.split.{name}"
            )
    return out


def _raw_files(raw_dir: Path) -> tuple[dict, Path, list[str]]:
    """(SOURCE.json, the files folder, its files) of the download stage's output, checked."""
    source = read_source(raw_dir)
    root = raw_dir / FILES
    if not root.is_dir():
        raise UserError(f"{root} not found: rerun the download stage (`dvc repro -f download`)")
    files = list_files(root)
    if not files:
        raise UserError(f"{root} holds no files: check data.source and rerun the download stage")
    return source, root, files


def _decode_and_dedupe(
    root: Path, files: list[str], grouping: str, size: int, workers: int
) -> tuple[pd.DataFrame, np.ndarray, Counter]:
    """One manifest row per file (its group, what became of it), the kept images in path order,
    and the skipped files counted by reason. Pixels go straight into one preallocated array (kept
    images only): peak memory is about one copy of the dataset, whatever the number of files."""
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    rows, seen, n_kept = [], {}, 0
    skipped = Counter({r: 0 for r in SKIP_REASONS})
    for rel, d in zip(files, decode_all(root, files, size, workers), strict=True):
        group, variant = group_of(rel, grouping)
        row = dict(
            file=rel,
            group=group,
            variant=variant,
            status="kept",
            split="",
            index=-1,
            hash="",
            duplicate_of="",
            orig_width=d.orig_size[0],
            orig_height=d.orig_size[1],
            orig_mode=d.orig_mode,
            frames=d.frames,
            detail=d.detail,
        )
        if d.pixels is None:
            skipped[d.reason] += 1
            row["status"] = d.reason
        else:
            h = hashlib.blake2b(d.pixels.tobytes(), digest_size=16).hexdigest()
            row["hash"] = h
            if h in seen:
                row["status"], row["duplicate_of"] = "duplicate", seen[h]
            else:
                seen[h] = rel
                images[n_kept] = d.pixels
                n_kept += 1
        rows.append(row)
    return pd.DataFrame(rows), images, skipped


def _write_splits(out_dir, df: pd.DataFrame, kept: np.ndarray, split: np.ndarray, images, preview: int):
    """data/processed, all at once: the split arrays, preview.png and manifest.csv. Returns the
    image count per split and the lossless codecs' bits per subpixel on the test split."""
    counts, codec = {}, {}
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            sel = np.flatnonzero(split == name)  # positions among kept images, in path order
            df.loc[kept[sel], "index"] = np.arange(len(sel))
            save_npy_rows(tmp / f"{name}.npy", images, sel)
            counts[name] = int(len(sel))
            if name == "test":  # the yardstick for the model's test bits/dim
                codec = codec_bits_per_subpixel(images[sel])
            if name == "train" and preview:
                write_bytes(tmp / "preview.png", png_bytes(image_grid(images[sel[:preview]], ncol=8)))
        # a file name that is not UTF-8 is written with its odd bytes as \xNN: the manifest stays UTF-8 CSV
        df.map(printable_name).to_csv(tmp / "manifest.csv", index=False)
    return counts, codec


def preprocess(
    data: DataParams,
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    metrics_path: str | os.PathLike,
    workers: int | None = None,
) -> dict:
    """data/raw -> data/processed and metrics/data.json (see the module docstring)."""
    source, root, files = _raw_files(Path(raw_dir))
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    df, images, skipped = _decode_and_dedupe(root, files, source["grouping"], data.image_size, workers)
    kept = df.index[df.status == "kept"].to_numpy()
    if len(kept) == 0:
        raise UserError(f"no usable images in {root} (skipped: {dict(skipped)}); check data.source")
    sp = data.split
    split = split_by_group(df.group[kept].tolist(), sp.train, sp.val, sp.test, sp.seed)
    df.loc[kept, "split"] = split
    counts, codec = _write_splits(out_dir, df, kept, split, images, data.preview)

    kept_df = df.loc[kept]
    metrics = {
        "source": source["source"],
        "image_size": data.image_size,
        "files": len(files),
        "images": int(len(kept)),
        "duplicates": int((df.status == "duplicate").sum()),
        "skipped": dict(skipped),
        "skipped_total": int(sum(skipped.values())),
        "groups": {
            "total": int(kept_df.group.nunique()),
            **{n: int(kept_df.group[kept_df.split == n].nunique()) for n in SPLITS},
        },
        **counts,
        # lossless codecs on the test split, in bits per subpixel (= bits/dim; 8 = uniform)
        **{f"test_{k}_bpd": v for k, v in codec.items()},
    }
    write_json(metrics_path, metrics)
    return metrics
