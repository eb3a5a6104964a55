"""Storage: fsspec access for any URL (local paths, memory://, s3://, gs://) and atomic publishing."""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.parse
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


# Retries with backoff on an object store's transient faults (connection resets, 500, 503, SlowDown),
# set through the backends' own settings as defaults that a user's fsspec configuration overrides:
# botocore's adaptive retries for S3 (s3fs adds its own for SlowDown); gcsfs retries 5xx and 429 itself.
STORE_DEFAULTS = {"s3": {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}}}}
for _protocol, _options in STORE_DEFAULTS.items():
    for _key, _value in _options.items():
        fsspec.config.conf.setdefault(_protocol, {}).setdefault(_key, _value)


def filesystem(url: str):
    """The fsspec filesystem and the protocol-free root path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def publish(fs, path: str, data: bytes, scratch_dir: str) -> None:
    """Make ``data`` appear at ``path`` whole or not at all (``_publish``); an OSError names ``path``
    (``naming``), not the scratch file it may have come from."""
    with _named(fs, path):
        _publish(fs, path, data, scratch_dir)


def remove(fs, path: str, recursive: bool = False, before=None) -> None:
    """Remove ``path`` if it is there; an OSError names it (``naming``). A removal that fails while
    nothing is there is no failure: a read-only disk refuses to unlink even a missing file.
    ``before``: called first, as part of the removal (a fault point): what it raises is the removal's."""
    with _named(fs, path):
        try:
            if before is not None:
                before()
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        except OSError:
            if _still_there(fs, path):
                raise


def _still_there(fs, path: str) -> bool:
    try:
        return fs.exists(path)
    except OSError:  # the store cannot even say: the removal failed
        return True


@contextlib.contextmanager
def _named(fs, path: str):
    """An OSError raised inside, raised again naming ``path`` (``naming``). Not chained: the job's
    error reporting names the innermost cause, which must be this one."""
    try:
        yield
    except OSError as exc:
        named = naming(exc, full_url(fs, path))
        if named is exc:
            raise
        raise named from None


def naming(exc: OSError, url: str) -> OSError:
    """``exc`` as an OSError of the same errno (and so the same subclass) whose message names ``url``
    and the cause, on one line: ``[Errno 28] No space left on device: '/out/_manifest.json'``. A local
    write's own error names a scratch file or nothing; an object store's carries its HTTP error."""
    cause = " ".join(str(exc.strerror or exc).split())
    if getattr(exc, "filename", None) == url:
        return exc
    inner = " ".join(str(exc.__cause__ or "").split())  # an object store client's error: its HTTP status
    cause += f" ({inner})" if inner and inner not in cause else ""
    if exc.errno is not None:
        return OSError(exc.errno, cause, url)
    try:
        return type(exc)(f"{cause}: {url!r}")
    except TypeError:  # a subclass with a constructor of its own
        return OSError(f"{cause}: {url!r}")


def _publish(fs, path: str, data: bytes, scratch_dir: str) -> None:
    """Make ``data`` appear at ``path`` whole or not at all.

    Local disks: write a uniquely named file under ``scratch_dir``, fsync it, then ``os.replace`` it
    into place (atomic on POSIX). Object stores: one PUT of the whole object, which stores publish
    atomically; their "rename" is a copy and delete, which is not.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    os.replace(_scratch_copy(data, path, scratch_dir), path)
    _sync_folder(path)


def _scratch_copy(data: bytes, path: str, scratch_dir: str) -> str:
    """``data`` in a uniquely named, fsynced file under ``scratch_dir``, and ``path``'s folder made."""
    os.makedirs(scratch_dir, exist_ok=True)
    scratch = os.path.join(scratch_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}")
    with open(scratch, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return scratch


def _sync_folder(path: str) -> None:
    """A rename or link into ``path``'s folder must survive a power loss too, or a marker could
    outlive its part's rename."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Stores without a conditional create: how long a put settles before it is read back.
SETTLE_S = 1.0


def create_exclusive(fs, path: str, data: bytes, scratch_dir: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it
    (``_create_exclusive``); an OSError names ``path`` (``naming``)."""
    with _named(fs, path):
        return _create_exclusive(fs, path, data, scratch_dir)


def _create_exclusive(fs, path: str, data: bytes, scratch_dir: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it.

    Local disks: a scratch file hard-linked into place (``link`` fails when the name exists, and the
    file is whole when it appears). S3 and GCS: fsspec's exclusive write (``mode="create"``): a
    conditional PUT (``If-None-Match: *``) on S3, the generation precondition (``ifGenerationMatch=0``)
    on GCS, so the store itself lets exactly one creator win. Other stores: a PUT then a read-back
    after ``SETTLE_S``; two creators within that window can both pass.
    """
    if is_local(fs):
        scratch = _scratch_copy(data, path, scratch_dir)
        try:
            os.link(scratch, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(scratch)
        _sync_folder(path)
        return True
    if {"s3", "gs", "gcs"} & set(_protocols(fs)):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs maps 412 Precondition Failed (and 409 conflicts) to plain OSErrors
            if any(s in str(exc) for s in ("pre-condition", "Precondition", "Conflict")):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    time.sleep(SETTLE_S)
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


# Query parameters that carry credentials in signed or token URLs.
_SECRET_PARAMS = re.compile(r"key|token|secret|sig|password|passwd|credential|auth|x-amz-|x-goog-", re.I)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact(url: str) -> str:
    """``url`` as docembed records and prints it: without a user and password (``user:pass@``) and
    with the values of credential-like query parameters (signatures, tokens, keys) replaced. Paths
    and URLs that carry none are returned unchanged."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_PARAMS.search(k) for k, _ in params):
        query = urllib.parse.urlencode([(k, "REDACTED" if _SECRET_PARAMS.search(k) else v) for k, v in params])
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (``redact``)."""
    return _URL.sub(lambda m: redact(m.group(0)), text)


def file_fingerprint(info: dict) -> str:
    """A string that changes when a file's content does: the object's etag or generation where the
    store gives one, otherwise its size and modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "crc32c"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:size={info.get('size')}"
    return f"mtime:{modified_time(info)}:size={info.get('size')}"


def input_identity(info: dict, footer_digest: str) -> str:
    """What units and markers record of an input file, to tell when its content changed:
    ``file_fingerprint`` (the store's etag, generation or CRC where it gives one, else size and
    modification time), then, for a local file, the inode's change time, which ``touch``, ``cp -p``,
    ``rsync -t`` and ``tar -x`` cannot set back, and the digest of its Parquet footer (row counts,
    sizes and statistics of every column chunk), fields joined by ``|``."""
    extra = [f"ctime={info['created']}"] if _is_local_info(info) else []
    return "|".join([file_fingerprint(info), *extra, f"footer={footer_digest}"])


def same_input(recorded: str, current: str) -> bool:
    """Whether a file's identity now (``input_identity``) is the one recorded. Outputs written before
    identities had the change time and footer recorded ``file_fingerprint`` alone: those are
    compared on it, as they were."""
    return recorded == current if "|" in recorded else recorded == current.split("|", 1)[0]


def _is_local_info(info: dict) -> bool:
    # fsspec's local file system gives the inode ("ino") and st_ctime as "created"; object stores don't.
    return "ino" in info and info.get("created") is not None


def modified_time(info: dict):
    """The modification time in an fsspec ``info`` record, whatever key the store uses for it."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    return mtime.timestamp() if hasattr(mtime, "timestamp") else mtime


def full_url(fs, path: str) -> str:
    """The path with its protocol, so records name files the same way users do."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path
