"""Cleaning and validation rules shared by the use cases' data pipelines, and the validation
report. The pipelines' scripts (use_cases/*/data/*.py) apply these to the files of one datum.

Validated output has one layout for every use case:
    valid/<class>/<file>                 what passed
    quarantine/<class>/<file>            what failed, never dropped ...
    quarantine/<class>/<file>.reason     ... with one reason file each
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import unicodedata
from collections import Counter
from pathlib import Path

MIN_WORDS = 40  # shorter "articles" are headlines or fragments, not training text
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")


def clean_text(data: bytes) -> str:
    """UTF-8 (undecodable bytes become U+FFFD), NFC, no control characters, single spaces, no
    trailing spaces, paragraphs separated by one blank line, one final newline."""
    text = unicodedata.normalize("NFC", data.decode("utf-8", errors="replace"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", text.replace("\t", " "))
    lines = [SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text + "\n" if text else ""


def article_problem(name: str, text: str, min_words: int = MIN_WORDS) -> str | None:
    """Why a cleaned article cannot be used, or None."""
    if not name.endswith(".txt"):
        return f"wrong file type: {Path(name).suffix or 'no suffix'}, expected .txt"
    title, _, body = text.partition("\n")
    if not body.strip():
        return "no body after the title line"
    words = len(body.split())
    if words < min_words:
        return f"too short: {words} words, at least {min_words}"
    return None


def image_problem(data: bytes, size: tuple[int, int], mode: str = "L") -> str | None:
    """Why an image file cannot be used (does not decode, wrong size or colour mode), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != size:
                return f"wrong shape: {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}"
            if image.mode != mode:
                return f"wrong colour mode: {image.mode}, expected {mode}"
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"does not decode as an image: {exc}"
    return None


def place(out: Path, class_name: str, name: str, source: Path, problem: str | None) -> None:
    """Copy one checked file to valid/ or quarantine/ (with its reason)."""
    folder = out / ("quarantine" if problem else "valid") / class_name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / name)
    if problem:
        (folder / f"{name}.reason").write_text(problem + "\n")


def report(validated: Path) -> dict:
    """Counts of valid files per class and quarantined files per reason."""
    valid = Counter(p.parent.name for p in (validated / "valid").rglob("*") if p.is_file())
    reasons: Counter = Counter()
    for reason_file in (validated / "quarantine").rglob("*.reason"):
        reasons[reason_file.read_text().strip().split(":")[0]] += 1
    return {
        "valid": sum(valid.values()),
        "quarantined": sum(reasons.values()),
        "valid_per_class": dict(sorted(valid.items())),
        "quarantined_per_reason": dict(sorted(reasons.items())),
    }


def main(argv: list[str]) -> int:
    """`python3 -m pipelines.data.cleaning report VALIDATED OUT`: the validation report step."""
    if len(argv) != 3 or argv[0] != "report":
        print(
            "usage: python3 -m pipelines.data.cleaning report VALIDATED_DIR OUT_DIR",
            file=sys.stderr,
        )
        return 2
    validated, out = Path(argv[1]), Path(argv[2])
    figures = report(validated)
    (out / "validation-report.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
