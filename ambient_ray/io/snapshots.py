"""Power-EMA snapshots on storage (EDM2 Sec. 3.2): the file format the training engine writes and the phema
stage reads.

A run trained with ``ema: power`` writes every ``ema_snapshot_every`` images, for each tracked profile,
``OUT/phema/<std>-<step, 10 digits>.safetensors`` (:func:`write_snapshot`): the full EMA of that profile after
that optimizer step, with the profile (σ_rel, γ) and the time (step, images, global batch) in the safetensors
metadata.
"""

from __future__ import annotations

import json

from ambient_ray.io import storage

FORMAT = "ambient-ray power-EMA snapshot"


def snapshot_uri(out: str, std: float, step: int) -> str:
    return storage.join(storage.normalize(out), "phema", f"{std:g}-{step:010d}.safetensors")


def write_snapshot(out: str, tensors: dict, std: float, gamma: float, step: int, global_batch: int) -> str:
    """One profile's full EMA after ``step`` to ``OUT/phema/`` (atomically: readers see the whole file or none)."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "std": repr(float(std)), "gamma": repr(float(gamma)), "step": str(step)}
    meta.update(nimg=str(step * global_batch), global_batch=str(global_batch))
    uri = snapshot_uri(out, std, step)
    storage.write_bytes(uri, save(tensors, metadata=meta))
    return uri


def read_metadata(uri: str) -> dict[str, str]:
    """A safetensors file's metadata, from its header only (8 bytes of length, then the JSON header)."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("not a safetensors file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{uri}: not a readable safetensors snapshot ({e})") from None
    return header.get("__metadata__") or {}


def list_snapshots(run: str) -> list[dict]:
    """The run's snapshots as dicts (uri, std, gamma, step, nimg), sorted by step then σ_rel."""
    root = storage.join(storage.normalize(run), "phema")
    found = []
    for uri in storage.list_files(root, (".safetensors",), recursive=False):
        meta = read_metadata(uri)
        if meta.get("format") != FORMAT:
            continue
        found.append(
            {
                "uri": uri,
                "std": float(meta["std"]),
                "gamma": float(meta["gamma"]),
                "step": int(meta["step"]),
                "nimg": int(meta["nimg"]),
            }
        )
    return sorted(found, key=lambda s: (s["step"], s["std"]))
