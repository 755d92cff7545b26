"""Reading files that may live in a bucket: globs, sizes and ranged reads, local or by URL.

A training job on a pod reads its shards from `gs://` (or any URL an fsspec file system
serves: `s3://`, ...), and the same code reads a local folder. Local paths take the plain OS
calls (`os.pread` lets threads share a shard without a shared file position); URLs go through
fsspec, the layer etils.epath uses for buckets too, so one optional dependency (the `gcs`
extra: gcsfs) serves the reader, the trainer's epath workdir and Orbax's metadata.

Bucket listings are not atomic and objects have no folders: a glob of a URL matches objects,
and `**` (which the epath GCS backend refuses) is allowed here because fsspec lists a prefix
in one request.
"""

from __future__ import annotations

import glob as local_glob
import os
import re
from typing import IO

from vfusion3d_jax import errors

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
GCS_HINT = "install the bucket support: pip install -e '.[gcs]' (gcsfs)"


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object by URL (gs://bucket/..., s3://...), not a local file."""
    return bool(_URL.match(os.fspath(path)))


def _filesystem(url: str):
    """The fsspec file system serving `url` and the path within it."""
    import fsspec  # only URLs need it

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:  # fsspec names the package (gcsfs, s3fs) that the protocol needs
        raise errors.UsageError(f"cannot read {url}: {error}").with_hint(GCS_HINT) from error


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path` (a URL keeps its scheme; a local path becomes absolute)."""
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def glob(pattern: str | os.PathLike, *, recursive: bool = False) -> list[str]:
    """Sorted paths matching `pattern` (`**` spans folders when `recursive`); URLs keep their scheme."""
    pattern = os.fspath(pattern)
    if not is_url(pattern):
        return sorted(local_glob.glob(pattern, recursive=recursive))
    filesystem, inner = _filesystem(pattern)
    if not recursive:
        inner = inner.replace("**", "*")
    return sorted(filesystem.unstrip_protocol(match) for match in filesystem.glob(inner))


def _ask(path: str | os.PathLike, local, method: str):
    """`local(path)` for a local path, else the fsspec file system's `method` on the URL's path."""
    path = os.fspath(path)
    if not is_url(path):
        return local(path)
    filesystem, inner = _filesystem(path)
    return getattr(filesystem, method)(inner)


def is_dir(path: str | os.PathLike) -> bool:
    return _ask(path, os.path.isdir, "isdir")


def is_file(path: str | os.PathLike) -> bool:
    return _ask(path, os.path.isfile, "isfile")


def size_and_mtime(path: str | os.PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; raises FileNotFoundError when absent."""
    path = os.fspath(path)
    if not is_url(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    filesystem, inner = _filesystem(path)
    info = filesystem.info(inner)
    modified = filesystem.modified(inner) if hasattr(filesystem, "modified") else None
    mtime_ns = int(modified.timestamp() * 1e9) if modified is not None else 0
    return int(info["size"]), mtime_ns


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """`path` opened for reading bytes (a seekable file object; close it, or use `with`)."""
    path = os.fspath(path)
    if not is_url(path):
        return open(path, "rb")
    filesystem, inner = _filesystem(path)
    return filesystem.open(inner, "rb")


def read_at(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """Up to `size` bytes of `path` from byte `offset` (fewer only at the end of the file)."""
    path = os.fspath(path)
    if not is_url(path):
        # os.pread: no shared file position, so threads may read one shard at once.
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    filesystem, inner = _filesystem(path)
    return filesystem.cat_file(inner, start=offset, end=offset + size)
