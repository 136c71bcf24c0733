"""Worker threads under shared cores: cpus_per_worker auto, the worker's thread setup, the workers' wait policy."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ambient_ray.io import ray_runtime
from ambient_ray.train.config import EngineConfig, resolve_cpus_per_worker
from ambient_ray.train.worker import setup_threads, worker_cpus


def test_auto_is_the_default_and_numbers_still_validate():
    assert EngineConfig(out="x").cpus_per_worker == "auto"
    assert EngineConfig(out="x", cpus_per_worker=2).cpus_per_worker == 2.0
    assert EngineConfig(out="x", cpus_per_worker=0.5).cpus_per_worker == 0.5
    for bad in (0, -1, "all"):
        with pytest.raises(ValidationError):
            EngineConfig(out="x", cpus_per_worker=bad)


@pytest.mark.parametrize(
    "workers, nodes, want",
    [
        (1, [2], 1),  # the demo's 2-core machine: one CPU to spare
        (1, [16], 15),
        (2, [16], 7),
        (3, [16, 16], 7),  # 8 would fit only one worker per node
        (2, [2], 1),  # no CPU to spare: at least 1 each
        (1, [1], 1),
        (2, [0, 8], 3),  # a node without CPUs holds none
    ],
)
def test_auto_resolves_to_whole_cpus_that_fit_with_one_to_spare(workers, nodes, want):
    assert resolve_cpus_per_worker("auto", workers, nodes) == want
    assert resolve_cpus_per_worker(2.5, workers, nodes) == 2.5  # a number is kept


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


def test_workers_get_the_drivers_wait_policy_and_none_by_default(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert ray_runtime.worker_env() == {}  # no policy forced: PASSIVE measured no cure (threads_under_load.py)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert ray_runtime.worker_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = ray_runtime.with_worker_env({"env_vars": {"A": "1"}, "pip": ["x"]})
    assert env == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "A": "1"}, "pip": ["x"]}
    assert ray_runtime.with_worker_env({"env_vars": {"OMP_WAIT_POLICY": "ACTIVE"}})["env_vars"] == {
        "OMP_WAIT_POLICY": "ACTIVE"
    }
