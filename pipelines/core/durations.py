"""Go durations ('30s', '5m', '1h30m', '500ms'), as pipeline specs and the stack config write
them."""

from __future__ import annotations

import re


def parse_duration(text: str) -> float:
    """A Go duration in seconds; ValueError when `text` is not one."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r} is not like '30s', '5m' or '1h30m'")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)
