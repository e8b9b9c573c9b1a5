"""A pipeline's transform as a local process: its command, stdin and environment with `/pfs`
rewritten to the folder its datum is mounted in, as the engine, the datum-batching worker and the
spouts run it; and the result of one datum."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.datums import Datum
from pipelines.data.spec import Transform

LOG_TAIL = 32_000  # characters of a datum's output kept for `cdl data job logs`
PFS = re.compile(r"(?<![\w./-])/pfs(?=/|\b|$)")


@dataclass
class DatumResult:
    datum: Datum
    state: str  # processed | skipped | failed
    attempts: int = 0
    seconds: float = 0.0
    log: str = ""
    error: str = ""
    outputs: list[tuple[str, str, int]] | None = None


def tail(text: str) -> str:
    return text[-LOG_TAIL:]


@dataclass
class LocalCommand:
    argv: list[str]
    env: dict[str, str]
    stdin: str | None
    cwd: str | Path


def local_command(
    transform: Transform, pfs: Path, workdir: Path, env: dict[str, str] | None = None
) -> LocalCommand:
    """A transform as a local process: `/pfs` in its command, stdin and environment (the spec's
    and `env`) rewritten to the folder `pfs`."""

    def local(text: str) -> str:
        return PFS.sub(lambda _: str(pfs), text)

    # `python3` in a transform is the platform venv's, as the image's would be.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env = {**os.environ, "PATH": path}
    full_env.update({k: local(v) for k, v in {**transform.env, **(env or {})}.items()})
    stdin = "".join(local(line) + "\n" for line in transform.stdin) or None
    # working_dir names a folder of the image on Pachyderm; locally the transform runs in the
    # spec's folder, unless working_dir is inside /pfs.
    inside_pfs = transform.working_dir and PFS.match(transform.working_dir)
    cwd = local(transform.working_dir) if inside_pfs else workdir
    return LocalCommand([local(a) for a in transform.cmd], full_env, stdin, cwd)


def exit_error(code: int, output: str) -> str:
    return f"exit code {code}: " + " | ".join(output.strip().splitlines()[-5:])


def datum_env(datum: Datum, pfs: Path) -> dict[str, str]:
    """The variables Pachyderm sets for a datum: each input's matched path, its join and group
    keys, and the datum's id."""
    env = {}
    for item in datum.inputs:
        env[item.name] = f"{pfs}/{item.name}{item.path.rstrip('/')}"
        if item.key is not None:
            env[f"PACH_DATUM_{item.name}_JOIN_ON"] = item.key
        if item.group_key is not None:
            env[f"PACH_DATUM_{item.name}_GROUP_BY"] = item.group_key
    env["PACH_DATUM_ID"] = datum.hash[:32]
    return env
