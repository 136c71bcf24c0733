"""Worker threads under shared cores: cpus_per_worker auto and the worker's thread setup."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ambient_ray.train.config import EngineConfig, resolve_cpus_per_worker, workers_that_fit
from ambient_ray.train.worker import setup_threads, worker_cpus


def test_auto_is_the_default_and_numbers_still_validate():
    assert EngineConfig(out="x").cpus_per_worker == "auto"
    assert EngineConfig(out="x", cpus_per_worker=2).cpus_per_worker == 2.0
    assert EngineConfig(out="x", cpus_per_worker=0.5).cpus_per_worker == 0.5
    for bad in (0, -1, "all"):
        with pytest.raises(ValidationError):
            EngineConfig(out="x", cpus_per_worker=bad)


@pytest.mark.parametrize(
    "workers, nodes, gpu, want",
    [
        (1, [(2, 0)], False, 1),  # the demo's 2-core machine: one CPU to spare
        (1, [(16, 0)], False, 15),
        (2, [(16, 0)], False, 7),
        (3, [(16, 0), (16, 0)], False, 7),  # 8 would fit only one worker per node
        (2, [(2, 0)], False, 1),  # no CPU to spare: at least 1 each
        (1, [(1, 0)], False, 1),
        (2, [(0, 0), (8, 0)], False, 3),  # a node without CPUs holds none
        (1, [(32, 1)], True, 31),  # one GPU box: its worker may take every CPU but one
        (4, [(64, 0), (44, 4)], True, 10),  # GPU workers only on the GPU node, one a GPU: 4 x 10 of its 43
        (4, [(44, 4), (44, 4)], True, 21),  # two GPU nodes: two workers each
        (2, [(64, 0)], True, 1),  # no GPU node yet (autoscaling): 1, and the driver says they do not fit
    ],
)
def test_auto_resolves_to_whole_cpus_that_fit_with_one_to_spare(workers, nodes, gpu, want):
    assert resolve_cpus_per_worker("auto", workers, nodes, gpu) == want
    assert resolve_cpus_per_worker(2.5, workers, nodes, gpu) == 2.5  # a number is kept
    if want > 1:  # the most whole CPUs with which every worker fits
        assert workers_that_fit(want, nodes, gpu) >= workers > workers_that_fit(want + 1, nodes, gpu)
    assert workers_that_fit(1, [(64, 0)], use_gpu=True) == 0  # GPU workers never counted on a CPU-only node


def test_worker_threads_follow_its_cpus():
    before = torch.get_num_threads()
    try:
        assert setup_threads(2) == 2 and torch.get_num_threads() == 2
        assert setup_threads(1.5) == 1 and torch.get_num_threads() == 1
        assert setup_threads(0.5) == 1 and torch.get_num_threads() == 1
        # outside a Ray worker: the driver's resolved value, else the config's number, 1 for auto
        auto, two = EngineConfig(out="x"), EngineConfig(out="x", cpus_per_worker=2)
        assert worker_cpus(auto, {"cpus_per_worker": 3.0}) == 3.0
        assert worker_cpus(two, {}) == 2.0
        assert worker_cpus(auto, {}) == 1.0
    finally:
        torch.set_num_threads(before)
