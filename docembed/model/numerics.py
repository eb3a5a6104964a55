"""Numerics: the device and precision a worker embeds at, resolved against that worker's own hardware.

The launcher may run on a laptop without a GPU while the workers are L4 VMs, or the other way round,
so nothing here is decided on the launcher but the combinations that no hardware can run (``fp16`` on
the CPU, ``int8`` on CUDA: ``check_request``). Each worker resolves ``auto`` and checks explicit
requests in its ``setup`` (``resolve``): a worker that lacks CUDA, native bf16 or VNNI fails the job
with its host named. It never falls back.

What ``auto`` means, so that one output never mixes numerics:

- on an output that already holds vectors, the output's own device and precision (the launcher
  adopts them from ``_numerics.json`` before the job starts);
- on a new output, each worker's CUDA device if it has one, else its CPU; fp16 on CUDA, fp32 on the
  CPU. The first unit committed pins that resolution in ``_numerics.json``, and every later commit,
  in this run or any other, must match it (``same``), or the worker refuses to commit.

The record a worker makes (``resolve``) also names its host, CPU or GPU and the versions of the
libraries that compute the vectors, and on the CPU whether it has native bf16 (``cpu_bf16``: the run
report's hint offers ``--precision bf16`` to an fp32 run that could use it); every done-marker carries it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket

from docembed.errors import DeviceUnavailable, UsageError

_LIBRARIES = ("torch", "transformers", "tokenizers")


def check_request(device: str, precision: str) -> None:
    """Refuse, on the launcher, the combinations that no machine runs: no hardware is consulted."""
    if device == "cpu" and precision == "fp16":
        raise UsageError("--precision fp16 is offered on CUDA only; on the CPU use fp32, "
                         "or bf16 on CPUs with native bf16")
    if device == "cuda" and precision == "int8":
        raise UsageError("--precision int8 is a CPU mode; on CUDA use fp16 or bf16")


def check_here(device: str, precision: str) -> None:
    """On a local runner the workers are this machine: refuse, before any work, what its hardware
    cannot give (``resolve``'s refusals, exit 2). The default (``auto`` or the CPU at fp32, which
    every machine gives) is not checked, so that a plain run does not import torch here for it."""
    if device in ("auto", "cpu") and precision in ("auto", "fp32"):
        return
    resolve(device, precision)


def resolve(device: str, precision: str) -> dict:
    """This worker's numerics for the requested ``device`` and ``precision`` (``auto`` allowed);
    raises DeviceUnavailable, naming this host and what it lacks, where it cannot honour them."""
    import torch

    host = socket.gethostname()
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise DeviceUnavailable(
            f"worker {host}: --device cuda was asked for, but torch sees no CUDA device on this worker "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); docembed never falls back to "
            "the CPU: give the workers a GPU and a CUDA build of torch, or pass --device cpu"
        )
    device = ("cuda" if has_cuda else "cpu") if device == "auto" else device
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    if device == "cpu" and precision == "fp16" and not has_cuda:
        raise DeviceUnavailable(
            f"worker {host}: --precision fp16 runs on CUDA only, and torch sees no CUDA device on this "
            f"worker (torch {torch.__version__}, CUDA build: {torch.version.cuda}); on the CPU use fp32, "
            "or bf16 on CPUs with native bf16"
        )
    check_request(device, precision)
    if device == "cpu":
        _check_cpu_features(host, precision)
    record = {"device": device, "precision": precision, "host": host,
              "libraries": {name: _version(name) for name in _LIBRARIES}}
    record.update({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if device == "cuda"
                  else {"cpu": cpu_model(), "cpu_bf16": cpu_has_native_bf16()})
    return record


def _check_cpu_features(host: str, precision: str) -> None:
    """bf16 is offered on the CPU only where it is native (emulated it ran at 0.38x fp32 on an AVX-512
    CPU without it); int8 only with VNNI, which its quality floor was measured on."""
    if precision == "bf16" and not cpu_has_native_bf16():
        raise DeviceUnavailable(
            f"worker {host}: --precision bf16 on the CPU needs native bf16 (avx512_bf16 or amx_bf16), and "
            f"this worker's CPU ({cpu_model()}) has neither: emulated it is slower than fp32; use fp32"
        )
    if precision == "int8" and not cpu_has_vnni():
        raise DeviceUnavailable(
            f"worker {host}: --precision int8 needs a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8) to keep "
            f"its quality floor, and this worker's CPU ({cpu_model()}) has none; use fp32"
        )


def same(a: dict, b: dict) -> bool:
    """Whether two resolutions make the same numbers: the same device and precision."""
    return (a.get("device"), a.get("precision")) == (b.get("device"), b.get("precision"))


def describe_numerics(record: dict) -> str:
    """``cuda fp16 on HOST (GPU, torch 2.x, ...)``: a resolution as a message names it."""
    hardware = record.get("gpu") or record.get("cpu") or "unknown hardware"
    libraries = ", ".join(f"{k} {v}" for k, v in sorted((record.get("libraries") or {}).items()))
    return f"{record.get('device')} {record.get('precision')} on {record.get('host', 'an unknown host')} " \
           f"({hardware}{', ' + libraries if libraries else ''})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read, so no mode is offered blind."""
    try:
        with open("/proc/cpuinfo") as handle:
            return set(handle.read().split())
    except OSError:
        return set()


def cpu_has_vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
