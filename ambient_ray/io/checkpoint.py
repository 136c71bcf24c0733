"""A training checkpoint's files: the format the engine writes and restores, and that the export, phema and
resume checks read. Nothing here knows Ray Train or DeepSpeed beyond folder and file names.

A checkpoint folder holds, for the part marked ``export`` (:class:`ambient_ray.train.parts.Part`), DeepSpeed's
state under tag ``ds/``, the EMA (``ema.safetensors``: what sampling loads; ``ema-profiles.safetensors`` for the
power EMA's other profiles; under ZeRO-3 every rank's own partitions in ``ema-rank-NNNN.safetensors``), the raw
weights (``model.safetensors``) and ``model.json``; every other trained part has the same files under
``parts/NAME/`` (:func:`part_dir`); each rank's random and task state is ``rank-NNNN.safetensors`` at the top.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

from ambient_ray.config import ConfigError
from ambient_ray.io import storage


def part_dir(d: str, name: str, export: bool) -> str:
    """The folder of part ``name``'s files in checkpoint folder ``d``: ``d`` itself for the export part (the layout
    of a one-network run, which sampling, phema and the export read), else ``d/parts/NAME``."""
    return d if export else os.path.join(d, "parts", name)


def state_file(d: str, rank: int) -> str:
    return os.path.join(d, f"rank-{rank:04d}.safetensors")


def save_ema(d: str, names: list[str], ema, rank: int, zero3: bool) -> None:
    """A checkpoint's EMA files in folder ``d``. Collective under ZeRO-3 (every profile is gathered a parameter
    at a time). Rank 0 writes ``ema.safetensors`` (the first profile: what sampling loads) and, with several
    profiles (the power EMA), ``ema-profiles.safetensors`` (profile k's tensors as ``k/NAME``), each a tensor at a
    time as it is gathered (:func:`~ambient_ray.io.safetensors_stream.write_streamed`: never the whole EMA at
    once); under ZeRO-3 every rank also writes its own partitions of every profile (``ema-rank-NNNN.safetensors``),
    which a restore on as many ranks loads alone. Each file carries the EMA's kind (and profiles) in its metadata."""
    import torch
    from safetensors.torch import save_file

    from ambient_ray.io.safetensors_stream import write_streamed

    keep, shapes = rank == 0, ema.shapes()
    if zero3:
        part = {profile_key(k, n): t.cpu().contiguous() for k, p in enumerate(ema.profiles) for n, t in zip(names, p)}
        save_file(part, ema_rank_file(d, rank), metadata={**ema.meta(), **ema.describe()})
    files = {"ema.safetensors": [0]}
    if len(ema.profiles) > 1:
        files["ema-profiles.safetensors"] = list(range(1, len(ema.profiles)))
    for fname, profiles in files.items():
        specs = [(profile_key(k, n), torch.float32, s) for k in profiles for n, s in zip(names, shapes)]
        tensors = (t for k in profiles for t in ema.stream(keep, k))
        write_streamed(os.path.join(d, fname) if keep else None, specs, tensors, ema.describe())


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|^rank-|^ema-rank-)(\d+)")


def rank_files(names: list[str], rank: int, zero3: bool) -> list[str]:
    """The files of a checkpoint (paths relative to it) that ``rank`` reads to restore: every rank's own
    files (DeepSpeed's ``zero_pp_rank_R_*``, ``rank-RRRR``, ``ema-rank-RRRR``) for this rank only, no raw-weights
    export (``model.safetensors``), and under ZeRO-3, where the rank's own EMA partitions are there, not the
    gathered EMA either; the small shared files (DeepSpeed's ``mp_rank_00_model_states.pt``, JSON) for all.
    Each part's files (the export part's at the top, any other under ``parts/NAME/``) are judged in their folder."""
    own = f"ema-rank-{rank:04d}.safetensors"
    have_own = {n.rsplit("/", 1)[0] if "/" in n else "" for n in names if zero3 and n.rsplit("/", 1)[-1] == own}
    keep = []
    for n in names:
        folder, base = n.rsplit("/", 1) if "/" in n else ("", n)
        m = _RANK_FILE.search(base)
        if m and int(m.group(1)) != rank:
            continue
        gathered_ema = base in ("ema.safetensors", "ema-profiles.safetensors")
        if base == "model.safetensors" or (gathered_ema and folder in have_own):
            continue
        keep.append(n)
    return keep


@contextlib.contextmanager
def rank_checkpoint(ckpt, rank: int, zero3: bool):
    """A local folder holding only :func:`rank_files` of a Ray Train checkpoint (where ``Checkpoint.as_directory``
    would download every rank's shards on every worker: 1/world of the optimizer states is what a rank needs)."""
    import pyarrow.fs as pafs

    fs, root = ckpt.filesystem, ckpt.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = [i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File]
    with tempfile.TemporaryDirectory() as d:
        for n in rank_files(names, rank, zero3):
            dest = os.path.join(d, n)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            pafs.copy_files(f"{root}/{n}", dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield d


def restore_ema(d: str, names: list[str], ema, rank: int, zero3: bool) -> None:
    """The EMA from a checkpoint folder ``d`` written by :func:`save_ema`, bit for bit: under ZeRO-3 this rank's
    own partitions where they were cut for it, else the gathered files a tensor at a time (under ZeRO-3, from any
    world size: this rank's slices). A checkpoint of another EMA kind or other profiles is refused."""
    from safetensors import safe_open

    own = ema_rank_file(d, rank)
    if zero3 and os.path.exists(own) and ema.fits(metadata_of(own)):
        with safe_open(own, framework="pt") as f:  # a tensor at a time, into the EMA in place
            ema.check(f.metadata())
            for k in range(len(ema.profiles)):
                ema.load_partitions((f.get_tensor(profile_key(k, n)) for n in names), profile=k)
        return
    for k in range(len(ema.profiles)):
        path = os.path.join(d, "ema.safetensors" if k == 0 else "ema-profiles.safetensors")
        if not os.path.exists(path):
            raise ConfigError(f"config key 'ema': the checkpoint in {d} has no {os.path.basename(path)} for {ema.kind}")
        with safe_open(path, framework="pt") as f:
            ema.check(f.metadata())
            ema.load((f.get_tensor(profile_key(k, n)) for n in names), profile=k)


def profile_key(k: int, name: str) -> str:
    return name if k == 0 else f"{k}/{name}"


def ema_rank_file(d: str, rank: int) -> str:
    return os.path.join(d, f"ema-rank-{rank:04d}.safetensors")


def metadata_of(path: str) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def latest_checkpoint(out: str) -> str | None:
    """The newest Ray Train checkpoint folder under OUT/ray/train, if any."""
    root = storage.join(storage.normalize(out), "ray", "train")
    files = storage.list_files(root, ("model.json",))
    # a checkpoint's own model.json (another part's, under parts/NAME/, names no checkpoint)
    ckpts = sorted({d for d in (f.rsplit("/", 2)[-2] for f in files) if d.startswith("checkpoint_")})
    return storage.join(root, ckpts[-1]) if ckpts else None


def export_weights(out: str, ckpt: str | None) -> None:
    """Copy the inference weights of the last checkpoint to ``OUT/model/``, streamed (a file is never held whole)."""
    if ckpt:
        for name in ("ema.safetensors", "model.safetensors", "model.json"):
            storage.copy(storage.join(ckpt, name), storage.join(out, "model", name))
