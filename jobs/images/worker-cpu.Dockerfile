# docembed's CPU worker image: Beam's Python 3.11 SDK 2.77.0 image, the CPU build of torch (a fraction
# of the CUDA build's size), docembed with its dependencies at the versions
# requirements.txt pins, and optionally a hub model baked into the image's hub cache. Build from the
# repository root; docs/DEPLOY.md has the push commands:
#
#   docker build -f jobs/images/worker-cpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/docembed/worker-cpu .
FROM apache/beam_python3.11_sdk:2.77.0

COPY setup.py requirements.txt /opt/docembed/
COPY docembed /opt/docembed/docembed

# The CPU build of the pinned torch first (2.13.0+cpu satisfies torch==2.13.0), then docembed with
# everything else at requirements.txt's versions (a constraints file: it installs nothing by itself).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir /opt/docembed -c /opt/docembed/requirements.txt \
 && python -c "import torch; assert not torch.version.cuda; print('torch', torch.__version__)"

ARG HF_MODEL=""
ARG HF_REVISION=""
ENV HF_HOME=/opt/huggingface
RUN if [ -n "$HF_MODEL" ]; then \
      python -c "import os; from huggingface_hub import snapshot_download; print(snapshot_download(os.environ['HF_MODEL'], revision=os.environ['HF_REVISION'] or None))"; \
    fi
