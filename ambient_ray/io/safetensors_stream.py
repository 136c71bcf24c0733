"""A safetensors file written one tensor at a time (:class:`StreamWriter`), for weights too large to hold whole.

``safetensors.torch.save_file`` takes every tensor at once: gathering a ZeRO-3 model's full weights into one dict
on rank 0 holds the whole fp32 model there (6.1 GB for EDM2-XXL), and its EMA again. The format allows streaming:
an 8-byte little-endian header length, a JSON header of every tensor's dtype, shape and byte range (known from
the shapes before any data), then the tensors' bytes back to back in the header's order. This writes that
header first and then each tensor as it arrives, so at most one tensor is held; the file reads back with the
library's own ``safe_open`` / ``load_file``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Sequence

import torch

DTYPES = {
    torch.float64: ("F64", 8),
    torch.float32: ("F32", 4),
    torch.bfloat16: ("BF16", 2),
    torch.float16: ("F16", 2),
    torch.int64: ("I64", 8),
    torch.int32: ("I32", 4),
    torch.int16: ("I16", 2),
    torch.int8: ("I8", 1),
    torch.uint8: ("U8", 1),
    torch.bool: ("BOOL", 1),
}


class StreamWriter:
    """Write ``path`` as a safetensors file of the tensors ``specs`` announces (``(name, dtype, shape)`` in order),
    handed over one at a time with :meth:`write` in that order; ``metadata``: the header's ``__metadata__``.
    Use as a context manager: leaving it early (an error) removes the unfinished file."""

    def __init__(self, path: str, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata=None):
        header, offset = {}, 0
        for name, dtype, shape in specs:
            if dtype not in DTYPES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
            code, size = DTYPES[dtype]
            n = size * math.prod(shape)
            header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
        self.path, self.specs, self.next = path, list(specs), 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, t: torch.Tensor) -> None:
        """The next announced tensor (its name, dtype and shape must be the announced ones)."""
        want = self.specs[self.next] if self.next < len(self.specs) else None
        if want is None or (name, t.dtype, tuple(t.shape)) != (want[0], want[1], tuple(want[2])):
            raise ValueError(f"{self.path}: got {name} {t.dtype} {tuple(t.shape)}, expected {want}")
        self.file.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.specs):
            os.remove(self.path)
            raise ValueError(f"{self.path}: {len(self.specs) - self.next} announced tensors were never written")

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()
            os.remove(self.path)


def write_streamed(
    path: str | None, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]], tensors: Iterable, metadata=None
) -> None:
    """The tensors ``specs`` announces, taken from ``tensors`` one at a time, written to ``path`` as each arrives
    (:class:`StreamWriter`). ``path`` None (a rank that writes nothing): ``tensors`` is only run to its end, for
    whatever each of its steps does on every rank (a ZeRO-3 gather is a collective)."""
    if path is None:
        for _ in tensors:
            pass
        return
    with StreamWriter(path, specs, metadata) as out:
        for i, t in enumerate(tensors):
            out.write(specs[i][0] if i < len(specs) else "", t)
