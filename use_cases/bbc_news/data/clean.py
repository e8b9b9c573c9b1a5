"""Clean step of the BBC news data pipeline: `python3 clean.py IN OUT`.

IN holds the datum's raw files in <class>/<file> layout. Each .txt article is decoded as UTF-8
(undecodable bytes replaced), normalised (NFC, no control characters, single spaces, one blank
line between paragraphs) and written to OUT/<class>/<content hash>.txt: identical articles get
the same name and are stored once. Other files are passed through unchanged for the validate step
to quarantine with a reason.
"""

import hashlib
import shutil
import sys
from pathlib import Path

from pipelines.data.batching import batch_all_datums
from pipelines.data.cleaning import clean_text


def main(src: Path, out: Path) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        folder = out / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        if path.suffix != ".txt":
            shutil.copyfile(path, folder / path.name)
            continue
        text = clean_text(path.read_bytes())
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
        (folder / f"{digest}.txt").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    # Started once per worker (datum_batching): every datum is mounted at the same IN and OUT.
    batch_all_datums(main)(Path(sys.argv[1]), Path(sys.argv[2]))
