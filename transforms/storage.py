"""Storage: fsspec access for any URL (local paths, memory://, s3://, gs://) and atomic publishing."""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str):
    """The fsspec filesystem and the protocol-free root path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def publish(fs, path: str, data: bytes, scratch_dir: str) -> None:
    """Make ``data`` appear at ``path`` whole or not at all.

    Local disks: write a uniquely named file under ``scratch_dir``, fsync it, then ``os.replace`` it
    into place (atomic on POSIX). Object stores: one PUT of the whole object, which stores publish
    atomically; their "rename" is a copy and delete, which is not.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    os.makedirs(scratch_dir, exist_ok=True)
    scratch = os.path.join(scratch_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}")
    with open(scratch, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    os.replace(scratch, path)
    # The rename itself must survive a power loss too, or a marker could outlive its part's rename.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_fingerprint(info: dict) -> str:
    """A string that changes when a file's content does: the object's etag or generation where the
    store gives one, otherwise its size and modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "crc32c"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:size={info.get('size')}"
    return f"mtime:{modified_time(info)}:size={info.get('size')}"


def modified_time(info: dict):
    """The modification time in an fsspec ``info`` record, whatever key the store uses for it."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    return mtime.timestamp() if hasattr(mtime, "timestamp") else mtime


def full_url(fs, path: str) -> str:
    """The path with its protocol, so records name files the same way users do."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path
