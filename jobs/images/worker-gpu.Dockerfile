# docembed's GPU worker image: Beam's Python 3.11 SDK 2.77.0 image, a CUDA build of torch, docembed
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

# PyPI's torch wheels for Linux x86_64 are CUDA builds (the CUDA libraries come as nvidia-* wheels), so
# the pinned torch==2.13.0 is the CUDA build here. requirements.txt is a constraints file: it pins
# every version docembed was tested with and installs nothing by itself.
RUN pip install --no-cache-dir /opt/docembed -c /opt/docembed/requirements.txt \
 && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Optional: a hub model at a pinned commit, in the hub cache workers look in first (pass the same
# --model and --model-revision to docembed). Without it, workers download the model at start.
ARG HF_MODEL=""
ARG HF_REVISION=""
ENV HF_HOME=/opt/huggingface
RUN if [ -n "$HF_MODEL" ]; then \
      python -c "import os; from huggingface_hub import snapshot_download; print(snapshot_download(os.environ['HF_MODEL'], revision=os.environ['HF_REVISION'] or None))"; \
    fi
