"""Memory of listing and diffing a 100,000-file commit: `cdl data ls -r` and `cdl data diff`
stream rows from Postgres, so their peak RSS stays flat however many files a commit has.

Run: .venv/bin/python bench/data_listing.py [--files N]
Target: each stays under 300 MB RSS. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import cdl, throwaway_stack

TARGET_MB = 300


def write_tree(root: Path, count: int, tag: str) -> None:
    for i in range(count):
        folder = root / f"shard-{i % 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{i:06d}.txt").write_text(f"{tag} {i}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cdl-bench-listing-"))
    try:
        write_tree(work / "v1", args.files, "first")
        # The second version changes every tenth file, so the diff has rows to stream too.
        write_tree(work / "v2", args.files // 10, "second")
        with throwaway_stack() as stack:
            cdl(stack, "data", "repo", "create", "big")
            put_s, put_rss = cdl(stack, "data", "put", "big", str(work / "v1"))
            cdl(stack, "data", "put", "big", str(work / "v2"))
            ls_s, ls_rss = cdl(stack, "data", "ls", "-r", "big")
            diff_s, diff_rss = cdl(stack, "data", "diff", "big@master^", "big@master")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "files": args.files,
        "put_s": round(put_s, 1),
        "put_peak_rss_mb": round(put_rss / 1e6),
        "ls_s": round(ls_s, 2),
        "ls_peak_rss_mb": round(ls_rss / 1e6),
        "diff_s": round(diff_s, 2),
        "diff_peak_rss_mb": round(diff_rss / 1e6),
        "target_mb": TARGET_MB,
        "met": max(ls_rss, diff_rss) / 1e6 < TARGET_MB,
    }
    print(
        f"{args.files} files: ls -r {figures['ls_s']} s, {figures['ls_peak_rss_mb']} MB peak; "
        f"diff {figures['diff_s']} s, {figures['diff_peak_rss_mb']} MB peak "
        f"(target < {TARGET_MB} MB); put {figures['put_s']} s, "
        f"{figures['put_peak_rss_mb']} MB peak"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
