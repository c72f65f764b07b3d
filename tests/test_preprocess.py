import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import data_params, image_bytes, solid
from vdm.core.errors import UserError
from vdm.data.codecs import codec_bits_per_subpixel
from vdm.data.preprocess import group_of, preprocess, split_by_group
from vdm.data.sources import fetch


@pytest.mark.parametrize(
    "rel,grouping,expected",
    [
        ("pokemon/bulbasaur/bulbasaur_shiny.png", "folder", ("bulbasaur", "shiny")),
        ("species-00003/standard.png", "folder", ("species-00003", "standard")),
        ("25.gif", "pokedex", ("25", "front")),
        ("back/shiny/female/025.gif", "pokedex", ("25", "back-shiny-female")),
        ("201-a.gif", "pokedex", ("201", "front")),
        ("shiny/10001.gif", "pokedex", ("386", "shiny")),  # Deoxys-Attack is a Deoxys
        ("substitute.gif", "pokedex", ("substitute", "front")),
        ("pikachu/front.png", "path", ("pikachu", "standard")),
        ("150_mewtwo_shiny.png", "path", ("150", "shiny")),
        ("mewtwo.png", "path", ("mewtwo", "")),
    ],
)
def test_group_rules(rel, grouping, expected):
    assert group_of(rel, grouping) == expected


def test_split_keeps_groups_whole_and_is_deterministic():
    groups = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3
    a = split_by_group(groups, 0.8, 0.1, 0.1, seed=0)
    assert (a == split_by_group(groups, 0.8, 0.1, 0.1, seed=0)).all()
    assert (a != split_by_group(groups, 0.8, 0.1, 0.1, seed=1)).any()
    per_group = pd.DataFrame({"g": groups, "s": a}).groupby("g").s.nunique()
    assert (per_group == 1).all()
    n = {s: len({g for g, x in zip(groups, a, strict=True) if x == s}) for s in ("train", "val", "test")}
    assert n == {"train": 80, "val": 10, "test": 10}


def test_split_with_too_few_groups_is_a_clear_error():
    with pytest.raises(UserError, match="at least 3"):
        split_by_group(["a", "a", "b"], 0.8, 0.1, 0.1, 0)
    with pytest.raises(UserError, match="data.split"):
        split_by_group(["a", "b", "c", "d"], 0.1, 0.45, 0.45, 0)  # no group left for train


def _raw_with_bad_files(tmp_path, count=40):
    raw = tmp_path / "raw"
    fetch(data_params(synthetic={"count": count, "seed": 0}), raw)
    files = raw / "files"
    bad = files / "species-99999"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    (bad / "notes.txt").write_text("readme")
    (bad / "truncated.png").write_bytes((files / "species-00000/standard.png").read_bytes()[:100])
    (files / "species-00001/copy.png").write_bytes((files / "species-00001/shiny.png").read_bytes())
    (files / ".hidden.png").write_bytes(b"ignored")
    # a palette GIF larger than the canvas, in its own folder (group)
    (files / "big").mkdir()
    (files / "big/b.gif").write_bytes(image_bytes(solid((255, 0, 0), (150, 120), "RGB"), "GIF"))
    return raw


def test_preprocess_outputs_counts_and_manifest(tmp_path):
    raw = _raw_with_bad_files(tmp_path)
    out, metrics_path = tmp_path / "processed", tmp_path / "metrics/data.json"
    m = preprocess(data_params(), raw, out, metrics_path, workers=1)
    assert json.loads(metrics_path.read_text()) == m
    assert m["files"] == 40 + 4 + 1 + 1  # .hidden is not a file of the dataset
    assert m["skipped"] == {"empty": 1, "not_image": 2, "corrupt": 1, "too_large": 0, "unsupported_mode": 0}
    assert m["duplicates"] == 1 and m["images"] == 41
    assert m["train"] + m["val"] + m["test"] == 41
    assert m["groups"]["total"] == 21 and min(m["groups"][s] for s in ("train", "val", "test")) >= 1
    # the codec yardstick is the test split's, and agrees with encoding it again
    test = np.load(out / "test.npy")
    assert m["test_png_bpd"] == pytest.approx(codec_bits_per_subpixel(test)["png"])
    assert 0 < m["test_webp_lossless_bpd"] < m["test_png_bpd"] < 8

    df = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(df) == m["files"] and set(df.status) == {"kept", "duplicate", "empty", "not_image", "corrupt"}
    # the first in path order is kept: copy.png sorts before shiny.png
    assert df.loc[df.file == "species-00001/shiny.png", "duplicate_of"].item() == "species-00001/copy.png"
    kept = df[df.status == "kept"]
    assert kept.groupby("group").split.nunique().max() == 1  # no group in two splits
    assert kept.hash.is_unique
    for split in ("train", "val", "test"):
        arr = np.load(out / f"{split}.npy", mmap_mode="r")
        assert arr.shape == (m[split], 96, 96, 3) and arr.dtype == np.uint8
        rows = kept[kept.split == split].sort_values("index")
        assert rows["index"].tolist() == list(range(m[split]))
    big = df[df.file == "big/b.gif"].iloc[0]
    arr = np.load(out / f"{big.split}.npy")[int(big["index"])]
    assert (big.orig_width, big.orig_height) == (150, 120)
    assert tuple(arr[48, 48]) == (255, 0, 0) and tuple(arr[2, 48]) == (255, 255, 255)  # 96x77, centred
    assert (out / "preview.png").stat().st_size > 0


def test_preprocess_is_deterministic_and_parallel_equals_serial(tmp_path):
    raw = _raw_with_bad_files(tmp_path, count=300)
    a = preprocess(data_params(), raw, tmp_path / "a", tmp_path / "a.json", workers=1)
    b = preprocess(data_params(), raw, tmp_path / "b", tmp_path / "b.json", workers=2)
    assert a == b
    for name in ("train.npy", "val.npy", "test.npy", "manifest.csv", "preview.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_preprocess_without_usable_images_keeps_old_outputs(tmp_path):
    raw = tmp_path / "raw"
    (raw / "files/x").mkdir(parents=True)
    (raw / "files/x/a.png").write_text("text")
    (raw / "SOURCE.json").write_text(json.dumps({"source": "path", "grouping": "path"}))
    out = tmp_path / "processed"
    out.mkdir()
    (out / "train.npy").write_bytes(b"old")
    with pytest.raises(UserError, match="no usable images"):
        preprocess(data_params(), raw, out, tmp_path / "m.json", workers=1)
    assert (out / "train.npy").read_bytes() == b"old"


def test_preprocess_before_download_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="dvc repro download"):
        preprocess(data_params(), tmp_path / "raw", tmp_path / "out", tmp_path / "m.json")
