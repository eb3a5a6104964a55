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
  CPU (``auto_precision``; bf16 on CUDA for a model saved in bf16, where the caller names the model's
  ``trained`` dtype and the GPU has native bf16: fp16 can overflow such a model's activations). The
  first unit committed pins that resolution in ``_numerics.json``, and every later commit, in this run
  or any other, must match it (``same``), or the worker refuses to commit.

The record a worker makes (``resolve``) also names its host, CPU or GPU and the versions of the
libraries that compute the vectors, on the CPU whether it has native bf16 (``cpu_bf16``: the run
report's hint offers ``--precision bf16`` to an fp32 run that could use it), and whether fp32 matrix
products may round through TF32 (``tf32``: docembed turns it off, ``use_true_fp32``); every done-marker
carries it.

A worker asked for CUDA that torch cannot see says why where that can be known (``driver_problem``):
a CPU build of torch, no NVIDIA driver, or a driver older than torch's CUDA needs.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import socket
import subprocess

from docembed.errors import DeviceUnavailable, UsageError

_LIBRARIES = ("torch", "transformers", "tokenizers")

# The oldest Linux driver each CUDA major version runs on (minor version compatibility: a torch build
# bundles its own CUDA runtime). Source: NVIDIA's CUDA Toolkit release notes, table "CUDA Toolkit and
# Corresponding Driver Versions" (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/).
MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}
_DRIVER_FILE = "/proc/driver/nvidia/version"


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


def resolve(device: str, precision: str, trained: str | None = None) -> dict:
    """This worker's numerics for the requested ``device`` and ``precision`` (``auto`` allowed;
    ``trained``: the dtype the model was saved in, ``card.ModelFolder.trained_dtype``, where known);
    raises DeviceUnavailable, naming this host and what it lacks, where it cannot honour them."""
    import torch

    host = socket.gethostname()
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        why = driver_problem(installed_driver() if torch.version.cuda else None, torch.version.cuda)
        raise DeviceUnavailable(
            f"worker {host}: --device cuda was asked for, but torch sees no CUDA device on this worker "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}){': ' + why if why else ''}; "
            "docembed never falls back to the CPU: give the workers a GPU and a CUDA build of torch, "
            "or pass --device cpu"
        )
    use_true_fp32()
    device = ("cuda" if has_cuda else "cpu") if device == "auto" else device
    if precision == "auto":
        native_bf16 = (device == "cuda" and trained == "bfloat16"  # asks the GPU only where it matters
                       and torch.cuda.is_bf16_supported(including_emulation=False))
        precision = auto_precision(device, trained, native_bf16)
    if device == "cpu" and precision == "fp16" and not has_cuda:
        raise DeviceUnavailable(
            f"worker {host}: --precision fp16 runs on CUDA only, and torch sees no CUDA device on this "
            f"worker (torch {torch.__version__}, CUDA build: {torch.version.cuda}); on the CPU use fp32, "
            "or bf16 on CPUs with native bf16"
        )
    check_request(device, precision)
    if device == "cpu":
        _check_cpu_features(host, precision)
    record = {"device": device, "precision": precision, "host": host, "tf32": tf32_in_use(),
              "libraries": {name: _version(name) for name in _LIBRARIES}}
    record.update({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if device == "cuda"
                  else {"cpu": cpu_model(), "cpu_bf16": cpu_has_native_bf16()})
    return record


def auto_precision(device: str, trained: str | None, native_bf16: bool) -> str:
    """What ``--precision auto`` is on ``device``: fp32 on the CPU; on CUDA fp16, or bf16 for a model
    saved in bf16 (``trained``) on a GPU with native bf16 (fp16's range is far narrower than bf16's, and
    a model trained in bf16 may have activations past it: inf, then NaN vectors)."""
    if device != "cuda":
        return "fp32"
    return "bf16" if trained == "bfloat16" and native_bf16 else "fp16"


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


def use_true_fp32() -> None:
    """fp32 means IEEE fp32 in this process: no TF32 in cuBLAS matrix products or cuDNN. TF32 rounds
    fp32 inputs to 10 mantissa bits, on Ampere and later GPUs only, so with it a ``cuda fp32`` output
    would hold other numbers than the CPU's (the reference) and than an older GPU's under the same
    pinned numerics; fp32 is asked for exactness, fp16 and bf16 are the fast modes. Set explicitly
    (torch's defaults are matmul off, cuDNN on; TORCH_ALLOW_TF32_CUBLAS_OVERRIDE or another library may
    have turned them on). Through the legacy API only: torch 2.9+ raises on reading the legacy flags
    once they were mixed with the new ``fp32_precision`` ones."""
    import torch

    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def tf32_in_use() -> bool:
    """Whether fp32 matrix products or convolutions in this process may round through TF32, read from
    torch's per-operation settings (an operation's "none" inherits CUDA's, then everything's), which,
    unlike the legacy flags, can always be read."""
    import torch

    backends = torch.backends

    def effective(own: str) -> str:
        return next((v for v in (own, backends.cudnn.fp32_precision, backends.fp32_precision) if v != "none"), "ieee")

    ops = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision, backends.cudnn.rnn.fp32_precision)
    return any(effective(own) != "ieee" for own in ops)


def driver_problem(driver: str | None, torch_cuda: str | None) -> str | None:
    """Why torch cannot use CUDA, where the installed NVIDIA ``driver`` version and torch's CUDA
    version (``torch.version.cuda``, None for a CPU build) tell it; None where they do not (the driver
    is new enough, or its CUDA major is not in ``MIN_LINUX_DRIVER``)."""
    if torch_cuda is None:
        return "this worker's torch is a CPU build (it has no CUDA); install a CUDA build of torch"
    if driver is None:
        return (f"no NVIDIA driver was found on this worker (no {_DRIVER_FILE}, no nvidia-smi), and torch's "
                f"CUDA {torch_cuda} needs one")
    major = _numbers(torch_cuda)[:1]
    minimum = MIN_LINUX_DRIVER.get(major[0]) if major else None
    if minimum is None or _numbers(driver) >= _numbers(minimum):
        return None
    return (f"torch's CUDA {torch_cuda} needs NVIDIA driver {minimum} or newer, and this worker's driver is "
            f"{driver}: update the driver, or install a torch build for an older CUDA")


def installed_driver() -> str | None:
    """The NVIDIA driver's version (``535.104.05``) from the kernel module, else nvidia-smi; None where
    neither answers."""
    try:
        with open(_DRIVER_FILE) as handle:
            # "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for ]x86_64  535.104.05  ...": the first line
            found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)", handle.readline())
        if found:
            return found.group(1)
    except OSError:
        pass
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = done.stdout.split()
    return versions[0] if done.returncode == 0 and versions else None


def _numbers(version: str) -> tuple[int, ...]:
    """``"525.60.13"`` -> (525, 60, 13), compared as numbers; what is not a number ends it."""
    numbers = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


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
