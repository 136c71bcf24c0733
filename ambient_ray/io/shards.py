"""The one resume protocol: atomic writes, done-markers, and a fingerprint of what produced them.

Every stage and workflow that skips work it did before goes through here:

- **Writes are atomic** (:func:`ambient_ray.io.storage.write_bytes`): a reader sees an old object or the
  whole new one, never half of it. :func:`write_json` is that for JSON.
- **A done-marker** ``FOLDER/NAME.json`` is written last, after the work it stands for, and holds the
  work's ``fingerprint`` and a small JSON ``summary``. Work without its marker (a killed run) is redone.
- **A fingerprint** (:func:`fingerprint`) is a stable hash of everything the output depends on: the
  resolved config less what does not change the result (MLflow settings, resume switches), the
  inputs, and the fingerprints of the steps before it (:func:`chain`). A marker with another
  fingerprint counts as not done, so a changed key redoes exactly the work that depends on it, and an
  unchanged re-run does nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from ambient_ray.io import storage

# resolved-config keys that never change what a stage produces
NOT_WORK = frozenset({"mlflow", "resume", "overwrite"})


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def fingerprint(obj: Any, items: Iterable[str] = ()) -> str:
    """A stable hex hash of ``obj`` (JSON-able: dicts, lists, numbers, strings; key order does not
    matter), then of each string in ``items`` (e.g. the ids of a long listing, hashed as a stream)."""
    h = hashlib.sha256(_canonical(obj).encode())
    for item in items:
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def chain(previous: str, obj: Any) -> str:
    """A short fingerprint of ``obj`` that also changes whenever ``previous`` (the step before) does."""
    return hashlib.sha256((previous + _canonical(obj)).encode()).hexdigest()[:16]


def config_print(cfg, *inputs: str, exclude: Iterable[str] = ()) -> str:
    """The fingerprint of a resolved pydantic config (less :data:`NOT_WORK` and ``exclude``) and of the
    fingerprints of its ``inputs`` (the steps it reads from)."""
    keep = cfg.model_dump(mode="json", exclude=set(NOT_WORK) | set(exclude))
    return fingerprint({"config": keep, "inputs": list(inputs)})


def shard_name(uri: str) -> str:
    """An input shard's name (its file name without the extension): the key of its outputs and marker."""
    return uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def write_json(uri: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``uri``, atomically."""
    storage.write_bytes(uri, json.dumps(obj, indent=1, default=str).encode())


def _uri(folder: str, name: str) -> str:
    return storage.join(folder, f"{name}.json")


def read_marker(folder: str, name: str) -> dict | None:
    """The raw marker ``FOLDER/NAME.json`` ({"name", "fingerprint", "summary"}), or None if there is none."""
    uri = _uri(folder, name)
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, NotADirectoryError):
        return None


def mark_done(folder: str, name: str, fingerprint: str, summary: dict | None = None) -> None:
    """Record that the work ``name`` in ``folder`` finished with this fingerprint (write it last)."""
    write_json(_uri(folder, name), {"name": name, "fingerprint": fingerprint, "summary": summary or {}})


def done(folder: str, name: str, fingerprint: str) -> dict | None:
    """The summary recorded by :func:`mark_done` if ``name`` finished with this very fingerprint, else None."""
    marker = read_marker(folder, name)
    if marker is None or marker.get("fingerprint") != fingerprint:
        return None
    return marker.get("summary", {})


def done_all(folder: str, fingerprint: str) -> dict[str, dict]:
    """Every marker in ``folder`` with this fingerprint: {name: summary} (others count as not done)."""
    found = {}
    for uri in storage.list_files(folder, (".json",), recursive=False):
        name = uri.rsplit("/", 1)[-1][: -len(".json")]
        summary = done(folder, name, fingerprint)
        if summary is not None:
            found[name] = summary
    return found


def clear(uri: str) -> None:
    """Remove a folder (or file) of unfinished or stale work, so the step starts over."""
    if storage.exists(uri):
        storage.delete(uri)


def manifest_changed(folder: str, fingerprint: str) -> bool:
    """True if ``FOLDER/_manifest.json`` records another plan than ``fingerprint`` (the caller then
    refuses, or clears the stale outputs); False if there is none or it is the same plan."""
    uri = storage.join(folder, "_manifest.json")
    try:
        old = json.loads(storage.read_bytes(uri)).get("fingerprint")
    except FileNotFoundError:
        old = None
    return old is not None and old != fingerprint


def write_manifest(folder: str, fingerprint: str, **info: Any) -> None:
    """``FOLDER/_manifest.json``: the fingerprint of the plan its markers belong to, and ``info``."""
    write_json(storage.join(folder, "_manifest.json"), {"fingerprint": fingerprint, **info})
