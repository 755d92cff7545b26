"""Where a reader may write: into data folders it owns, and a cache directory for the rest.

Data folders are often not the reader's: a shared read-only dataset, a read-only mount, a
network file system or a bucket mounted with FUSE. A reader never writes into such a folder.
What it derives from the data and wants to keep (a TFRecord's offset index, `inspect-data`'s
report) goes beside the data only when the folder is local and writable by this process, and
otherwise into the cache directory:

    $VFUSION3D_CACHE_DIR, else $XDG_CACHE_HOME/vfusion3d_jax, else ~/.cache/vfusion3d_jax

Cached files are named after the data's real path (and, for derived files, its size and
modification time), so two folders never share an entry and a rewritten file gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

CACHE_DIR_ENV = "VFUSION3D_CACHE_DIR"

# File system types whose files live on another machine: writing a derived file there is slow,
# may be billed, and may land in a dataset other people read.
NETWORK_FILESYSTEMS = frozenset({
    "9p", "afs", "ceph", "cifs", "glusterfs", "lustre", "ncpfs", "nfs", "nfs4", "smb", "smb3", "smbfs",
    "fuse.gcsfuse", "fuse.s3fs", "fuse.sshfs", "fuse.rclone", "fuse.blobfuse", "fuse.goofys", "fuse.mountpoint-s3",
    "fuse.juicefs", "fuse.alluxio-fuse", "gcsfuse",
})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MOUNTS_FILE = "/proc/self/mounts"


def cache_dir() -> str:
    """The cache directory (not created here)."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "vfusion3d_jax")


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def filesystem_type(path: str | os.PathLike, mounts_file: str = _MOUNTS_FILE) -> str | None:
    """The type of the file system holding `path` (from the mount table), None when unknown."""
    real = os.path.realpath(os.fspath(path))
    best, best_type = "", None
    try:
        with open(mounts_file, encoding="utf-8", errors="replace") as file:
            for line in file:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point, fs_type = _unescape_mount_field(fields[1]), fields[2]
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                # The longest mount point holding the path wins; a later equal one is mounted on top.
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fs_type
    except OSError:
        return None
    return best_type


def is_remote(path: str | os.PathLike, mounts_file: str = _MOUNTS_FILE) -> bool:
    """Whether `path` is a URL or lies on a network file system."""
    path = os.fspath(path)
    if _URL.match(path):
        return True
    return filesystem_type(path, mounts_file) in NETWORK_FILESYSTEMS


def may_write(directory: str | os.PathLike, mounts_file: str = _MOUNTS_FILE) -> bool:
    """Whether a reader may keep derived files in `directory`: it is local and this process can write it.

    `os.access` asks the kernel, so read-only mounts and immutable folders count as unwritable
    for root too, not only missing permission bits.
    """
    directory = os.fspath(directory) or "."
    return not is_remote(directory, mounts_file) and os.path.isdir(directory) and os.access(directory, os.W_OK)


def cache_path(kind: str, source: str | os.PathLike, *stamp) -> str:
    """A path in the cache directory for something of `kind` derived from `source`.

    The name is `source`'s base name and a hash of its real path and `stamp` (such as the
    size and modification time of the file it was derived from). The folder is not created.
    """
    source = os.fspath(source)
    real = source if _URL.match(source) else os.path.realpath(source)
    digest = hashlib.sha256("\0".join([real, *map(str, stamp)]).encode("utf-8")).hexdigest()[:16]
    name = os.path.basename(real.rstrip("/")) or "root"
    return os.path.join(cache_dir(), kind, f"{name}-{digest}")


# --- Output folders of the data writers (`render-data`, `generate`) ----------------------------


def stable_hash(*parts) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process and run."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes `text` under a temporary name, then renames it: readers see all of it or nothing."""
    path = os.fspath(path)
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def write_json_atomically(path: str | os.PathLike, value) -> None:
    """`value` as indented JSON, written atomically (`write_text_atomically`)."""
    write_text_atomically(path, json.dumps(value, indent=2, default=str))


def claim_workdir(path: str | os.PathLike, settings: dict, command: str) -> None:
    """Records the `settings` (JSON-able) that the outputs in `path`'s folder are made with, or checks
    that a restarted job has the same: a resumed job must not mix outputs of two settings."""
    path = Path(path)
    settings = json.loads(json.dumps(settings, default=str))  # tuples -> lists, as stored
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"{path.parent} holds the outputs of a `{command}` run with other settings (fields "
                             f"{changed} differ); use a new --workdir or the same settings")
    else:
        write_json_atomically(path, settings)
