"""The docs say what the code does: docs/OPTIONS.md is the parsers' own help, every repository path the
README and docs/*.md name exists, and the README's Layout names every module of the package."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# A repository path as the docs write it: docembed/..., bench/..., jobs/..., tests/..., docs/..., not part of
# a longer path or URL (s3://bucket/docs/, ~/.cache/docembed/models).
PATH = re.compile(r"(?<![\w./~:-])((?:docembed|bench|jobs|tests|docs)/[\w./*<>-]*)")
PLACEHOLDERS = {"FILE", "X", "NAME", "DIR"}  # jobs/FILE.yaml in the usage, jobs/X.yaml


def _make_options():
    spec = importlib.util.spec_from_file_location("make_options", REPO / "docs" / "make_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_the_parsers_help():
    make_options = _make_options()
    assert make_options.render() == make_options.OPTIONS_MD.read_text(), \
        "docs/OPTIONS.md differs from docembed's parsers: run python docs/make_options.py"


def mentioned_paths() -> dict[str, set[str]]:
    """{path: the docs that name it}, for every repository path in README.md and docs/*.md."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for path in PATH.findall(doc.read_text()):
            path = path.split("::")[0].rstrip(".,;:")  # tests/x.py::test_name; a path ending a sentence
            if "<" in path or PLACEHOLDERS & set(re.split(r"[/.]", path)):
                continue  # a placeholder: _plans/<run-id>/, jobs/FILE.yaml
            if not (path.endswith("/") or "." in path.rsplit("/", 1)[1] or "*" in path):
                continue  # not a file or a folder: "44 docs/s"
            found.setdefault(path, set()).add(doc.name)
    return found


def _exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(REPO.glob(path))
    return (REPO / path).exists()


def test_every_path_the_docs_name_exists():
    paths = mentioned_paths()
    assert any(p.startswith("docembed/") and p.endswith(".py") for p in paths)  # the pattern finds them
    missing = {p: sorted(docs) for p, docs in sorted(paths.items()) if not _exists(p)}
    assert not missing, f"paths named in the docs that do not exist: {missing}"


def test_every_test_the_docs_name_exists():
    named = {(doc.name, path, name) for doc in DOCS
             for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc.read_text())}
    missing = [f"{doc}: {path}::{name}" for doc, path, name in sorted(named)
               if not (REPO / path).exists() or f"def {name}(" not in (REPO / path).read_text()]
    assert not missing, f"tests named in the docs that do not exist: {missing}"


def test_the_docs_name_modules_by_their_path_in_the_package():
    """`pipeline/run.py` was a path before the move into docembed/; now it is docembed/pipeline/run.py."""
    bare = re.compile(r"(?<![\w./~:-])((?:pipeline|transforms|model|store|quality|admin|prepare)/[\w/]+\.py)")
    stale = {doc.name: bare.findall(doc.read_text()) for doc in DOCS}
    assert not {doc: paths for doc, paths in stale.items() if paths}


def layout_tree() -> set[str]:
    """The files the README's Layout section draws: its first fenced block, one entry a line (`name.py`
    or `folder/`, indented two spaces a level, then what it is)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    entry = re.compile(r"^( *)([\w.]+(?:/|\.\w+))(?:\s|$)")
    stack: list[tuple[int, str]] = []
    files = set()
    for line in block.splitlines():
        m = entry.match(line)
        if not m:
            continue  # a description's continuation line
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
        else:
            files.add("/".join([*(p for _, p in stack), name]))
    return files


def package_modules() -> set[str]:
    """Every module of the package. A subpackage's __init__.py is drawn as its folder's line."""
    listed = {str(p.relative_to(REPO)) for p in (REPO / "docembed").rglob("*.py")}
    return {p for p in listed if not p.endswith("/__init__.py") or p == "docembed/__init__.py"}


def test_the_readme_layout_names_every_module_and_no_other():
    files = layout_tree()
    gone = sorted(f for f in files if not (REPO / f).exists())
    assert not gone, f"the README's Layout names files that do not exist: {gone}"
    drawn, there = {f for f in files if f.startswith("docembed/")}, package_modules()
    assert drawn, "no Layout tree found in README.md"
    assert not drawn - there, f"the README's Layout names modules that do not exist: {sorted(drawn - there)}"
    assert not there - drawn, f"modules missing from the README's Layout: {sorted(there - drawn)}"


def quickstart_lines() -> list[str]:
    """The README's command block that starts with activating the venv: the lines a user types."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```\n(.*?)```", readme, re.S) if b.startswith(". .venv/bin/activate"))
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_readme_commands_run_as_written_after_make_run(tmp_path):
    """`make run` (its command), then the README's block, line by line, in a shell in a folder laid
    out as the checkout is (jobs/, .venv): every line exits 0."""
    import shutil
    import subprocess

    shutil.copytree(REPO / "jobs" / "sample", tmp_path / "jobs" / "sample")
    shutil.copy(REPO / "jobs" / "local.yaml", tmp_path / "jobs" / "local.yaml")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    subprocess.run([str(REPO / ".venv" / "bin" / "docembed"), "run", "--job", "jobs/local.yaml"], cwd=tmp_path,
                   check=True, capture_output=True)
    lines = quickstart_lines()
    script = "\n".join(["set -e", *(f"echo '>>> {i}'; {line}" for i, line in enumerate(lines))])
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "0 committed this run" in done.stdout and (tmp_path / "report.png").exists()
    assert all(f">>> {i}" in done.stdout for i in range(1, len(lines))), "a line did not run"
