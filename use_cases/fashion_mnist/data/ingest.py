"""Ingest step of the Fashion-MNIST data pipeline: `python3 ingest.py IN OUT`.

IN holds the IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]); every image becomes
OUT/images/<class>/<split>-<index>.png, listed in OUT/manifests/manifest-<split>.csv.
"""

import sys
from pathlib import Path

from pipelines.data.fashion import SPLITS, export_pngs


def main(src: Path, out: Path) -> None:
    found = [s for s in SPLITS if any(src.glob(f"{s}-images-idx3-ubyte*"))]
    if not found:
        sys.exit(f"no IDX files in {src}: expected e.g. train-images-idx3-ubyte.gz")
    for split in found:
        export_pngs(src, out / "images", split)
        (out / "manifests").mkdir(parents=True, exist_ok=True)
        (out / "images" / f"manifest-{split}.csv").rename(
            out / "manifests" / f"manifest-{split}.csv"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
