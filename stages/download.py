"""download: data.source -> data/raw/files + data/raw/SOURCE.json."""

from stages._cli import run
from vdm.core.params import load_params
from vdm.data.sources import fetch

RAW = "data/raw"


def main() -> None:
    data = load_params().data
    info = fetch(data, RAW)
    extra = f" (fell back from {info['requested']}: {info['fallback_reason']})" if "fallback_reason" in info else ""
    print(f"download: {info['files']} files, {info['bytes'] / 2**20:.1f} MB from {info['origin']}{extra} -> {RAW}")


if __name__ == "__main__":
    run(main, __doc__)
