"""A lost node: a two-node Ray cluster on this machine (a head and a second ``ray start --address`` node, one CPU
each, so that of two training workers one runs on each node), the second node killed mid-run (every process of
it, SIGKILL: a machine gone), and the run finishes from its last checkpoint.

* Elastic (``min_workers=1``, ``num_workers=2``: Ray Train's ``ScalingConfig(num_workers=(1, 2))``, ZeRO-0): the
  controller restarts the worker group on the one worker that still fits, from the last checkpoint.
* Fixed (``num_workers=2``, ZeRO-2, the default): the controller waits, retrying the worker group's start,
  until a replacement node joins, then finishes on two workers again.

The elastic restart takes about half a minute here: Ray Train's elastic policy counts the workers that fit from
Ray Data's AutoscalingCoordinator, whose view of the nodes is refreshed every 20 s; until then it tries two
workers again, and each try times out (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 5 s here, 60 s by default).

The cluster is this module's own (its tests are marked ``own_ray_cluster``: conftest runs them before the
session's in-process cluster starts). Every process it starts carries a marker in its environment (Ray's
workers inherit their raylet's): that is how a node is killed whole, and how the last test checks that nothing
is left behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from ambient_ray.io import services

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
MARK = "AMBIENT_LOST_NODE_TEST"  # in the environment of every process this module starts: "<tag>-<role>"
STEPS, CKPT_EVERY, LOG_EVERY = 80, 10, 10

# The driver, run as its own process (a Ray client of the module's cluster: RAY_ADDRESS): the digits data through
# the corrupt stage once, then one training run. argv: data folder, output folder, JSON of TrainConfig overrides.
# 300 rows: the dataset the driver materializes is one block of ~50 kB, under Ray's 100 kB inline limit, so it is
# held by the driver (on the head) and not in the object store of a node that is about to be lost (whose read
# task would have to run again, on a CPU that the one worker left holds).
DRIVER = """
import json, os, sys
from ambient_ray.data.sources import SourceConfig
from ambient_ray.io import ray_runtime
from ambient_ray.stages.corrupt import CorruptConfig, run as corrupt_run
from ambient_ray.stages.train import TrainConfig, run

data, out, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray_runtime.ray_init(out)
if not os.path.exists(os.path.join(data, "data")):
    corrupt_run(CorruptConfig(out=data, source=SourceConfig(dataset="digits", limit=300),
                              corruptions=["blur:sigma=1.0"], clean_fraction=0.3, preview=0), progress=False)
cfg = dict(data=data, out=out, steps=%(steps)d, batch_size=32, num_workers=2, cpus_per_worker=1, log_every=%(log)d,
           checkpoint_every=%(ckpt)d, keep_checkpoints=100, max_failures=2, sample_grid=0,
           model=dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2]),
           optim=dict(lr=2e-3, warmup_steps=2), ambient=dict(corrupted_sigma_min=1.0), mlflow=dict(enabled=False))
summary = run(TrainConfig(**{**cfg, **over}))
print("DRIVER-DONE", json.dumps(summary["metrics"], default=str), flush=True)
""" % {"steps": STEPS, "log": LOG_EVERY, "ckpt": CKPT_EVERY}


# ------------------------------------------------------------------------------ processes


def marked(prefix: str) -> list:
    """Live processes whose MARK starts with ``prefix`` (zombies are gone, just not reaped)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(MARK, "").startswith(prefix):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def kill_marked(prefix: str, sig=signal.SIGKILL, wait: float = 15.0) -> None:
    """Send ``sig`` to every process marked ``prefix``, at once, and wait until they are gone."""
    import psutil

    procs = marked(prefix)
    for p in procs:
        try:
            p.send_signal(sig)
        except (psutil.Error, ProcessLookupError):
            pass
    psutil.wait_procs(procs, timeout=wait)


def tail(path: str, n: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}:\n" + "".join(f.readlines()[-n:])
    except OSError:
        return f"--- {path}: (none)"


class Cluster:
    """A Ray head (1 CPU) and worker nodes (1 CPU each) on 127.0.0.1, each a ``ray start --block`` process in a
    session of its own, every process marked ``<tag>-<node name>``."""

    def __init__(self, root: str):
        self.tag = f"ln{uuid.uuid4().hex[:8]}"
        self.root = root
        self.temp = f"/tmp/{self.tag}"  # Ray's session folders: Unix socket paths must stay short
        self.port = services.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}

    def start(self, name: str) -> None:
        head = not self.nodes
        log = self.logs[name] = os.path.join(self.root, f"ray-{name}.log")
        free = {k: services.free_port() for k in ("agent", "agent-grpc", "runtime-env", "metrics", "client")}
        cmd = [
            RAY,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--object-store-memory={200 * 2**20}",
            f"--temp-dir={self.temp}-{name}",
            f"--dashboard-agent-listen-port={free['agent']}",
            f"--dashboard-agent-grpc-port={free['agent-grpc']}",
            f"--runtime-env-agent-port={free['runtime-env']}",
            f"--metrics-export-port={free['metrics']}",
            "--disable-usage-stats",
        ]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false"]
            cmd += [f"--ray-client-server-port={free['client']}"]
        else:
            cmd += [f"--address={self.address}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env[MARK] = f"{self.tag}-{name}"
        env["RAY_AUTH_MODE"] = (
            "disabled"  # `ray start` turns token authentication on by default; a test cluster on 127.0.0.1
        )
        # the GCS marks a node dead after 3 missed health checks 1 s apart (default 5 x 3 s)
        env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        # a node's start waits for its raylet to register (default 10 s); on a loaded 2-core machine a replacement
        # node once took longer and `ray start` gave up ("The current node timed out during startup")
        env["RAY_raylet_start_wait_time_s"] = "60"
        self.nodes[name] = subprocess.Popen(
            cmd,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        self.wait_nodes(len(self.alive_names()))

    def alive_names(self) -> list[str]:
        return [n for n, p in self.nodes.items() if p.poll() is None]

    def alive_nodes(self) -> int:
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=5)
        return sum(1 for i in infos.values() if i.state == 0)  # GcsNodeInfo.ALIVE

    def wait_nodes(self, n: int, timeout: float = 60) -> None:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                if (last := self.alive_nodes()) == n:
                    return
            except Exception as e:  # the GCS is not up yet
                last = e
            time.sleep(0.5)
        raise TimeoutError(
            f"cluster: {n} alive nodes expected, got {last}\n" + "\n".join(map(tail, self.logs.values()))
        )

    def kill(self, name: str) -> None:
        """The node's every process (raylet, agents, its Ray workers) SIGKILLed at once: a lost machine."""
        kill_marked(f"{self.tag}-{name}")
        self.nodes[name].wait(10)

    def processes(self, name: str) -> list[str]:
        """The command lines of the node's live processes (Ray sets a worker's to ``ray::<actor class>...``)."""
        import psutil

        out = []
        for p in marked(f"{self.tag}-{name}"):
            try:
                out.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        return out

    def stop(self) -> None:
        """Stop every node (SIGTERM: ``ray start --block`` stops what it started), then SIGKILL what remains."""
        for p in self.nodes.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 3
        while time.time() < deadline and marked(self.tag):
            time.sleep(0.3)
        kill_marked(self.tag)
        for p in self.nodes.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for d in glob.glob(f"{self.temp}-*"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("lost-node")))
    try:
        c.start("head")
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------ a run


class Run:
    """One driver process training on the cluster, its output in ``out``, its console in ``log``."""

    def __init__(self, cluster: Cluster, name: str, **over):
        self.cluster, self.name = cluster, name
        self.data = os.path.join(cluster.root, "digits")
        self.out = os.path.join(cluster.root, name)
        self.log = os.path.join(cluster.root, f"driver-{name}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env.update(
            {
                MARK: f"{cluster.tag}-driver",
                "RAY_ADDRESS": cluster.address,
                "RAY_AUTH_MODE": "disabled",
                # propagated to Ray Train's controller: a worker group that cannot be placed (resources counted
                # from a node that has just died) gives up after 5 s and is rescheduled, instead of after 60 s
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, self.data, self.out, json.dumps(over)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def logs(self) -> str:
        """What to read when the run went wrong: the driver's console, Ray's log of the run, the nodes' logs."""
        parts = [tail(self.log, 80), tail(os.path.join(self.out, "ray.log"), 120)]
        return "\n".join(parts + [tail(p, 20) for p in self.cluster.logs.values()])

    def checkpoints(self) -> list[dict]:
        """The checkpoints Ray Train registered (every rank reported), in report order: step, ranks saved, folder."""
        root = os.path.join(self.out, "ray", "train")
        try:
            with open(os.path.join(root, "checkpoint_manager_snapshot.json")) as f:
                results = json.load(f)["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # none yet, or being rewritten
            return []
        found = []
        for r in results:
            d = os.path.join(root, r["checkpoint_dir_name"])
            found.append({"step": r["metrics"]["step"], "ranks": len(glob.glob(os.path.join(d, "rank-*"))), "dir": d})
        return found

    def wait_checkpoint(self, timeout: float = 150) -> dict:
        """The first checkpoint."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the driver exited ({self.proc.returncode}) before a checkpoint\n" + (
                self.logs()
            )
            if ckpts := self.checkpoints():
                return ckpts[0]
            time.sleep(0.2)
        pytest.fail(f"no checkpoint within {timeout:.0f}s\n" + self.logs())

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Until ``pattern`` appears in the run's Ray log (the controller's lines)."""
        deadline, path = time.time() + timeout, os.path.join(self.out, "ray.log")
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the driver exited ({self.proc.returncode})\n" + self.logs()
            if os.path.exists(path) and re.search(pattern, open(path, errors="replace").read()):
                return
            time.sleep(0.3)
        pytest.fail(f"{pattern!r} not in the run's Ray log within {timeout:.0f}s\n" + self.logs())

    def finish(self, timeout: float = 180) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish within {timeout:.0f}s of the node loss\n" + self.logs())
        assert self.proc.returncode == 0, f"the driver failed ({self.proc.returncode})\n" + self.logs()
        print(f"{self.name}: {time.time() - self.t0:.0f}s driver")
        with open(os.path.join(self.out, "summary.json")) as f:
            return json.load(f)

    def ray_log(self) -> str:
        with open(os.path.join(self.out, "ray.log"), errors="replace") as f:
            return f.read()


def lose_node(cluster: Cluster, run: Run, node: str) -> dict:
    """Once the run's first checkpoint is in (saved by both workers, one of them on ``node``), kill ``node``;
    returns the newest checkpoint registered before the kill."""
    first = run.wait_checkpoint()
    assert first["ranks"] == 2, first
    workers = [c for c in cluster.processes(node) if "RayTrainWorker" in c]
    assert workers, (f"no training worker on {node}", cluster.processes(node))
    cluster.kill(node)
    before = run.checkpoints()[-1]
    print(f"{run.name}: {node} killed after checkpoint {before['step']} ({time.time() - run.t0:.0f}s)")
    assert before["step"] < STEPS, f"the run was at step {before['step']} when {node} was lost: raise STEPS"
    cluster.wait_nodes(len(cluster.alive_names()), timeout=30)  # the GCS has marked it dead
    return before


def check_finished(run: Run, summary: dict, before: dict) -> list[dict]:
    """The run finished (every step, a finite loss, a model that loads and denoises to finite values) after a
    worker-group failure, and went on from its last checkpoint: the registered checkpoints are every
    CKPT_EVERY-th step once, in order (a restart from step 0 would register its first steps again)."""
    import numpy as np
    import torch

    from ambient_ray.models.weights import load

    m = summary["metrics"]
    assert m["step"] == STEPS and np.isfinite(m["loss"]), m
    ckpts = run.checkpoints()
    assert [c["step"] for c in ckpts] == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)), ckpts
    assert summary["checkpoint"] == ckpts[-1]["dir"], (summary["checkpoint"], ckpts[-1])
    log = run.ray_log()
    # Ray Train's controller: the lost node is a worker-group failure, charged to max_failures=2 and retried (a
    # restart placed on the node before the GCS marks it dead could be a second); each start of a worker group
    # that did not fit is a controller failure, retried without limit
    failures, starts = log.count("Source: worker group"), log.count("Source: controller")
    print(f"{run.name}: {failures} worker-group failure(s), {starts} worker-group start(s) timed out")
    assert failures >= 1 and "Error count: 1 (max allowed: 2)" in log, run.logs()
    assert "[FailurePolicy] RETRY" in log and "[FailurePolicy] RAISE" not in log, run.logs()
    net = load(os.path.join(run.out, "model"), "denoiser")
    with torch.no_grad():
        y = net(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0]))
    assert torch.isfinite(y).all()
    return ckpts


# ------------------------------------------------------------------------------ tests


def test_min_workers_is_ray_trains_elastic_range_and_needs_zero_stage_0():
    from ambient_ray.config import ConfigError
    from ambient_ray.train.config import EngineConfig, check_run
    from ambient_ray.train.driver import elastic_workers

    def cfg(**kw):
        return EngineConfig(data="d", out="o", num_workers=2, **kw)

    assert elastic_workers(cfg()) == 2 and elastic_workers(cfg(min_workers=2)) == 2
    assert elastic_workers(cfg(min_workers=1, zero_stage=0)) == (1, 2)
    assert check_run(cfg(min_workers=1, zero_stage=0), None, (8, 1)) == (8, 1)
    with pytest.raises(ConfigError, match="min_workers.*zero_stage 0"):
        check_run(cfg(min_workers=1, zero_stage=2), None, (8, 1))
    with pytest.raises(ConfigError, match="min_workers.*more than num_workers"):
        check_run(cfg(min_workers=3, zero_stage=0), None, (8, 1))


@pytest.mark.own_ray_cluster
def test_elastic_run_finishes_on_the_workers_left(cluster):
    """min_workers=1 of 2 (ZeRO-0): after node2 is lost the run restarts from its last checkpoint on the one
    worker the head holds, and finishes there; no replacement node."""
    cluster.start("elastic-node2")
    run = Run(cluster, "elastic", min_workers=1, zero_stage=0)
    try:
        before = lose_node(cluster, run, "elastic-node2")
        summary = run.finish()
    finally:
        kill_marked(f"{cluster.tag}-driver")
    ckpts = check_finished(run, summary, before)
    # checkpoints by two workers up to the loss, by one after it: the run went on with the worker left
    ranks = [c["ranks"] for c in ckpts]
    k = ranks.index(1) if 1 in ranks else len(ranks)
    assert 0 < k < len(ranks) and ranks == [2] * k + [1] * (len(ranks) - k), ckpts
    assert ckpts[k]["step"] > before["step"], (before, ckpts)
    assert "Detected ready resources for 1 workers in the cluster. Deciding to start/restart" in run.ray_log()


@pytest.mark.own_ray_cluster
def test_fixed_run_waits_for_a_replacement_node(cluster):
    """num_workers=2 (fixed), ZeRO-2: after node2 is lost the controller keeps trying to place two workers (each
    try times out); a replacement node joins, and the run finishes on two workers from its last checkpoint."""
    cluster.start("fixed-node2")
    run = Run(cluster, "fixed")
    try:
        before = lose_node(cluster, run, "fixed-node2")
        run.wait_for(r"The worker group startup timed out", 60)  # waiting: two workers do not fit on one CPU
        assert run.checkpoints()[-1]["step"] == before["step"]  # and nothing trained meanwhile
        cluster.start("fixed-node3")
        summary = run.finish()
    finally:
        kill_marked(f"{cluster.tag}-driver")
    ckpts = check_finished(run, summary, before)
    assert all(c["ranks"] == 2 for c in ckpts), ckpts  # two workers before and after: head + the replacement


@pytest.mark.own_ray_cluster
def test_no_process_left_behind(cluster):
    cluster.stop()
    assert not marked(cluster.tag), [(p.pid, p.name()) for p in marked(cluster.tag)]
    assert not glob.glob(f"{cluster.temp}-*")
