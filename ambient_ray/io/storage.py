"""One small layer over storage URIs: local paths (or ``file://``) and ``s3://bucket/prefix``.

Reads and writes go through pyarrow's filesystems; bucket checks go through boto3. The S3 endpoint
comes from the standard ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), credentials from the
standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` variables (or an
instance profile when none is set), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Writes are atomic per object: a local file is written to a temporary name and renamed; an S3 object
only appears when its upload completes. Stages rely on this to resume without duplicating rows.
"""

from __future__ import annotations

import os
import shutil
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(OSError):
    """Storage that cannot be reached or used; the message names the URI and the endpoint."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Local paths become absolute (workers may run elsewhere); ``file://`` is stripped."""
    if is_s3(uri):
        return uri.rstrip("/") if uri.count("/") > 3 else uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@lru_cache(maxsize=8)
def _s3fs(endpoint_url: str | None, region_name: str, key_id: str | None) -> pafs.S3FileSystem:
    kwargs: dict = dict(
        region=region_name,
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    return _s3fs(endpoint(), region(), os.environ.get("AWS_ACCESS_KEY_ID"))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to use with it."""
    uri = normalize(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :]
    return pafs.LocalFileSystem(), uri


def s3_client():
    """A boto3 S3 client for the configured endpoint, with short time-outs."""
    import boto3
    from botocore.config import Config

    # a fresh session: the default one caches credentials, and tests and jobs may change them
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint(),
        region_name=region(),
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}, s3={"addressing_style": "path"}),
    )


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def check_reachable(uri: str) -> None:
    """Raise :class:`StorageError` with a clear message if ``uri``'s S3 bucket cannot be used."""
    if not is_s3(uri):
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(uri)
    where = endpoint() or "the default AWS endpoint"
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"S3 bucket '{bucket}' (for {uri}) does not exist at {where}; create it first") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"access to S3 bucket '{bucket}' (for {uri}) at {where} was denied ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from None
        raise StorageError(f"S3 error for {uri} at {where}: {e}") from None
    except BotoCoreError as e:
        raise StorageError(f"cannot reach S3 endpoint {where} for {uri}: {e}; check AWS_ENDPOINT_URL") from None


def ensure_bucket(bucket: str) -> None:
    """Create ``bucket`` if it does not exist (for local clusters and tests)."""
    from botocore.exceptions import ClientError

    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def _wrap(uri: str, e: Exception) -> Exception:
    if isinstance(e, FileNotFoundError):
        return e
    if is_s3(uri):
        return StorageError(f"S3 error for {uri} (endpoint {endpoint() or 'AWS default'}): {e}")
    return e


def _read_error(uri: str, e: OSError) -> Exception:
    """What to raise when reading ``uri`` failed with ``e``: a missing object is a ``FileNotFoundError``."""
    if isinstance(e, FileNotFoundError) or any(s in str(e) for s in ("not exist", "NoSuchKey")):
        return FileNotFoundError(f"no such file: {uri}")
    return _wrap(uri, e)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise _read_error(uri, e) from None


def download(uri: str, path: str) -> None:
    """Copy the file ``uri`` to the local file ``path``, streamed (it may be larger than memory) and atomically:
    it is written to ``path + ".tmp"`` and renamed into place, so ``path`` is either absent or whole."""
    fs, src = filesystem(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with fs.open_input_stream(src) as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, 16 << 20)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _read_error(uri, e) from None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (readers see the old object or the whole new one)."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise _wrap(uri, e) from None


def copy(src: str, dst: str) -> None:
    """Copy the file ``src`` to ``dst`` (local or S3 either way), streamed (it may be larger than memory); a local
    ``dst`` atomically (:func:`download`)."""
    if not is_s3(dst):
        download(src, dst)
        return
    fs_in, path_in = filesystem(src)
    fs_out, path_out = filesystem(dst)
    try:
        with fs_in.open_input_stream(path_in) as f, fs_out.open_output_stream(path_out) as out:
            shutil.copyfileobj(f, out, 16 << 20)
    except OSError as e:
        raise _wrap(dst, e) from None


def write_parquet(uri: str, table) -> None:
    """A pyarrow table as one zstd Parquet file at ``uri``, atomically (:func:`write_bytes`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _wrap(uri, e) from None


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as e:
        raise _wrap(uri, e) from None


def walk(uri: str, recursive: bool = True) -> list[tuple[str, int]]:
    """``(path relative to uri, size)`` of every file under the folder ``uri``, sorted; hidden names (a part
    that starts with ``.`` or ``_``) and temporary files (``.tmp-``) are skipped, a missing folder has none."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise _wrap(uri, e) from None
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")) or ".tmp-" in rel:
            continue
        out.append((rel, info.size or 0))
    return sorted(out)


def file_size(uri: str) -> int | None:
    """The size of the file ``uri``; None when ``uri`` is a folder or nothing."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise _wrap(uri, e) from None
    return (info.size or 0) if info.type == pafs.FileType.File else None


def list_files(uri: str, suffixes: tuple[str, ...] = (), recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under ``uri`` (hidden names and temporary files skipped: :func:`walk`)."""
    base = normalize(uri)
    return [join(base, rel) for rel, _ in walk(uri, recursive) if not suffixes or rel.lower().endswith(suffixes)]


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _wrap(uri, e) from None
