#!/usr/bin/env bash
# The GPU check: one prepared command, under 8 minutes on one CUDA GPU, that runs bench/gpu_check.py's checks
# (every pooling mode and prompts at fp16 and bf16 against a CPU fp32 reference, two threads on one model,
# canaries against a CPU pin, out-of-memory splitting, --long-docs mean and chunks, Dataflow's GPU batch
# sizes, and throughput) and prints PASS, FAIL or SKIP per check; it exits non-zero if any check fails.
#
#   1. on any machine with the dev venv:  python bench/prepare_gpu_assets.py   (MiniLM in fp16, corpus, CPU reference; ~47 MiB)
#   2. on the GPU machine, from the repository root, with bench/gpu_assets copied beside the code:
#      bash bench/gpu_check.sh
#
# What the GPU machine must have, since it may have no network at all (nothing is installed or downloaded here):
#   - python3 (or $PYTHON) with a CUDA build of torch that sees the GPU, and transformers, tokenizers,
#     safetensors, numpy, pyarrow and fsspec: the GPU image's packages. docembed itself is NOT installed: it is
#     imported from this checkout, so its pins (requirements.txt) are not enforced; the versions in use are printed;
#   - bench/gpu_assets from step 1 (no model weights can be fetched there; the pooling checks' small
#     random-weight models are built on the spot from MiniLM's tokenizer in those assets);
#   - optionally apache-beam, for the one check that runs the real job (DirectRunner, 2 workers, multi_threading);
#     without it that check prints SKIP. Wheels can be brought along: put them, with their dependencies, for the
#     machine's Python in a folder and pass it as GPU_CHECK_WHEELS=DIR: they are installed with --no-index into
#     /tmp/gpu-check-site. MiniLM's assets and Beam's wheels together are large to copy at once, so that
#     check can run on its own: GPU_CHECK_ONLY=pipeline.
# Results: $OUT/gpu_check.md (or /tmp/gpu_check.md). Environment: PYTHON, GPU_CHECK_ONLY, GPU_CHECK_SKIP, GPU_CHECK_WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

need() { echo "gpu_check: $*" >&2; exit 2; }
command -v "$PY" >/dev/null || need "no $PY on PATH: set PYTHON to the interpreter that holds a CUDA build of torch"
[ -f bench/gpu_assets/minilm/model.safetensors ] && [ -f bench/gpu_assets/reference.npy ] \
  || need "bench/gpu_assets is missing: run 'python bench/prepare_gpu_assets.py' on a machine with the dev venv and copy the folder there"
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-check-site \
    "$GPU_CHECK_WHEELS"/*.whl || need "could not install the wheels in $GPU_CHECK_WHEELS (offline: every dependency must be among them)"
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || exit 2
import importlib, sys
missing = []
for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "fsspec"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
try:
    import apache_beam
    print(f"  apache-beam {apache_beam.__version__}")
except ImportError:
    print("  apache-beam: not installed (the pipeline check will SKIP)")
if missing:
    sys.exit(f"gpu_check: missing packages: {', '.join(missing)}; this machine is offline, so bring them as wheels (GPU_CHECK_WHEELS)")
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device: "
             "no GPU, no NVIDIA driver, or a CUDA build whose CUDA needs a newer driver (compare nvidia-smi's "
             "'CUDA Version' with the CUDA build)")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "(nvidia-smi not found)"
args=(--assets bench/gpu_assets --out "${OUT:-/tmp}/gpu_check.md")
[ -n "${GPU_CHECK_ONLY:-}" ] && args+=(--only "$GPU_CHECK_ONLY")
[ -n "${GPU_CHECK_SKIP:-}" ] && args+=(--skip "$GPU_CHECK_SKIP")
# 450 s for the checks leaves the 8-minute budget room for the machine's start and the imports above.
timeout 450 "$PY" bench/gpu_check.py "${args[@]}"
