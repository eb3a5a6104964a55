# docembed's GPU worker image: Beam's Python 3.11 SDK 2.77.0 image, the CUDA 12.8 build of torch, docembed
# with its dependencies at the versions requirements.txt pins, and optionally a hub model baked into
# the image's hub cache. For Dataflow (--sdk_container_image) and for Flink or Spark SDK worker pools
# (run it with --worker_pool). Build from the repository root; docs/DEPLOY.md has the push commands:
#
#   docker build -f jobs/images/worker-gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/docembed/worker-gpu .
#   docker build -f jobs/images/worker-gpu.Dockerfile --build-arg HF_MODEL=BAAI/bge-base-en-v1.5 \
#       --build-arg HF_REVISION=<commit> -t ... .
FROM apache/beam_python3.11_sdk:2.77.0

# The sdist's two packages and what pins them; tests/ and jobs/ stay out, as on a --setup_file worker.
COPY setup.py requirements.txt /opt/docembed/
COPY docembed /opt/docembed/docembed

# torch from PyTorch's CUDA 12.8 index, not PyPI's: PyPI's torch 2.13.0 for Linux x86_64 is 2.13.0+cu130
# (its METADATA requires cuda-toolkit==13.0.3 and nvidia-*-cu13 wheels), and CUDA 13.0 needs an NVIDIA driver
# of the 580 series or newer, which a Dataflow worker's installed driver may not be. The CUDA 12.8 build runs
# on drivers from 525.60.13 on (CUDA 12's minor-version compatibility; 570.26 is 12.8's own minimum). So the
# pair is: torch 2.13.0+cu128, driver >= 525.60.13 (docs/DEPLOY.md, "The GPU image's CUDA and the driver").
# Build with --build-arg TORCH_CUDA=cu130 only for workers whose nvidia-smi shows a 580+ driver.
# 2.13.0+cu128 satisfies requirements.txt's torch==2.13.0; requirements.txt is a constraints file: it pins
# every version docembed was tested with and installs nothing by itself.
ARG TORCH_CUDA=cu128
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_CUDA} \
 && pip install --no-cache-dir /opt/docembed -c /opt/docembed/requirements.txt \
 && python -c "import os, torch; want = os.environ['TORCH_CUDA'][2:]; assert torch.version.cuda and torch.version.cuda.replace('.', '') == want, f'torch {torch.__version__} is not the CUDA {want} build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Optional: a hub model at a pinned commit, in the hub cache workers look in first (pass the same
# --model and --model-revision to docembed). Without it, workers download the model at start.
ARG HF_MODEL=""
ARG HF_REVISION=""
ENV HF_HOME=/opt/huggingface
RUN if [ -n "$HF_MODEL" ]; then \
      python -c "import os; from huggingface_hub import snapshot_download; print(snapshot_download(os.environ['HF_MODEL'], revision=os.environ['HF_REVISION'] or None))"; \
    fi
