"""Folders of weights (a VAE, a text encoder) on local disk or S3, made available as local folders.

Model libraries (diffusers, transformers, open_clip) load from a local folder. A local path is used where it is;
an ``s3://`` prefix is copied once per node into a cache, ``$AMBIENT_RAY_CACHE/weights`` (default
``~/.cache/ambient-ray/weights``), under a name that is the sha256 of the URI and the listing of its objects
(relative key, size, modification time): a changed object upstream makes a new copy, never a stale reuse.

The copy is atomic and happens once per node: the files go to a temporary folder that is renamed into place,
under an exclusive file lock, so two actors of one node that ask at the same time copy once (the second waits
and reuses). A missing folder or an empty prefix is refused (``FileNotFoundError``), an unreadable one
(``StorageError``), naming what was asked for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from ambient_ray.io import storage

CACHE_ENV = "AMBIENT_RAY_CACHE"


def cache_root() -> str:
    """The node-local folder that holds copies of S3 weight folders."""
    base = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/ambient-ray")
    return os.path.join(os.path.abspath(base), "weights")


def _label(uri: str, what: str | None) -> str:
    return f"{what} {uri}" if what else uri


def listing(uri: str, what: str | None = None) -> list[tuple[str, int, str]]:
    """``(relative name, size, mtime)`` of every file under ``uri`` (hidden and temporary names skipped), sorted.

    Raises ``FileNotFoundError`` naming ``uri`` when it is no folder (or, on S3, no object has the prefix)."""
    base = storage.normalize(uri)
    if not storage.is_s3(base):
        if not os.path.exists(base):
            raise FileNotFoundError(f"{_label(uri, what)}: no such folder")
        if not os.path.isdir(base):
            raise FileNotFoundError(f"{_label(uri, what)}: not a folder")
        if not os.access(base, os.R_OK | os.X_OK):
            raise storage.StorageError(f"{_label(uri, what)}: the folder cannot be read (permissions)")
    files = storage.list_files(base)
    if not files and storage.is_s3(base):
        raise FileNotFoundError(f"{_label(uri, what)}: no objects under this S3 prefix")
    fs, _ = storage.filesystem(base)
    infos = fs.get_file_info([storage.filesystem(f)[1] for f in files])
    out = []
    for f, info in zip(files, infos):
        mtime = info.mtime_ns if info.mtime_ns is not None else ""
        out.append((f[len(base) + 1 :], int(info.size or 0), str(mtime)))
    return out


def cache_key(uri: str, entries: list[tuple[str, int, str]]) -> str:
    blob = json.dumps([storage.normalize(uri), [list(e) for e in entries]], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _copy_file(src_uri: str, dst_path: str) -> None:
    """One object to a local file, streamed (weights may be larger than memory): :func:`storage.download`."""
    try:
        storage.download(src_uri, dst_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {src_uri} (removed while it was being copied?)") from None


def local_folder(uri: str, what: str | None = None, entries: list[tuple[str, int, str]] | None = None) -> str:
    """A local folder holding the files of ``uri``: the folder itself if local, else the node's cached copy.

    ``what`` names the source in errors (e.g. ``"--vae"``); ``entries`` is ``uri``'s :func:`listing`, when the
    caller already has it (saves one listing)."""
    base = storage.normalize(uri)
    if entries is None:
        entries = listing(base, what)
    if not storage.is_s3(base):
        return base
    root = cache_root()
    key = cache_key(base, entries)
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, f".{key}.lock")):
        if os.path.isdir(final):  # another process of this node copied it while this one waited
            return final
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root)
        try:
            for rel, size, _ in entries:
                dst = os.path.join(tmp, rel)
                _copy_file(storage.join(base, rel), dst)
                if os.path.getsize(dst) != size:
                    raise storage.StorageError(
                        f"{_label(uri, what)}: {rel} changed while it was being copied "
                        f"({os.path.getsize(dst)} bytes, listed {size}); retry"
                    )
            with open(os.path.join(root, f".{key}.json"), "w") as f:  # what the copy is, for people
                json.dump({"uri": base, "files": entries}, f, indent=1)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def folder_sha256(*folders: str) -> str:
    """sha256 over the files of local ``folders`` (as :func:`listing` sees them: names relative to each folder,
    sorted, hidden and ``_`` names skipped): names, sizes and bytes, so a changed weight or config changes it.
    The same files give the same value wherever they were copied from (the provenance of loaded weights)."""
    h = hashlib.sha256()
    for folder in folders:
        entries = listing(folder)
        h.update(f"folder:{len(entries)}\n".encode())
        for rel, size, _ in entries:
            h.update(f"{rel}\0{size}\0".encode())
            with open(os.path.join(folder, rel), "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
    return h.hexdigest()
