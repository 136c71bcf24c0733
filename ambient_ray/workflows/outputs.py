"""``ambient-ray ls`` and ``ambient-ray get``: look at a run's outputs where they are, local disk or S3.

    ambient-ray ls s3://ambient/run1          one line per entry: sub-folders with their file count and size
    ambient-ray ls -r s3://ambient/run1       every file under it, with its size
    ambient-ray get s3://ambient/run1/samples/grid.png [DEST]    copy a file (or a folder, recursively) here

Both read S3 through the same settings as the stages (``AWS_ENDPOINT_URL``, the key variables or an instance
profile; :mod:`ambient_ray.io.storage`), so what a job wrote is what you see.
"""

from __future__ import annotations

import os

from ambient_ray.config import ConfigError
from ambient_ray.io import storage


def human(n: int) -> str:
    """A byte count as people read it: ``812 B``, ``4.1 kB``, ``23.0 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _entries(uri: str) -> tuple[list[tuple[str, int]], bool]:
    """(path relative to ``uri``, size) of every file under it, sorted (hidden and temporary names skipped, as
    :func:`storage.walk` does), and whether ``uri`` is itself a file; a ConfigError if nothing is there."""
    size = storage.file_size(uri)
    if size is not None:
        return [(os.path.basename(storage.normalize(uri)), size)], True
    if not storage.is_dir(uri):
        raise ConfigError(f"{uri}: no such file or folder")
    return storage.walk(uri), False


def ls(uri: str, recursive: bool = False) -> int:
    files, _ = _entries(uri)
    if recursive:
        width = max((len(h) for h in (human(s) for _, s in files)), default=0)
        for rel, size in files:
            print(f"{human(size):>{width}}  {rel}")
    else:
        folders: dict[str, list[int]] = {}
        for rel, size in files:
            head, sep, _ = rel.partition("/")
            key = head + "/" if sep else head
            entry = folders.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size
        for name, (count, size) in folders.items():
            what = (f"{count} file" + "s" * (count != 1)) if name.endswith("/") else ""
            print(f"{name:32s} {what:>12s} {human(size):>10s}")
    total = sum(s for _, s in files)
    print(f"{len(files)} files, {human(total)} in {storage.normalize(uri)}")
    return 0


def get(uri: str, dest: str | None = None) -> int:
    """Copy the file ``uri`` (or every file under the folder ``uri``) to ``dest`` (default: the current folder)."""
    files, single = _entries(uri)
    dest = dest or "."
    # a folder is copied under its own name; a bucket root (s3://bucket/) under the bucket's
    folder = os.path.basename(storage.normalize(uri).rstrip("/"))
    for rel, _ in files:
        source = storage.normalize(uri) if single else storage.join(uri, rel)
        name = os.path.basename(rel) if single else os.path.join(folder, rel)
        into = os.path.isdir(dest) or dest.endswith(("/", os.sep))  # a folder: the file goes in it, by its name
        target = os.path.join(dest, name) if into or not single else dest
        storage.download(source, target)
        print(target)
    return 0
