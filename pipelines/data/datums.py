"""Datums: the units of work a pipeline's input is split into, as Pachyderm defines them.

A pfs input's glob is matched against every path in its commit (folders and files); each match
is a datum holding the files at or below it. '/' is one datum with everything, '/*' one per
top-level entry, '/*/*' one per second-level entry; '**' matches any depth and parentheses
capture parts of a path for joins and groups. `cross` pairs every datum of one input with every
datum of the others, `union` lists them all (its inputs may share a name), `join` combines datums
whose captured keys (`join_on`) are equal, `group` makes one datum of all the datums, from any of
its inputs, whose `group_by` keys are equal. A cron input is read as a pfs input of its tick repo
with glob '/*': one datum per tick file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Callable

from pipelines.data.repos import Commit, FileEntry
from pipelines.data.spec import Input, PFSInput


@dataclass(frozen=True)
class DatumInput:
    name: str  # mounted at /pfs/<name>
    commit: Commit
    path: str  # the matched path
    files: tuple[FileEntry, ...]
    key: str | None = None  # join key
    group_key: str | None = None


@dataclass(frozen=True)
class Datum:
    inputs: tuple[DatumInput, ...]

    @functools.cached_property  # asked for several times per datum in every job
    def hash(self) -> str:
        """Content identity: input names, matched paths and the bytes (sha256) of every file."""
        content = [
            [i.name, i.path, [[f.path, f.sha256] for f in i.files]]
            for i in sorted(self.inputs, key=lambda i: i.name)
        ]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def describe(self) -> dict[str, str]:
        described: dict[str, str] = {}
        for i in self.inputs:  # a group datum may hold several paths of one input
            described[i.name] = f"{described[i.name]}, {i.path}" if i.name in described else i.path
        return described


def glob_regex(glob: str) -> re.Pattern:
    out, i = [], 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = glob.index("]", i)
            body = glob[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        elif char in "()":
            out.append(char)
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def match(glob: str, files: list[FileEntry]) -> dict[str, list[FileEntry]]:
    """{matched path: files at or below it} for one input, in path order."""
    if glob.rstrip("/") == "":
        return {"/": list(files)} if files else {}
    pattern = glob_regex(glob.rstrip("/"))
    fixed_depth = None if "**" in glob else glob.rstrip("/").count("/")
    matched: dict[str, list[FileEntry]] = {}
    for entry in files:
        parts = entry.path.split("/")  # ['', 'a', 'b.txt']
        depths = [fixed_depth] if fixed_depth else range(1, len(parts))
        for depth in depths:
            if depth >= len(parts):
                continue
            prefix = "/".join(parts[: depth + 1])
            if pattern.match(prefix):
                matched.setdefault(prefix, []).append(entry)
    return dict(sorted(matched.items()))


def _key(pfs: PFSInput, path: str, template: str | None) -> str | None:
    """A join or group key: `template` with $1, $2... replaced by the glob's captures."""
    if not template:
        return None
    found = glob_regex(pfs.glob.rstrip("/")).match(path)
    return re.sub(r"\$(\d+)", lambda m: found.group(int(m.group(1))) or "", template)


def datums(
    spec_input: Input,
    commits: dict[str, Commit],
    files_of: Callable[[Commit], list[FileEntry]],
) -> list[Datum]:
    """Every datum of `spec_input`, given the commit of each pfs input (by `repo@branch`)."""
    if spec_input.pfs is not None or spec_input.cron is not None:
        pfs = spec_input.pfs or spec_input.cron.as_pfs()
        commit = commits[pfs.ref]
        found = match(pfs.glob, files_of(commit))
        return [
            Datum(
                (
                    DatumInput(
                        pfs.input_name,
                        commit,
                        path,
                        tuple(entries),
                        _key(pfs, path, pfs.join_on),
                        _key(pfs, path, pfs.group_by),
                    ),
                )
            )
            for path, entries in found.items()
        ]
    children = [datums(c, commits, files_of) for c in spec_input.children]
    if spec_input.group is not None:
        groups: dict[str, list[DatumInput]] = {}
        for child in children:
            for d in child:
                groups.setdefault(d.inputs[0].group_key, []).extend(d.inputs)
        return [Datum(tuple(groups[key])) for key in sorted(groups)]
    if spec_input.cross is not None:
        return [
            Datum(tuple(i for d in combo for i in d.inputs))
            for combo in itertools.product(*children)
        ]
    if spec_input.union is not None:
        return [d for child in children for d in child]
    # join: combine datums with equal keys; an input with outer_join keeps its unmatched datums.
    by_key: list[dict[str, list[Datum]]] = []
    for child in children:
        groups: dict[str, list[Datum]] = {}
        for d in child:
            groups.setdefault(d.inputs[0].key, []).append(d)
        by_key.append(groups)
    outer = [c.pfs.outer_join for c in spec_input.join]
    keys = sorted({k for groups in by_key for k in groups})
    joined = []
    for key in keys:
        present = [groups.get(key) for groups in by_key]
        complete = all(p is not None for p in present)
        kept_by_outer = any(p is not None and o for p, o in zip(present, outer, strict=True))
        if not (complete or kept_by_outer):
            continue
        lists = [p for p in present if p is not None]
        for combo in itertools.product(*lists):
            joined.append(Datum(tuple(i for d in combo for i in d.inputs)))
    return joined
