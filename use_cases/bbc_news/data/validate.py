"""Validate step of the BBC news data pipeline: `python3 validate.py IN OUT`.

Every cleaned file goes to OUT/valid/<class>/ or, with a .reason file, to OUT/quarantine/<class>/:
wrong file type, no body after the title, or fewer words than MIN_WORDS.
"""

import sys
from pathlib import Path

from pipelines.data.batching import batch_all_datums
from pipelines.data.cleaning import article_problem, place


def main(src: Path, out: Path) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8", errors="replace")
        place(out, path.parent.name, path.name, path, article_problem(path.name, text))


if __name__ == "__main__":
    # Started once per worker (datum_batching): every datum is mounted at the same IN and OUT.
    batch_all_datums(main)(Path(sys.argv[1]), Path(sys.argv[2]))
