"""preprocess: data/raw -> data/processed/{train,val,test}.npy, manifest.csv, preview.png + metrics/data.json."""

from stages._cli import run
from vdm.core.params import load_params
from vdm.data.preprocess import preprocess


def main() -> None:
    data = load_params().data
    m = preprocess(data, "data/raw", "data/processed", "metrics/data.json")
    print(
        f"preprocess: {m['images']} images ({m['train']} train / {m['val']} val / {m['test']} test) in "
        f"{m['groups']['total']} groups from {m['files']} files; {m['duplicates']} duplicates, "
        f"{m['skipped_total']} skipped {m['skipped']}; test split losslessly: PNG {m['test_png_bpd']:.3f}, "
        f"WebP {m['test_webp_lossless_bpd']:.3f} bits/subpixel"
    )


if __name__ == "__main__":
    run(main, __doc__)
