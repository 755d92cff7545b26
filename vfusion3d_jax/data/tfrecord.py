"""TFRecord files without TensorFlow: framing, CRC32C checks, and an offset index for random access.

A TFRecord file is a sequence of records, each framed as

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32). Files written here are
byte-identical to TensorFlow's `tf.io.TFRecordWriter` output (uncompressed) and read by it.

Beside each shard `TFRecordWriter` writes an index, `index_path(shard)`: a `.npy` array of
uint64 (offset, length) rows, one per record, where `offset` is the byte position of the
record's frame and `length` its data length. Grain's random access (global shuffle, exact
resume) reads it. Shards from other tools have no index; `read_index` builds one by scanning
the frame headers (no data is read) and keeps it: beside the shard when the folder is local
and writable, otherwise in the cache directory (`data.storage`), so a reader never writes
into a data folder it may not own; in memory when neither can be written.

The readers take local paths and URLs alike (`gs://...`, through `data.remote`: a bucket is
never written to, so a shard there without an index has it built into the cache); the writer
writes local files.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Iterator

import google_crc32c
import numpy as np
from absl import logging

from vfusion3d_jax import errors
from vfusion3d_jax.data import remote, storage

_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length
_FOOTER_BYTES = 4  # uint32 masked CRC of the data
_MASK_DELTA = 0xA282EAD8
_UINT32 = 0xFFFFFFFF

# Indexes that could be saved neither beside their shard nor in the cache, keyed by (path, size, mtime_ns).
_UNSAVED_INDEXES: dict[tuple[str, int, int], np.ndarray] = {}
_UNSAVED_INDEXES_LOCK = threading.Lock()


class CorruptRecordError(errors.CorruptDataError):
    """A record whose framing or CRC does not check out; names the file, record and byte offset."""

    hint = "re-create the shard or leave it out of the glob"

    def __init__(self, path: str, record_index: int | None, offset: int, reason: str):
        super().__init__(path, record_index, offset, reason)
        self.path, self.record_index, self.offset, self.reason = path, record_index, offset, reason

    def __reduce__(self):
        # Grain worker processes send errors back pickled; OSError keeps only two of the four args.
        return type(self), (self.path, self.record_index, self.offset, self.reason), self.__dict__

    def __str__(self) -> str:
        record = "record ?" if self.record_index is None else f"record {self.record_index}"
        return f"corrupt TFRecord {self.path}: {record} at byte offset {self.offset}: {self.reason}"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    return google_crc32c.value(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TFRecord frames store."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & _UINT32) + _MASK_DELTA) & _UINT32


def frame_record(data: bytes) -> bytes:
    """One record framed as TFRecord bytes."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def index_path(path: str | os.PathLike) -> str:
    """Where the offset index of the shard `path` lives."""
    return os.fspath(path) + ".index"


class TFRecordWriter:
    """Writes one TFRecord shard and its offset index; the shard appears only once complete.

    Records stream into a hidden temporary file in the same directory (hidden, so a glob over
    shards never matches it); `close()` syncs it and renames it, then the index, into place.
    A writer that crashes, or leaves its `with` block by an exception, leaves no shard behind.

        with TFRecordWriter("train-00000-of-00010.tfrecord") as writer:
            writer.write(example_bytes)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(self.path))
        self._temp_path = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
        self._file = open(self._temp_path, "wb")
        self._entries: list[tuple[int, int]] = []
        self._position = 0

    @property
    def num_records(self) -> int:
        return len(self._entries)

    def write(self, record: bytes) -> None:
        if self._file is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        framed = frame_record(record)
        self._file.write(framed)
        self._entries.append((self._position, len(record)))
        self._position += len(framed)

    def close(self) -> None:
        """Finishes the shard: sync, then rename the data and then its index into place."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        # Data first: a crash between the renames leaves a shard without an index, which
        # `read_index` rebuilds; the reverse order could pair a new index with old data.
        os.replace(self._temp_path, self.path)
        _save_index(index_path(self.path), np.asarray(self._entries, dtype=np.uint64).reshape(-1, 2))

    def abort(self) -> None:
        """Drops everything written; no shard or index appears."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.remove(self._temp_path)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _save_index(destination: str, index: np.ndarray) -> None:
    """Writes `index` to `destination` atomically (a temporary name, then a rename)."""
    directory, name = os.path.split(os.path.abspath(destination))
    temp_path = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp_path, "wb") as file:
            np.save(file, index, allow_pickle=False)
        os.replace(temp_path, destination)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _index_matches_file(index: np.ndarray, file_size: int) -> bool:
    if index.ndim != 2 or index.shape[1] != 2 or index.dtype != np.uint64:
        return False
    if len(index) == 0:
        return file_size == 0
    last_offset, last_length = (int(v) for v in index[-1])
    return last_offset + _HEADER_BYTES + last_length + _FOOTER_BYTES == file_size


def _scan_frames(path: str) -> tuple[list[tuple[int, int]], CorruptRecordError | None, int]:
    """(offset, length) of the frames before the first broken one, the error of that one (None if
    none) and its length field (0 when the field itself is unreadable)."""
    entries = []
    file_size, _ = remote.size_and_mtime(path)
    with remote.open_binary(path) as file:
        offset = 0
        while offset < file_size:
            record_index = len(entries)
            header = file.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                return entries, CorruptRecordError(
                    path, record_index, offset, f"truncated header ({len(header)} of 12 bytes)"), 0
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                return entries, CorruptRecordError(path, record_index, offset, "length CRC mismatch"), 0
            end = offset + _HEADER_BYTES + length + _FOOTER_BYTES
            if end > file_size:
                return entries, CorruptRecordError(
                    path, record_index, offset, f"truncated record: frame ends at {end}, file has {file_size} bytes"
                ), length
            entries.append((offset, length))
            offset = end
            file.seek(offset)
    return entries, None, 0


def build_index(path: str | os.PathLike) -> np.ndarray:
    """Scans a shard's frame headers (checking their CRCs) into a (N, 2) uint64 (offset, length) index."""
    entries, error, _ = _scan_frames(os.fspath(path))
    if error is not None:
        raise error
    return np.asarray(entries, dtype=np.uint64).reshape(-1, 2)


def _index_is_consistent(index: np.ndarray) -> bool:
    """Whether `index` describes back-to-back frames from byte 0 (as a writer's index does)."""
    if index.ndim != 2 or index.shape[1] != 2 or index.dtype != np.uint64 or not len(index):
        return False
    offsets, lengths = index[:, 0].astype(np.int64), index[:, 1].astype(np.int64)
    return offsets[0] == 0 and np.array_equal(offsets[1:], offsets[:-1] + _HEADER_BYTES + lengths[:-1] + _FOOTER_BYTES)


def salvage_index(path: str | os.PathLike) -> np.ndarray:
    """An index of a shard whose framing is broken (a truncated tail, a damaged length field), for
    reading what is left: every row is a record that reads or raises `CorruptRecordError`.

    The index written beside the shard still lists every record, so it is used when it is
    consistent: the records it places past the damage fail to read one by one. Without it, a scan
    lists the frames before the first broken one and that one (the rest of the file, which no
    header can be trusted to locate, is lost). A salvaged index is never saved.
    """
    path = os.fspath(path)
    stored = _load_index(index_path(path))
    if stored is not None and _index_is_consistent(stored):
        return stored
    entries, error, length = _scan_frames(path)
    if error is not None:
        entries.append((error.offset, length))
    return np.asarray(entries, dtype=np.uint64).reshape(-1, 2)


def cached_index_path(path: str | os.PathLike) -> str:
    """Where the index of a shard in a folder we may not write to is kept: the cache directory.

    The name depends on the shard's real path, size and modification time, so a rewritten
    shard never meets the index of its old contents.
    """
    return storage.cache_path("tfrecord_index", path, *remote.size_and_mtime(path)) + ".index"


def _load_index(path: str) -> np.ndarray | None:
    try:
        with remote.open_binary(path) as file:
            return np.load(file, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # unreadable or not an .npy: treated as stale
        logging.warning("cannot read index %s (%s); rebuilding it", path, error)
        return np.zeros((0, 0), np.uint64)


def read_index(path: str | os.PathLike) -> np.ndarray:
    """The (N, 2) uint64 (offset, length) index of a shard, built by a scan when missing or stale.

    An index beside the shard is used when it matches the file. Otherwise the index is built
    and kept beside the shard when its folder is local and writable (`storage.may_write`),
    else in the cache directory (`cached_index_path`), else, when that cannot be written
    either, in memory for the life of the process.
    """
    path = os.fspath(path)
    size, mtime_ns = remote.size_and_mtime(path)
    index = _load_index(index_path(path))
    if index is not None:
        if _index_matches_file(index, size):
            return index
        logging.warning("index %s does not match %s (stale or foreign); rebuilding it", index_path(path), path)
    memory_key = (path, size, mtime_ns)
    with _UNSAVED_INDEXES_LOCK:
        if memory_key in _UNSAVED_INDEXES:
            return _UNSAVED_INDEXES[memory_key]
    if storage.may_write(remote.parent(path)):
        destination = index_path(path)
    else:
        destination = cached_index_path(path)
        index = _load_index(destination)
        if index is not None and _index_matches_file(index, size):
            return index
    index = build_index(path)
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        _save_index(destination, index)
    except OSError as error:
        logging.info("cannot save the index of %s to %s (%s); keeping it in memory", path, destination, error)
        with _UNSAVED_INDEXES_LOCK:
            _UNSAVED_INDEXES[memory_key] = index
    return index


def _check_frame(frame: bytes, path: str, record_index: int | None, offset: int, length: int,
                 verify_crc: bool) -> bytes:
    """The data of one frame read at `offset`, after checking its length field and CRCs."""
    expected = _HEADER_BYTES + length + _FOOTER_BYTES
    if len(frame) != expected:
        raise CorruptRecordError(path, record_index, offset, f"truncated record: read {len(frame)} of {expected} bytes")
    stored_length, length_crc = struct.unpack_from("<QI", frame)
    if stored_length != length:
        raise CorruptRecordError(
            path, record_index, offset, f"length field says {stored_length} bytes, index says {length}"
        )
    data = frame[_HEADER_BYTES:_HEADER_BYTES + length]
    if verify_crc:
        if masked_crc32c(frame[:8]) != length_crc:
            raise CorruptRecordError(path, record_index, offset, "length CRC mismatch")
        (data_crc,) = struct.unpack_from("<I", frame, _HEADER_BYTES + length)
        if masked_crc32c(data) != data_crc:
            raise CorruptRecordError(path, record_index, offset, "data CRC mismatch")
    return data


def read_record(path: str | os.PathLike, offset: int, length: int, *, verify_crc: bool = True,
                record_index: int | None = None) -> bytes:
    """The data of the record framed at byte `offset` with data `length` (an index row).

    Raises `CorruptRecordError` naming the file, `record_index` (when given) and offset if the
    frame is truncated, its length field disagrees with the index, or (with `verify_crc`) a CRC fails.
    """
    path = os.fspath(path)
    offset, length = int(offset), int(length)
    frame = remote.read_at(path, offset, _HEADER_BYTES + length + _FOOTER_BYTES)
    return _check_frame(frame, path, record_index, offset, length, verify_crc)


def iterate_records(path: str | os.PathLike, *, verify_crc: bool = True) -> Iterator[bytes]:
    """The records of a shard in file order (no index needed)."""
    path = os.fspath(path)
    with remote.open_binary(path) as file:
        offset, record_index = 0, 0
        while header := file.read(_HEADER_BYTES):
            if len(header) < _HEADER_BYTES:
                raise CorruptRecordError(path, record_index, offset, f"truncated header ({len(header)} of 12 bytes)")
            (length,) = struct.unpack_from("<Q", header)
            if verify_crc and masked_crc32c(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
                # A bad length would send us to a wrong place; stop before using it.
                raise CorruptRecordError(path, record_index, offset, "length CRC mismatch")
            frame = header + file.read(length + _FOOTER_BYTES)
            yield _check_frame(frame, path, record_index, offset, length, verify_crc)
            offset += len(frame)
            record_index += 1
