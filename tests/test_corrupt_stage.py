"""The corrupt stage end to end on a real Ray cluster, local folders and real S3 (SeaweedFS)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from ambient_ray import config as cfgmod
from ambient_ray import corruptions
from ambient_ray.data.images import decode_png
from ambient_ray.data.sources import SourceConfig, _builtin_arrays
from ambient_ray.io import storage
from ambient_ray.stages.corrupt import CorruptConfig, run

from .test_datasets import png, rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(out, sub="data"):
    rows = []
    for f in storage.list_files(storage.join(out, sub), (".parquet",)):
        fs, path = storage.filesystem(f)
        rows.extend(pq.read_table(path, filesystem=fs).to_pylist())
    return rows


def make_cfg(out, **kw):
    base = dict(
        out=out,
        corruptions=["blur:sigma=1.0", "jpeg:quality=10"],
        clean_fraction=0.1,
        seed=0,
        shard_size=400,
        preview=4,
    )
    base.update(kw)
    return CorruptConfig(**base)


def test_digits_local_and_s3_give_the_same_rows(ray_cluster, tmp_path, s3_prefix):
    local = run(make_cfg(str(tmp_path / "out")), progress=False)
    remote = run(make_cfg(f"{s3_prefix}/corrupt"), progress=False)
    for res in (local, remote):
        assert (res.rows_in, res.rows_out, res.rows_quarantined, res.shards_total) == (1797, 1797, 0, 5)
    rows = read_rows(local.out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 1797
    q = Counter((r["quality"], r["corruption"]) for r in rows)
    assert q[("clean", "")] == round(0.1 * 1797)
    assert sorted([q[("corrupted", "blur:sigma=1")], q[("corrupted", "jpeg:quality=10")]]) == [808, 809]
    # S3 holds exactly the same rows and bytes
    s3rows = {r["id"]: r for r in read_rows(remote.out)}
    assert all(s3rows[r["id"]]["image"] == r["image"] for r in rows)
    # and Ray Data reads the output back
    fs, path = storage.filesystem(storage.join(remote.out, "data"))
    assert ray.data.read_parquet(path, filesystem=fs).count() == 1797
    # each corrupted image is the corruption of its original with its row seed
    digits, labels = _builtin_arrays("digits", 1, 4)
    for r in rows[:50]:
        orig = digits[int(r["id"].split("-")[1])]
        assert r["label"] == labels[int(r["id"].split("-")[1])]
        if r["quality"] == "clean":
            assert (decode_png(r["image"]) == orig).all()
        else:
            expect = corruptions.apply(corruptions.parse(r["corruption"]), [orig], [r["seed"]])[0]
            assert (decode_png(r["image"]) == expect).all()
    # resolved config, summary and preview beside the outputs
    assert cfgmod.build(CorruptConfig, storage.join(remote.out, "config.yaml")).out == remote.out
    assert json.loads(storage.read_bytes(storage.join(remote.out, "summary.json")))["rows_out"] == 1797
    assert storage.read_bytes(storage.join(local.out, "preview.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run finds everything done and changes nothing
    again = run(make_cfg(str(tmp_path / "out")), progress=False)
    assert again.shards_run == 0 and again.shards_skipped == 5 and len(read_rows(local.out)) == 1797


def test_seed_changes_the_clean_subset(ray_cluster, tmp_path):
    a = run(make_cfg(str(tmp_path / "a"), source=SourceConfig(dataset="faces"), seed=1), progress=False)
    b = run(make_cfg(str(tmp_path / "b"), source=SourceConfig(dataset="faces"), seed=2), progress=False)

    def clean(out):
        return {r["id"] for r in read_rows(out) if r["quality"] == "clean"}

    assert len(clean(a.out)) == len(clean(b.out)) == 20 and clean(a.out) != clean(b.out)


def test_planted_bad_images_are_quarantined_and_counted(ray_cluster, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(30):
        (src / f"good{i:02d}.png").write_bytes(png(rgb(i)))
    rgba = np.dstack([rgb(99), np.full((12, 12, 1), 255, np.uint8)])
    bad = {
        "broken.png": b"\x89PNG this is not a png",
        "empty.png": b"",
        "rgba.png": png(rgba),
        "la.png": png(np.zeros((5, 5, 2), np.uint8)),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    res = run(make_cfg(str(tmp_path / "out"), source=SourceConfig(dataset=str(src)), shard_size=7), progress=False)
    assert res.rows_in == 34 and res.rows_out == 30 and res.rows_quarantined == 4
    assert res.rows_in == res.rows_out + res.rows_quarantined
    qrows = {r["id"]: r for r in read_rows(res.out, "quarantine")}
    assert set(qrows) == set(bad)
    assert "undecodable" in qrows["broken.png"]["reason"] and "empty image bytes" in qrows["empty.png"]["reason"]
    assert "RGBA" in qrows["rgba.png"]["reason"] and "LA" in qrows["la.png"]["reason"]
    assert all(qrows[n]["image"] == bad[n] for n in bad)  # nothing lost: the raw bytes are kept
    assert {r["id"] for r in read_rows(res.out)} == {f"good{i:02d}.png" for i in range(30)}


def test_duplicate_ids_are_quarantined(ray_cluster, tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "a", "c"], "image": [png(rgb(i)) for i in range(4)]}), src / "p.parquet")
    res = run(make_cfg(str(tmp_path / "out"), source=SourceConfig(dataset=str(src))), progress=False)
    assert (res.rows_in, res.rows_out, res.rows_quarantined) == (4, 3, 1)
    assert "duplicate id 'a'" in read_rows(res.out, "quarantine")[0]["reason"]


def test_changed_plan_is_refused_unless_overwrite(ray_cluster, tmp_path):
    out = str(tmp_path / "out")
    run(make_cfg(out, source=SourceConfig(dataset="faces")), progress=False)
    with pytest.raises(cfgmod.ConfigError, match="different plan"):
        run(make_cfg(out, source=SourceConfig(dataset="faces"), seed=5), progress=False)
    res = run(make_cfg(out, source=SourceConfig(dataset="faces"), seed=5, overwrite=True), progress=False)
    assert res.rows_out == 200 and len(read_rows(out)) == 200


def cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "jobs.corrupt", "--no-progress", *args],
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_unknown_spec_and_dead_s3_endpoint_fail_before_work(ray_cluster, tmp_path):
    out = tmp_path / "never"
    r = cli("--dataset", "digits", "--corruption", "smudge:x=1", "--out", str(out))
    assert r.returncode == 2 and "unknown corruption 'smudge'" in r.stderr and "blur" in r.stderr
    assert not out.exists()
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    r = cli("--dataset", "digits", "--out", "s3://ambient-test/x", env=env)
    assert r.returncode == 2 and "cannot reach S3 endpoint http://127.0.0.1:9" in r.stderr


def test_resume_after_kill_gives_each_id_once(ray_cluster, tmp_path):
    out = tmp_path / "out"
    args = [
        "--dataset",
        "digits",
        "--corruption",
        "slow:seconds=1.5",
        "--plugin",
        "tests.slow_corruption",
        "--shard-size",
        "100",
        "--clean-fraction",
        "0.1",
        "--out",
        str(out),
    ]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.corrupt", "--no-progress", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    done = out / "_done"
    deadline = time.time() + 240
    while time.time() < deadline and not (done.exists() and len(list(done.iterdir())) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(done.iterdir()))
    assert 2 <= finished < 18, f"the kill came too late to test resuming ({finished} shards done)"
    # a half-written shard from the killed run (no marker) must be replaced, not kept
    unfinished = next(k for k in range(18) if not (done / f"shard-{k:05d}.json").exists())
    pq.write_table(
        pa.table({"id": ["digits-000000"], "image": [b"partial"]}), out / "data" / f"shard-{unfinished:05d}.parquet"
    )
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] >= finished and summary["shards_run"] == 18 - summary["shards_skipped"]
    ids = [row["id"] for row in read_rows(str(out))]
    assert Counter(ids) == Counter(f"digits-{i:06d}" for i in range(1797))
    corrupted = [row for row in read_rows(str(out)) if row["quality"] == "corrupted"]
    assert corrupted and all(row["corruption"] == "slow:seconds=1.5" for row in corrupted)


def test_a_failing_run_reports_what_it_kept(ray_cluster, tmp_path):
    out = tmp_path / "out"
    r = cli(
        "--dataset",
        "faces",
        "--corruption",
        "crash",
        "--plugin",
        "tests.slow_corruption",
        "--out",
        str(out),
        "--set",
        "task_retries=1",
        env=dict(os.environ, RAY_ADDRESS=ray_cluster),
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "corrupt stage failed with 0 of 1 shards complete" in r.stderr
    assert "re-run the same command to resume" in r.stderr
