"""Datum batching for transforms: start once, then ask for one datum after another.

With `transform.datum_batching: true` in a pipeline spec, the engine starts the transform once
per worker instead of once per datum. The transform loops: it asks for the next datum, the call
blocks until that datum is mounted, it processes `/pfs/<input>` into `/pfs/out`, and asks again;
the answer to the last call says there is none left. Asking again reports the previous datum as
done; passing an error reports it as failed (it is retried, `datum_tries`, like any failed datum).

    from pipelines.data.batching import batch_all_datums

    @batch_all_datums
    def step(src: Path, out: Path) -> None:
        ...  # one datum: its files under src, its output to out

    if __name__ == "__main__":
        load_model()  # what is slow to start runs once, before the loop
        step(Path(sys.argv[1]), Path(sys.argv[2]))

Every datum is mounted at the same paths, as on Pachyderm: locally each worker has its own folder
for `/pfs` (the spec's `/pfs/...` arguments name it), emptied and filled again for each datum. The
input variables (`$raw`: the matched path) and `PACH_DATUM_ID` are set in `os.environ` for each.

The same code runs in three places:
- the local engine with batching: `CDL_DATUM_SOCKET` names a unix socket the engine answers on;
  a request is one JSON line `{"error": ""}` and the answer `{"env": {...}}` or `{"done": true}`;
- Pachyderm with batching (`PPS_WORKER_GRPC_PORT` is set): pachyderm-sdk's NextDatum, and the
  worker stops the process after the last datum (the image needs the `pachyderm` extra);
- anywhere else (the local engine without batching, or by hand): one datum, the one mounted.

This module runs inside the transform: it imports only the standard library (and pachyderm-sdk
on Pachyderm).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

SOCKET_ENV = "CDL_DATUM_SOCKET"
PACHYDERM_ENV = "PPS_WORKER_GRPC_PORT"
PACHYDERM_DOTENV = Path("/pfs/.env")

_state = {"served": False, "worker": None}


def next_datum(error: str | None = None) -> dict[str, str] | None:
    """Report the previous datum (`error` None or empty: it succeeded) and wait for the next one.

    Returns the next datum's environment (also set in `os.environ`), or None when no datum is
    left. The first call reports nothing."""
    sys.stdout.flush()  # the output so far belongs to the previous datum's log
    sys.stderr.flush()
    if os.environ.get(SOCKET_ENV):
        return _ask_engine(os.environ[SOCKET_ENV], error or "")
    if os.environ.get(PACHYDERM_ENV):
        return _ask_pachyderm(error or "")
    if _state["served"]:
        return None
    _state["served"] = True
    return {}


def batch_all_datums(user_code: Callable[..., None]) -> Callable[..., None]:
    """Call `user_code` once per datum until none is left (pachyderm-sdk's decorator of the same
    name, also on the local engine). An exception fails that datum: its traceback goes to the
    datum's log and the loop goes on with the next datum."""

    @functools.wraps(user_code)
    def loop(*args, **kwargs) -> None:
        error = None
        while next_datum(error) is not None:
            error = None
            try:
                user_code(*args, **kwargs)
            except Exception as exc:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"

    return loop


def _ask_engine(path: str, error: str) -> dict[str, str] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(json.dumps({"error": error}).encode() + b"\n")
            answer = json.loads(conn.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot ask the engine for the next datum at {path}: {exc}") from exc
    if answer.get("done") or "env" not in answer:
        return None
    os.environ.update(answer["env"])
    return answer["env"]


def _ask_pachyderm(error: str) -> dict[str, str]:
    if _state["worker"] is None:
        from pachyderm_sdk import Client  # the worker's gRPC port, from PPS_WORKER_GRPC_PORT

        _state["worker"] = Client().worker
    response = _state["worker"].next_datum(error=error)
    env = dict(item.split("=", 1) for item in response.env if "=" in item)
    if PACHYDERM_DOTENV.is_file():  # where the worker writes the datum's variables
        from dotenv import dotenv_values  # a dependency of pachyderm-sdk

        env.update({k: v for k, v in dotenv_values(PACHYDERM_DOTENV).items() if v is not None})
    os.environ.update(env)
    return env
