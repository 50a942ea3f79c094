"""run.json: what a run was asked and what each stage produced, every stage keyed by the inputs it reads.

A stage's key is the SHA-256 of exactly what it reads: its config fields, the bytes of the files it reads (the
base checkpoint, reference statistics, detector weights, ...) and the keys of the stages upstream. Before
anything runs, `RunRecord.plan` compares each stage's key with the one recorded: a stage whose inputs changed
is redone, and so is everything downstream (their keys hold its key); the others are reused, or resumed where
a killed run left them unfinished. One line per stage says which, and why (`sweep: redone (sweep.w changed)`).
A stale stage's result leaves run.json and its files leave the run folder at once, so the record only ever
pairs the config with the results that config produced.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
from typing import Any

from neon import dist, paths
from neon.checkpoint import atomic_open
from neon.errors import NeonError

RECORD = "run.json"
LAYOUT = 2          # run.json's layout: 2 = stages keyed by their inputs (1 had no keys and is refused)
_MISSING = object()


@dataclasses.dataclass
class Stage:
    """One stage of a run, as the record sees it.

    inputs:   {field: value} of everything the stage reads (values JSON-able); a value may name an upstream
              stage through `Upstream(name)`, which stands for that stage's key.
    result:   where its result lives in run.json's "stages" (("sweep",), ("baselines", "self_guidance")), or ()
              for a stage that records only files.
    files:    patterns, relative to the run folder, of what the stage writes (removed when it is stale)."""
    name: str
    inputs: dict[str, Any]
    result: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Upstream:
    stage: str


def flatten(section: Any, prefix: str) -> dict[str, Any]:
    """{'sweep.w': [...], 'sweep.sampler.num_steps': 18, ...} of a nested config section."""
    if isinstance(section, dict) and section:
        out = {}
        for k, v in section.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: section}


def stage_key(inputs: dict[str, Any], keys: dict[str, str]) -> str:
    """SHA-256 of the inputs, each upstream stage replaced by its key."""
    resolved = {k: ("stage", v.stage, keys[v.stage]) if isinstance(v, Upstream) else v for k, v in inputs.items()}
    text = json.dumps(resolved, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _hash_file(path: str, h) -> None:
    with paths.open_input(path, "input file") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def file_digest(path: str | None, cache: dict) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's regular files (names and bytes, in sorted order). `cache`
    ({absolute path: {size, mtime_ns, sha256}}) spares rehashing a multi-GB checkpoint on every rerun."""
    if path is None or not os.path.exists(path):
        return None
    real = os.path.realpath(path)
    if os.path.isdir(real):
        h = hashlib.sha256()
        for root, dirs, names in os.walk(real):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, real).encode() + b"\0")
                h.update((file_digest(full, cache) or "").encode())
        return h.hexdigest()
    st = os.stat(real)
    seen = cache.get(real)
    if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
        return seen["sha256"]
    h = hashlib.sha256()
    _hash_file(real, h)
    cache[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return cache[real]["sha256"]


def _changed(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)]


def _own(plain: dict) -> dict:
    """A stage's recorded inputs without its upstream stages (recorded as ["stage", name])."""
    return {k: v for k, v in plain.items() if not (isinstance(v, list) and v[:1] == ["stage"])}


def _reason(old_inputs: dict, stage: Stage, redone: set[str]) -> str:
    """Why a stage is redone: its own fields that changed, else the upstream stage that is redone."""
    changed = _changed(_own(old_inputs), _own(_plain(stage.inputs)))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return f"{shown} changed"
    ups = [v.stage for v in stage.inputs.values() if isinstance(v, Upstream) and v.stage in redone]
    return f"{ups[0]} redone" if ups else "inputs changed"


class RunRecord:
    """run.json in a run folder: config, versions, each stage's key and inputs, and the stages' results (rank 0
    writes it). `plan` holds, per stage, {key, inputs, result, files}: enough to explain and undo it later."""

    def __init__(self, out: str, config: dict, meta: dict):
        self.out, self.path = out, os.path.join(out, RECORD)
        self.existed = os.path.isfile(self.path)
        old = self._read() if self.existed else {}
        self.digests = old.get("file_digests", {})
        self.doc = {"layout": LAYOUT, "config": config, **meta, "plan": old.get("plan", {}),
                    "stages": old.get("stages", {}), "file_digests": self.digests}

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise NeonError(f"{self.path}: not a readable run record ({type(e).__name__}); use another --out") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
            raise NeonError(f"{self.path}: not a run record of neon run (no stages); use another --out")
        if doc.get("layout") != LAYOUT or not isinstance(doc.get("plan"), dict):
            raise NeonError(f"{self.path}: written by an earlier neon run, whose stages record no input keys; "
                            "run into a new --out (its results cannot be matched to this config)")
        return doc

    def digest(self, path: str | None) -> str | None:
        return file_digest(path, self.digests)

    def plan(self, stages: list[Stage]) -> list[str]:
        """Key every stage (upstream first), drop what is stale, and say what happens to each stage. Returns
        those lines (the caller prints them; none for a new run folder); run.json then holds the new config."""
        dist.barrier()   # every rank has read run.json (in __init__) before rank 0 rewrites it below
        keys, redone, lines, old = {}, set(), [], self.doc["plan"]
        for stage in stages:
            keys[stage.name] = stage_key(stage.inputs, keys)
            before = old.get(stage.name)
            if before and before["key"] == keys[stage.name]:
                done = self._result(stage.result) is not None if stage.result else True
                lines.append(f"{stage.name}: " + ("reused" if done else "resumed"))
                continue
            if before:
                redone.add(stage.name)
                lines.append(f"{stage.name}: redone ({_reason(before['inputs'], stage, redone)})")
            elif self.existed:
                lines.append(f"{stage.name}: new")
            self._drop(tuple(stage.result), stage.files)
        for name, before in old.items():
            if name not in keys:
                lines.append(f"{name}: dropped (no longer configured)")
                self._drop(tuple(before["result"]), tuple(before["files"]))
        self.doc["plan"] = {s.name: {"key": keys[s.name], "inputs": _plain(s.inputs), "result": list(s.result),
                                     "files": list(s.files)} for s in stages}
        self._write()
        dist.barrier()
        return lines if self.existed else []

    def _result(self, where: tuple[str, ...]):
        node = self.doc["stages"]
        for k in where:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def _drop(self, result: tuple[str, ...], files: tuple[str, ...]) -> None:
        """Forget a stale stage: its result in run.json, its files in the run folder (rank 0 removes them)."""
        if result:
            parent = self._result(result[:-1])
            if isinstance(parent, dict):
                parent.pop(result[-1], None)
                if len(result) > 1 and not parent:
                    self.doc["stages"].pop(result[0], None)
        if dist.is_main():
            for path in self._matches(files):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)

    def _matches(self, patterns: tuple[str, ...]) -> list[str]:
        """The run folder's entries that match `patterns` (a pattern's last component may hold wildcards)."""
        found = []
        for pattern in patterns:
            folder, name = os.path.split(pattern)
            where = os.path.join(self.out, folder)
            if os.path.isdir(where) and not os.path.islink(where):
                found += [os.path.join(where, n) for n in sorted(os.listdir(where)) if fnmatch.fnmatchcase(n, name)]
        return found

    def stage(self, name: str) -> dict | None:
        return self.doc["stages"].get(name)

    def record(self, name: str, result: dict) -> None:
        self.doc["stages"][name] = result
        self._write()

    def _write(self) -> None:
        if dist.is_main():
            with atomic_open(self.path, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)


def _plain(inputs: dict) -> dict:
    """The inputs as run.json keeps them (JSON values; an upstream stage as ["stage", name])."""
    return json.loads(json.dumps({k: ["stage", v.stage] if isinstance(v, Upstream) else v
                                  for k, v in inputs.items()}, default=repr))
