"""The storage layer against local folders and a real SeaweedFS S3 server."""

import pytest

from ambient_ray.io import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_prefix")


def test_round_trip_list_delete(root):
    storage.write_bytes(storage.join(root, "a/x.bin"), b"123")
    storage.write_bytes(storage.join(root, "a/b/y.parquet"), b"456")
    storage.write_bytes(storage.join(root, "_hidden/z.json"), b"{}")
    assert storage.read_bytes(storage.join(root, "a/x.bin")) == b"123"
    assert storage.exists(storage.join(root, "a/b/y.parquet"))
    assert not storage.exists(storage.join(root, "a/nope"))
    files = storage.list_files(root)
    assert files == [storage.join(storage.normalize(root), p) for p in ("a/b/y.parquet", "a/x.bin")]
    assert storage.list_files(root, (".parquet",)) == [storage.join(storage.normalize(root), "a/b/y.parquet")]
    storage.write_bytes(storage.join(root, "a/x.bin"), b"overwritten")
    assert storage.read_bytes(storage.join(root, "a/x.bin")) == b"overwritten"
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a/x.bin"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(storage.join(root, "a/x.bin"))


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/dir") == str(tmp_path / "rel" / "dir")
    assert storage.normalize("file:///abs/x") == "/abs/x"
    with pytest.raises(storage.StorageError, match="unsupported storage URI"):
        storage.normalize("gs://bucket/x")


def test_missing_bucket_and_bad_credentials_and_dead_endpoint(s3, monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket'.*does not exist"):
        storage.check_reachable("s3://no-such-bucket/x")
    storage.check_reachable("s3://ambient-test/x")  # the fixture's bucket is fine
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError, match="denied"):
        storage.check_reachable("s3://ambient-test/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
        storage.check_reachable("s3://ambient-test/x")
    with pytest.raises(storage.StorageError, match="127.0.0.1:9"):
        storage.read_bytes("s3://ambient-test/x")


def test_a_copy_streams_between_local_and_s3_either_way(root, tmp_path):
    """``storage.copy`` (the weight export): local to ``root`` and back, byte for byte, folders made as needed."""
    data = bytes(range(256)) * 5000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    storage.copy(str(src), storage.join(root, "deep/er/x.bin"))
    assert storage.read_bytes(storage.join(root, "deep/er/x.bin")) == data
    storage.copy(storage.join(root, "deep/er/x.bin"), str(tmp_path / "back" / "x.bin"))
    assert (tmp_path / "back" / "x.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["x.bin"]  # no temporary file left


def test_a_safetensors_file_written_a_tensor_at_a_time_reads_back_with_the_library(tmp_path):
    """The streamed writer (checkpoints' raw weights and EMA under ZeRO-3): every dtype the engine writes, an empty
    tensor, metadata; ``safetensors`` reads it back exactly. A tensor out of the announced order (or shape) is
    refused, and a file left unfinished is removed, not left half-written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ambient_ray.io.safetensors_stream import StreamWriter

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 3, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "steps": torch.arange(3, dtype=torch.int64),
        "z": torch.randn(2, 2, 2, generator=g).double(),
    }
    path = str(tmp_path / "w.safetensors")
    with StreamWriter(path, [(k, t.dtype, t.shape) for k, t in tensors.items()], {"ema": "warmup"}) as out:
        for k, t in tensors.items():
            out.write(k, t)
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"ema": "warmup"}
    bad = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="expected"):
        with StreamWriter(bad, [(k, t.dtype, t.shape) for k, t in tensors.items()]) as out:
            out.write("b", tensors["b"])
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="never written"):
        with StreamWriter(bad, [(k, t.dtype, t.shape) for k, t in tensors.items()]) as out:
            out.write("a.weight", tensors["a.weight"])
    assert not (tmp_path / "bad.safetensors").exists()
