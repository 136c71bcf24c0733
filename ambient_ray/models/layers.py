"""Layer helpers the networks share."""

from __future__ import annotations

import torch
from torch import nn


def zeroed(module: nn.Module) -> nn.Module:
    """``module`` (a layer built by the caller) with its own parameters set to zero, returned.

    Done through ``module.apply``: a partitioned build (DeepSpeed's ``zero.Init`` under ZeRO-3, which cuts each
    layer's parameters into partitions as soon as the layer is built) wraps ``apply`` to gather the parameters
    first and cut the result back; an ``nn.init.zeros_`` on the partitioned parameter itself would be lost, and the
    network would start from the layer's default initialisation instead."""
    module.apply(_zero_own)
    return module


@torch.no_grad()
def _zero_own(m: nn.Module) -> None:
    for p in m.parameters(recurse=False):
        p.zero_()
