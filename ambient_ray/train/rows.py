"""A Ray Train worker's rows: its share of the dataset (a stable hash of ``id``), read into memory
(:func:`load_rank_rows`) or streamed epoch after epoch (:func:`stream_batches`)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def row_rank(ids, world: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=4).digest(), "big") % world for i in ids])


def load_rank_rows(
    rank: int,
    world: int,
    per_row: dict[str, dict],
    label_dim: int = 0,
    tensor: tuple[str, list[int]] | None = None,
    columns: dict[str, list[int]] | None = None,
):
    """This rank's rows of the Ray Data shard "train", sorted by id: ids, images uint8 (N, C, H, W) (or,
    with ``tensor`` = (column, shape), that float32 tensor column, e.g. precomputed latents), ``{name:
    tensor}`` of the per-row values given as ``{name: {id: value}}`` and of the tensor ``columns`` ``{name:
    shape}`` (kept in their stored dtype, e.g. float16 caption embeddings), and class labels (or None). Rows
    without per-row values (filtered out on the driver) are skipped."""
    import ray.train

    from ambient_ray.data.images import decode_png

    known = next(iter(per_row.values())) if per_row else None
    it = ray.train.get_dataset_shard("train").iter_batches(batch_size=512, batch_format="numpy")
    ids, imgs, labels = [], [], []
    extra: dict[str, list] = {name: [] for name in columns or {}}
    for batch in it:
        keep = row_rank(batch["id"], world) == rank
        if known is not None:
            keep &= np.array([i in known for i in batch["id"]], dtype=bool)
        for j in np.nonzero(keep)[0]:
            ids.append(str(batch["id"][j]))
            if tensor:
                imgs.append(np.asarray(batch[tensor[0]][j], dtype=np.float32).reshape(tensor[1]))
            else:
                imgs.append(decode_png(batch["image"][j]).transpose(2, 0, 1))
            labels.append(int(batch["label"][j]) if "label" in batch and batch["label"][j] is not None else 0)
            for name, shape in (columns or {}).items():
                extra[name].append(np.asarray(batch[name][j]).reshape(shape))
    if not ids:
        raise RuntimeError(f"rank {rank} of {world} got no rows: the dataset is smaller than the number of workers")
    order = np.argsort(ids)
    ids = [ids[i] for i in order]
    images = torch.from_numpy(np.stack([imgs[i] for i in order]))
    values = {name: torch.tensor([col[i] for i in ids]) for name, col in per_row.items()}
    values.update({name: torch.from_numpy(np.stack([col[i] for i in order])) for name, col in extra.items()})
    lab = torch.tensor([labels[i] for i in order]) if label_dim else None
    return ids, images, values, lab


def stream_batches(batch_size: int, name: str = "train"):
    """Worker side of streaming: this worker's share of the Ray Data shard ``name`` as numpy batches, epoch
    after epoch, forever; yields ``(batch, epoch)``."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        rows = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            rows += len(next(iter(batch.values())))
            yield batch, epoch
        if rows == 0:
            raise RuntimeError("this worker's share of the training data is empty (fewer rows than workers?)")
        epoch += 1
