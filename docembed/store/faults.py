"""Faults: named points where tests make docembed crash or fail, deterministically.

Armed only by the environment variable ``DOCEMBED_FAULT``, a comma-separated list of
``POINT@N[:ACTION]``: at the N-th time this process passes POINT (``*`` for every time), do ACTION:
``crash`` (the default: ``os._exit(97)``, as a SIGKILL or a lost VM would stop it, with no cleanup),
``raise`` (a RuntimeError, as a broken device would raise; at the store's points an OSError (EIO), as
a failing store would; ``raise>V`` only where the point's value exceeds V, as a device short of memory
fails only on large batches), ``raise=oom`` or ``raise=cuda`` (``raise=KIND>V`` where the value
exceeds V: the error a GPU raises, as torch raises it on a CUDA build: ``torch.OutOfMemoryError``
for memory short, ``torch.AcceleratorError`` "CUDA error: device-side assert triggered" for a poisoned
context; both can be made on a CPU build), ``errno=NAME`` (a real OSError with that errno, ``ENOSPC``, ``EROFS``,
``EIO``, ..., naming the file, as the operating system or an object store client raises it: a full
disk, a file system remounted read-only, a failing disk or a store answering 5xx), ``perturb=S`` (multiply every
weight of the point's model by 1 + S x N(0, 1), seeded: a worker whose numbers differ while every
label agrees, as another GPU type or library build would), or ``pause``: create the file
``$DOCEMBED_FAULT_GATE.arrived.PID.K`` and wait until ``$DOCEMBED_FAULT_GATE.K`` exists, K being how
many times the point was passed, so that a test can hold several processes at the same point and
release them together (a race run the same way every time). Unarmed, a point costs one dictionary
lookup. The points:

- ``publish:KIND`` before, and ``published:KIND`` after, the store makes a file appear, where KIND
  is what the file is: ``part``, ``rejects``, ``marker``, ``manifest``, ``plan``, ``lock``,
  ``heartbeat``, ``numerics``, ``canaries``, ``quantization``, ``progress``, ``report``, ``stop``
  (the stop request) or ``probe``;
- ``remove:KIND`` before the store removes a file or folder of that kind (KIND as above, and
  ``scratch`` for ``_attempts/``): the stop request, the lock, the plan folder, progress records,
  leftovers, taken-back units, the probe; passed whether the file is there or not, and a fault raised
  where nothing is there is no failure, as a read-only disk's refusal to unlink a missing file is none;
- ``forward``: each batch the model runs; its value is the batch's padded tokens;
- ``loaded``: a worker's model, just loaded (the point for ``perturb``).
"""

from __future__ import annotations

import collections
import errno
import os
import time

CRASH_EXIT = 97
_passed: collections.Counter = collections.Counter()


def _armed() -> dict[str, list[tuple[str, str]]]:
    armed: dict[str, list[tuple[str, str]]] = {}
    for item in filter(None, os.environ.get("DOCEMBED_FAULT", "").split(",")):
        point, _, rest = item.partition("@")
        count, _, action = rest.partition(":")
        armed.setdefault(point, []).append((count, action or "crash"))
    return armed


# Points where docembed is about to touch the store: there ``raise`` is a failing store (an OSError).
STORE_POINTS = ("publish:", "published:", "remove:")


def hit(point: str, value: float = 0, target=None, path: str = "") -> None:
    """Pass ``point``: crash, raise or perturb ``target`` (a torch module) here if the environment asks;
    ``path``: the file a store point is about, named by the errors raised there."""
    if "DOCEMBED_FAULT" not in os.environ:
        return
    _passed[point] += 1
    for count, action in _armed().get(point, []):
        if count in ("*", str(_passed[point])):
            if action.startswith("perturb="):
                _perturb(target, float(action.split("=", 1)[1]))
                continue
            if action.startswith("raise="):
                kind, _, above = action[6:].partition(">")
                if not above or value > float(above):
                    raise _device_error(kind, point)
                continue
            if action.startswith("errno="):
                raise _os_error(getattr(errno, action[6:]), path)
            if action == "raise" and point.startswith(STORE_POINTS):
                raise OSError(errno.EIO, f"fault injected at {point} (DOCEMBED_FAULT)", path)
            if action == "raise" or (action.startswith("raise>") and value > float(action[6:])):
                raise RuntimeError(f"fault injected at {point} (DOCEMBED_FAULT)")
            if action.startswith("raise>"):
                continue
            if action == "pause":
                _pause(_passed[point])
                continue
            os._exit(CRASH_EXIT)


def _os_error(code: int, path: str) -> OSError:
    """The OSError the system raises for ``code`` on ``path`` (its subclass too: ENOENT is a
    FileNotFoundError), as ``open`` or ``os.replace`` would."""
    return OSError(code, os.strerror(code), *([path] if path else []))


def _device_error(kind: str, point: str) -> Exception:
    """The exception torch raises on a GPU for ``kind``: ``oom`` (recoverable: memory short now) or
    ``cuda`` (the process's CUDA context is poisoned; a torch without AcceleratorError raises a
    RuntimeError with the same message)."""
    import torch

    where = f"(fault injected at {point}, DOCEMBED_FAULT)"
    if kind == "oom":
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB {where}")
    if kind == "cuda":
        error = getattr(torch, "AcceleratorError", RuntimeError)
        return error(f"CUDA error: device-side assert triggered {where}")
    raise ValueError(f"DOCEMBED_FAULT: unknown error kind raise={kind} at {point} (oom, cuda)")


def _perturb(model, scale: float) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            parameter.mul_(1 + scale * noise)


def _pause(passage: int) -> None:
    gate = os.environ["DOCEMBED_FAULT_GATE"]
    open(f"{gate}.arrived.{os.getpid()}.{passage}", "w").close()
    while not os.path.exists(f"{gate}.{passage}"):
        time.sleep(0.005)
