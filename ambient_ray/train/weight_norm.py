"""EDM2's forced weight normalisation as a post-step hook on DeepSpeed's fp32 master weights, at every ZeRO stage.

``w`` below is the :class:`~ambient_ray.train.worker.Worker` (its ``zero3``, ``device`` and ``world``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ambient_ray.models.edm2 import row_scale
from ambient_ray.models.weights import partition_span


class ForcedWeightNorm:
    """Post-step hook: EDM2's forced weight normalisation (Karras et al. 2024, Sec. 2.3 and App. B.2) of the
    optimizer's *master* weights, every output row back to unit magnitude after each optimizer step.

    DeepSpeed rewrites the module's weights from its fp32 master copy after every step, so normalising the
    module's weights (or doing it inside ``forward``) is lost at ZeRO >= 1. Here each rank takes its own piece
    of every weight's master copy (ZeRO 1/2 and the bf16 optimizer: ``p._hp_mapping``'s fragment of the flat
    fp32 partition; ZeRO-3: ``safe_get_local_fp32_param``, the rank's flat slice; otherwise, fp32 without
    ZeRO: the parameter itself, whole on every rank), adds up the squares of each row's elements it holds,
    sums the row sums over the ranks in one all-reduce (of one float per output row of all the weights:
    the same collective, in the same order, on every rank), and scales its piece by
    :func:`~ambient_ray.models.edm2.row_scale`; then the module's (lower-precision or partitioned) copy is
    scaled alike, so the next forward sees the normalised weights too."""

    def __init__(self, w, weights: list[torch.nn.Parameter]):
        self.weights = weights
        shapes = [tuple(p.ds_shape) if w.zero3 else tuple(p.shape) for p in weights]
        self.rows = [s[0] for s in shapes]
        self.fan_in = [math.prod(s[1:]) for s in shapes]
        self.offset = [0, *np.cumsum(self.rows).tolist()]
        self.mode = "zero3" if w.zero3 else ("hp" if any(hasattr(p, "_hp_mapping") for p in weights) else "plain")
        fan = torch.tensor(self.fan_in, dtype=torch.float32).repeat_interleave(torch.tensor(self.rows))
        self.fan_rows = fan.to(w.device)  # the fan-in of every row of every weight, in order

    def pieces(self, w):
        """(index, parameter, flat fp32 master piece, its first element's index in the flat parameter)."""
        from deepspeed.utils import safe_get_local_fp32_param

        for i, p in enumerate(self.weights):
            if self.mode == "plain":
                yield i, p, p.data.view(-1), 0
            elif self.mode == "hp":
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    yield i, p, m.get_hp_fragment().view(-1), m.lp_fragment_address.start
            else:
                start, n = partition_span(p)  # the last ranks' slices end in padding
                if n:
                    yield i, p, safe_get_local_fp32_param(p).view(-1)[:n], start

    @torch.no_grad()
    def __call__(self, w) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        pieces = list(self.pieces(w))
        sums = torch.zeros(self.offset[-1], dtype=torch.float32, device=w.device)
        for i, _, frag, start in pieces:
            for row, lo, hi, count in row_spans(start, frag.numel(), self.fan_in[i]):
                part = frag[lo:hi].float().view(count, -1).square().sum(1)
                sums[self.offset[i] + row : self.offset[i] + row + count] += part.to(sums.device)
        if self.mode != "plain" and w.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        scale = row_scale(sums, self.fan_rows)
        for i, p, frag, start in pieces:
            for row, lo, hi, count in row_spans(start, frag.numel(), self.fan_in[i]):
                k = scale[self.offset[i] + row : self.offset[i] + row + count].to(frag.device, frag.dtype)
                frag[lo:hi].view(count, -1).mul_(k[:, None])
            if self.mode == "zero3":
                full = safe_get_local_fp32_param(p).view(-1)
                full[: frag.numel()] = frag
                safe_set_local_fp32_param(p, full)
                p.ds_tensor.data.view(-1)[: frag.numel()].copy_(frag)
        for i, p in enumerate(self.weights):
            # the module's whole copies: every parameter under ZeRO 1/2, and under ZeRO-3 the small ones it
            # keeps gathered between steps (ds_persist), which it refreshed from the partitions before this hook
            whole = self.mode == "hp" or (self.mode == "zero3" and getattr(p, "ds_persist", False))
            if whole and p.data.numel() == math.prod(shape := (self.rows[i], self.fan_in[i])):
                k = scale[self.offset[i] : self.offset[i + 1]].to(p.device, p.dtype)
                p.data.view(shape).mul_(k[:, None])


def row_spans(start: int, n: int, fan_in: int) -> list[tuple[int, int, int, int]]:
    """Elements [start, start + n) of a row-major (rows, fan_in) weight as runs of rows: (first row, piece start,
    piece end, rows in the run), the partial first row, the whole rows, the partial last row."""
    spans, pos = [], 0
    head = min(n, (-start) % fan_in)
    if head:
        spans.append((start // fan_in, 0, head, 1))
        pos = head
    full = (n - pos) // fan_in
    if full:
        spans.append(((start + pos) // fan_in, pos, pos + full * fan_in, full))
        pos += full * fan_in
    if pos < n:
        spans.append(((start + pos) // fan_in, pos, n, 1))
    return spans
