"""Streaming rows for σ-first training: a worker's share of the data, read as a stream of batches and kept in
bounded per-stratum pools, so memory does not grow with the dataset (pure numpy/torch; the Ray Data reader
that feeds it is :func:`ambient_ray.train.rows.stream_batches`).

The exact σ-first law (docs/design/notes.md, "The streaming σ-first sampler"; :mod:`ambient_ray.diffusion.stratified`)
draws σ, then a stratum k with probability ∝ n_k·e_k(σ) from the *global* counts n_k, then a row of stratum
k. Here that row is a uniform pick from stratum k's pool: rows arrive from the worker's stream (its share of
the data in Ray Data's order, every row once per epoch, then again in the next epoch) and are routed by their
own annotation into their stratum's pool; a full pool replaces a uniformly chosen slot. The stream advances
by as many rows as each batch takes, so every row keeps passing through its pool, and a pool that is empty
when its stratum is drawn is filled first (blocking on the stream). Nothing in this treats one row of a
stratum differently from another, so each draw is uniform over the stratum in expectation (the pool is a
finite window, so consecutive draws are not independent as random access would make them); the (σ,
stratum) pairing is exact by construction, and no row is ever paired below its buffer.

Pools are sized by each stratum's expected share of the draws (``capacities``): clean rows, drawn at every σ,
get the largest pool. A stratum a worker's share holds no row of (found out after a whole epoch without one)
is dropped from that worker's draws and counted in :attr:`StratumPools.absent`; the other workers still
draw it at the global rate.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

# the per-row fields a pool keeps: the row itself (image or latent), its annotation and label
FIELDS = ("x", "sigma_min", "label")


def capacities(probs: torch.Tensor, strata: torch.Tensor, total: int, minimum: int = 16) -> dict[int, int]:
    """Pool sizes: ``total`` rows split by each stratum's share of the draws (``probs``: the mean of
    ``stratum_probs`` over many σ draws, indexed by stratum id), at least ``minimum`` each."""
    share = probs[strata].double()
    share = share / share.sum().clamp(min=1e-12)
    return {int(k): max(minimum, int(round(float(s) * total))) for k, s in zip(strata.tolist(), share)}


class StratumPools:
    """Bounded per-stratum pools fed by a stream of batches (see the module's docs).

    ``stream`` yields ``(batch, epoch)``: a batch is a dict of arrays with ``fields`` (default :data:`FIELDS`;
    ``x`` (B, ...), and e.g. caption embeddings), and
    ``epoch`` counts passes over the worker's share; ``stratum_of(batch)`` gives each row's stratum id. A
    background thread reads ``prefetch`` batches ahead; :attr:`wait_seconds` is the time :meth:`take` spent
    blocked on it (the feed's cost to training).
    """

    def __init__(
        self,
        stream: Iterator[tuple[dict, int]],
        stratum_of: Callable[[dict], np.ndarray],
        capacity: dict[int, int],
        generator: torch.Generator,
        prefetch: int = 4,
        fields: tuple[str, ...] = FIELDS,
    ):
        self.fields = fields
        self.stratum_of, self.capacity, self.generator = stratum_of, capacity, generator
        self.pools: dict[int, dict[str, torch.Tensor]] = {}
        self.filled = {k: 0 for k in capacity}
        self.absent: set[int] = set()
        self.epoch = 0
        self.rows_read = 0
        self.wait_seconds = 0.0
        self._pending: tuple[dict, np.ndarray, int] | None = None  # a batch partly routed
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        threading.Thread(target=self._read, args=(stream,), daemon=True, name="stratum-pools").start()

    def _read(self, stream) -> None:
        try:
            for item in stream:
                self._q.put(item)
        except BaseException as e:  # surfaced in the training thread by _next
            self._error = e
        self._q.put(None)

    def _next(self) -> tuple[dict, int]:
        t0 = time.perf_counter()
        item = self._q.get()
        self.wait_seconds += time.perf_counter() - t0
        if item is None:
            raise RuntimeError(f"the training data stream stopped: {self._error!r}") from self._error
        return item

    def _pool(self, k: int, batch: dict) -> dict[str, torch.Tensor]:
        if k not in self.pools:
            self.capacity.setdefault(k, 16)  # a stratum the driver did not size (never drawn there)
            self.filled.setdefault(k, 0)
            self.pools[k] = {
                f: torch.empty((self.capacity[k], *batch[f].shape[1:]), dtype=torch.from_numpy(batch[f][:0]).dtype)
                for f in self.fields
            }
        return self.pools[k]

    def ingest(self, rows: int) -> None:
        """Route the next ``rows`` rows of the stream into their pools."""
        while rows > 0:
            if self._pending is None:
                batch, epoch = self._next()
                self.epoch = epoch
                strata = np.asarray(self.stratum_of(batch))
                self._pending = ({f: np.asarray(batch[f]) for f in self.fields}, strata, 0)
            batch, strata, start = self._pending
            stop = min(len(strata), start + rows)
            self._route(batch, strata, start, stop)
            rows -= stop - start
            self.rows_read += stop - start
            self._pending = None if stop == len(strata) else (batch, strata, stop)

    def _route(self, batch: dict, strata: np.ndarray, start: int, stop: int) -> None:
        part = strata[start:stop]
        for k in np.unique(part).tolist():
            idx = start + np.flatnonzero(part == k)
            pool = self._pool(k, batch)
            f, cap = self.filled[k], self.capacity[k]
            free = min(cap - f, len(idx))
            slots = torch.empty(len(idx), dtype=torch.long)
            slots[:free] = torch.arange(f, f + free)
            if len(idx) > free:  # a full pool: each new row replaces a uniformly chosen one
                slots[free:] = torch.randint(0, cap, (len(idx) - free,), generator=self.generator)
            self.filled[k] = f + free
            for name in self.fields:
                pool[name][slots] = torch.from_numpy(np.ascontiguousarray(batch[name][idx]))

    def _fill(self, k: int) -> bool:
        """Read until stratum k's pool has a row; False if two epoch boundaries passed without one (a whole
        pass over this worker's share: k is absent from it)."""
        start = self.epoch
        while self.filled.get(k, 0) == 0:
            if self.epoch >= start + 2:
                self.absent.add(k)
                return False
            self.ingest(1)
        return True

    def take(self, strata: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One row per entry of ``strata``, each a uniform pick from its stratum's pool; then the stream
        advances by as many rows. None if a drawn stratum turned out absent from this worker's share (the
        caller redraws without it)."""
        for k in torch.unique(strata).tolist():
            if self.filled.get(k, 0) == 0 and not self._fill(k):
                return None
        out = {f: [] for f in self.fields}
        order = []
        for k in torch.unique(strata).tolist():
            where = (strata == k).nonzero().flatten()
            pick = torch.randint(0, self.filled[k], (len(where),), generator=self.generator)
            for f in self.fields:
                out[f].append(self.pools[k][f][pick])
            order.append(where)
        inv = torch.empty(len(strata), dtype=torch.long)
        inv[torch.cat(order)] = torch.arange(len(strata))
        rows = {f: torch.cat(v)[inv] for f, v in out.items()}
        self.ingest(len(strata))
        return rows

    def rows_held(self) -> int:
        return sum(self.filled.values())
