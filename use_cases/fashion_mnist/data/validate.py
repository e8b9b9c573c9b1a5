"""Validate step of the Fashion-MNIST data pipeline: `python3 validate.py IN OUT`.

Every image goes to OUT/valid/<class>/ or, with a .reason file, to OUT/quarantine/<class>/: it
must decode as a 28x28 grayscale image.
"""

import sys
from pathlib import Path

from pipelines.data.batching import batch_all_datums
from pipelines.data.cleaning import image_problem, place

SIZE = (28, 28)


def main(src: Path, out: Path) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        problem = image_problem(path.read_bytes(), SIZE)
        if problem is None and path.suffix.lower() != ".png":
            problem = f"wrong file type: {path.suffix or 'no suffix'}, expected .png"
        place(out, path.parent.name, path.name, path, problem)


if __name__ == "__main__":
    # Started once per worker (datum_batching): every datum is mounted at the same IN and OUT.
    batch_all_datums(main)(Path(sys.argv[1]), Path(sys.argv[2]))
