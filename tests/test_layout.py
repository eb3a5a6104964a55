"""The package's shape, as a user and a newcomer rely on it: one import package that a user's own
pipeline.py or transforms.py cannot shadow; the import rules (.importlinter) between the launcher, the
workers, the model and the output format's owner; one name for one thing."""

from __future__ import annotations

import ast
import collections
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "docembed"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package found first on PYTHONPATH ``root``, with the repository's rules."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.unit
def test_the_import_rules_hold():
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout


@pytest.mark.unit
@pytest.mark.parametrize("module, line, contract", [
    ("transforms/read.py", "from docembed.pipeline import plan", "Worker stages (transforms) import no launcher"),
    ("model/quantize.py", "import apache_beam", "The model code imports no Beam"),
    ("store/layout.py", "from docembed.store import storage", "The output format's owner"),
    ("store/units.py", "from docembed.transforms import commit", "What both sides use"),
])
def test_an_import_across_the_rules_is_caught(tmp_path, module, line, contract):
    copy = tmp_path / "docembed"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}  # breaks a rule\n")
    done = _lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = [block for block in done.stdout.split("\n\n") if "BROKEN" in block]
    assert len(broken) == 1 and contract in " ".join(broken[0].split()), done.stdout


@pytest.mark.unit
def test_no_two_public_functions_or_classes_share_a_name():
    homes = collections.defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                homes[node.name].append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in homes.items() if len(paths) > 1} == {}


@pytest.mark.unit
def test_the_output_folders_names_are_spelt_only_in_the_layout_module():
    """Every bookkeeping name of the output folder comes from store/layout.py: no other module spells one."""
    spelt = ['"_checkpoints', '"_rejects', '"_plans', '"_progress', '"_reports', '"_attempts', '"_manifest.json',
             '"_lock.json', '"_numerics.json', '"_canaries.json', '"_quantization.json', '"_stop"', '"part-',
             "b\"docembed.", '"_probe']
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            code = text.split("#")[0]
            found += [f"{path.relative_to(REPO)}:{number}: {text.strip()}" for name in spelt if name in code]
    assert found == []


USER_JOB = '''
"""A user's own job file, named as Beam's examples name theirs, beside a transforms.py of theirs."""
import apache_beam as beam
import docembed
from docembed import EmbedDocuments, EmbedParquet
from transforms import shout  # the user's module, not docembed's

assert docembed.__all__ == ["EmbedDocuments", "EmbedParquet", "embed_queries", "__version__"]
assert EmbedParquet.__module__ == "docembed.pipeline.api"
with beam.Pipeline() as p:
    (p | beam.Create([{"id": "a", "text": "A plain sentence."}, {"id": "b", "text": "Another one."}])
       | EmbedDocuments(min_batch_size=1)
       | beam.Map(lambda d: print(shout(d["id"]), len(d["embedding"]))))
'''


@pytest.mark.e2e
def test_a_users_pipeline_py_and_transforms_py_break_nothing(tmp_path):
    (tmp_path / "pipeline.py").write_text(textwrap.dedent(USER_JOB))
    (tmp_path / "transforms.py").write_text("def shout(text):\n    return text.upper()\n")
    env = {**os.environ, "PYTHONPATH": ""}  # the folder itself comes first, as `python pipeline.py` puts it
    done = subprocess.run([sys.executable, "pipeline.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split("\n")[:2]) == ["A 384", "B 384"]
    for command in ([sys.executable, "-m", "docembed", "--version"], [str(Path(sys.executable).parent / "docembed"),
                                                                       "--version"]):
        shown = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert (shown.returncode, shown.stdout.strip()) == (0, "docembed 0.1.0"), shown.stderr
