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
