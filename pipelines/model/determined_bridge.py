"""CDL's calls to a Determined master, run in the Determined environment (`.cdl/venvs/determined`).

`determined` pins `requests<2.32`, below the platform's, so the platform never imports it: the
Determined engine (determined.py) runs `python -m pipelines.model.determined_bridge` in that venv
with one JSON request on stdin, `{"op": ..., "master": URL, ...}`, and reads one JSON line from
stdout: `{"ok": RESULT}` or `{"error": {"kind": KIND, "message": TEXT}}`, where KIND is
`unavailable` (the master does not answer), `auth` (no or wrong credentials), `invalid` (the
master refused the request, e.g. the experiment config; or a context directory that is too big),
`not_found`, or `other`. Anything the SDK prints goes to stderr.

Operations, all through Determined's Python SDK (`determined.experimental.client.Determined`) and
the API bindings it is built on; results are the bindings' own JSON (camelCase):
- create {config, model_dir}: `create_experiment(config, model_dir)` → the experiment;
- request {config, model_dir}: what `create` would send (the config as YAML, the context's files
  and size, as the SDK reads them), built without a master;
- list {label}: the experiments with that label, newest first;
- show {id}: {experiment, trials};
- logs {id, trial?}: {experiment, trials, logs: {trial id: text}};
- kill {id}: `Experiment.kill()` → {experiment, trials}.

Credentials are Determined's own: DET_USER and DET_PASS, or DET_USER and DET_USER_TOKEN, or the
cache of `det user login`; else the default user `determined` with an empty password. A password
is never asked for (stdin is the request; the engine starts this without a terminal).

This module imports only the standard library and `determined`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import re
import sys
from typing import Any, Callable


def _session(request: dict):
    from determined.experimental import client

    return client.Determined(master=request["master"])


def _experiment_json(d, experiment_id: int) -> dict:
    from determined.common.api import bindings

    return bindings.get_GetExperiment(d._session, experimentId=experiment_id).experiment.to_json()


def _trials_json(d, experiment_id: int) -> list[dict]:
    from determined.common import api
    from determined.common.api import bindings

    pages = api.read_paginated(
        lambda offset: bindings.get_GetExperimentTrials(
            d._session, experimentId=experiment_id, offset=offset
        )
    )
    return [t.to_json() for t in itertools.chain.from_iterable(p.trials for p in pages)]


def create(request: dict) -> dict:
    d = _session(request)
    experiment = d.create_experiment(request["config"], request["model_dir"])
    return _experiment_json(d, experiment.id)


def create_request(request: dict) -> dict:
    from determined.common import context, util, v1file_utils
    from determined.common.api import bindings

    files = context.read_v1_context(pathlib.Path(request["model_dir"]))
    body = bindings.v1CreateExperimentRequest(
        activate=True, config=util.yaml_safe_dump(request["config"]), modelDefinition=files
    )
    return {
        "config": body.config,
        "files": sorted(f.path for f in files),
        "size": sum(v1file_utils.v1File_size(f) for f in files),
    }


def list_experiments(request: dict) -> list[dict]:
    from determined.common import api
    from determined.common.api import bindings

    d = _session(request)
    pages = api.read_paginated(
        lambda offset: bindings.get_GetExperiments(
            d._session,
            labels=[request["label"]] if request.get("label") else None,
            offset=offset,
            sortBy=bindings.v1GetExperimentsRequestSortBy.ID,
            orderBy=bindings.v1OrderBy.DESC,
        )
    )
    return [e.to_json() for e in itertools.chain.from_iterable(p.experiments for p in pages)]


def show(request: dict) -> dict:
    d = _session(request)
    return {
        "experiment": _experiment_json(d, request["id"]),
        "trials": _trials_json(d, request["id"]),
    }


def logs(request: dict) -> dict:
    d = _session(request)
    trials = _trials_json(d, request["id"])
    if request.get("trial") is not None:
        trials = [t for t in trials if t["id"] == request["trial"]]
    texts = {}
    for trial in trials:
        lines = d.get_trial(trial["id"]).logs()
        texts[str(trial["id"])] = "".join(
            line if line.endswith("\n") else line + "\n" for line in lines
        )
    return {"experiment": _experiment_json(d, request["id"]), "trials": trials, "logs": texts}


def kill(request: dict) -> dict:
    d = _session(request)
    d.get_experiment(request["id"]).kill()
    return show(request)


OPS: dict[str, Callable[[dict], Any]] = {
    "create": create,
    "request": create_request,
    "list": list_experiments,
    "show": show,
    "logs": logs,
    "kill": kill,
}


def classify(exc: BaseException) -> dict:
    """The kind of a failure, and its message on one line."""
    message = " ".join(str(exc).split())[:600] or type(exc).__name__
    reason = re.search(r"\[Errno -?\d+\] ([^\"')]+)", message)
    if reason:  # urllib3's wrapping of a refused or unresolved connection, reduced to its cause
        message = reason.group(1).strip()
    kind = "other"
    try:
        import requests
        from determined.common.api import errors
    except ImportError:  # determined itself is missing: the environment is broken
        return {"kind": "other", "message": f"{type(exc).__name__}: {message}"}
    if isinstance(exc, (errors.MasterNotFoundException, requests.exceptions.RequestException)):
        kind = "unavailable"
    elif isinstance(exc, (errors.UnauthenticatedException, errors.ForbiddenException, EOFError)):
        kind = "auth"
        if isinstance(exc, EOFError):
            message = "no credentials for the master (a password would be asked for)"
    elif isinstance(exc, errors.NotFoundException):
        kind = "not_found"
    elif isinstance(exc, errors.APIException):
        status = getattr(exc, "status_code", None)
        kind = {400: "invalid", 401: "auth", 403: "auth", 404: "not_found", 409: "invalid"}.get(
            status, "other"
        )
    elif isinstance(exc, ValueError):
        kind = "invalid"
    return {"kind": kind, "message": message}


def main() -> int:
    out = sys.stdout
    try:
        request = json.loads(sys.stdin.read())
        with contextlib.redirect_stdout(sys.stderr):
            result = {"ok": OPS[request["op"]](request)}
    except (Exception, EOFError, KeyboardInterrupt) as exc:
        result = {"error": classify(exc)}
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
