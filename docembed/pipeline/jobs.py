"""Jobs: YAML job files, so a run's options live in version control (``jobs/*.yaml``).

A job file maps flag names (as on the command line, without ``--``) to values, in two sections that
read the same way: ``docembed`` for docembed's options and ``beam`` for Beam's. ``true`` gives a bare
flag, ``false`` the flag's own negative form (``--no-progress`` for docembed, ``--no_use_public_ips``
for Beam), or nothing for a flag that is off by default; a list repeats the flag. Flags given on
the command line after ``--job FILE`` override the file's.

Relative paths in a job file are relative to the job file's folder, not to the working directory,
so a job runs the same from any directory and any wrapper (cron, a CI step, a container): ``input``,
``output``, ``setup_file`` and ``requirements_file``, and
``model`` when it starts with ``./`` or ``../`` (any other ``model`` is read as a hub id, such as
``BAAI/bge-base-en-v1.5``, so write a local model folder as ``./models/x`` or as an absolute path).
Such a path becomes absolute: the job file's folder joined with it, normalised, a trailing ``/`` kept.
URLs (``scheme://...``) and absolute paths stay as written. Flags given on the command line after
``--job`` stay relative to the working directory, as the shell gives them.

    python -m docembed run --job jobs/local.yaml --output out2/"""

from __future__ import annotations

import argparse
import os
import re

import yaml

from docembed.errors import UsageError

SECTIONS = ("docembed", "beam")
# Options whose values are paths, by their name with "_" (a job file may write either "-" or "_"):
# resolved against the job file's folder (relative_to_job). model only when written ./ or ../.
PATH_OPTIONS = {"input", "output", "setup_file", "requirements_file"}
LOCAL_MODEL = ("./", "../")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def expand_job(argv: list[str]) -> list[str]:
    """``argv`` with ``--job FILE`` replaced by the file's flags (placed first, so later flags win)."""
    if "--job" not in argv and not any(a.startswith("--job=") for a in argv):
        return argv
    rest, path = [], None
    items = iter(argv)
    for arg in items:
        if arg == "--job":
            path = next(items, None)
        elif arg.startswith("--job="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not path:
        raise UsageError("--job needs a YAML file")
    return job_flags(path) + rest


def job_flags(path: str) -> list[str]:
    try:
        with open(path) as handle:
            job = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise UsageError(f"--job {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"--job {path} is not valid YAML: {exc}") from exc
    unknown = set(job) - set(SECTIONS) - {"description"}
    if unknown:
        raise UsageError(f"--job {path}: unknown sections {sorted(unknown)}; use {list(SECTIONS)}")
    folder = os.path.dirname(os.path.abspath(path))
    where = f"--job {path}"
    return [flag for section in SECTIONS
            for flag in as_flags(relative_to_job(_section(job, section, where), folder), where)]


def _section(job: dict, section: str, where: str) -> dict:
    options = job.get(section) or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: section {section} must map flag names to values, not {options!r}")
    return options


def relative_to_job(options: dict, folder: str) -> dict:
    """``options`` with the relative paths among their values (``PATH_OPTIONS``, and ``model`` written
    ``./`` or ``../``) resolved against ``folder``, the job file's; every other value as it was."""
    resolved = {}
    for name, value in options.items():
        key = str(name).replace("-", "_")
        if key in PATH_OPTIONS or (key == "model" and isinstance(value, str) and value.startswith(LOCAL_MODEL)):
            value = _resolve(value, folder)
        resolved[name] = value
    return resolved


def _resolve(value, folder: str):
    """``value`` (a string, or a YAML list of them) resolved against ``folder``."""
    if isinstance(value, list):
        return [_resolve(item, folder) for item in value]
    if not isinstance(value, str):
        return value
    path = value.strip()
    if not path or _URL.match(path) or os.path.isabs(path) or path.startswith("~"):
        return value  # "~" too: the user's home is no folder of the job's
    joined = os.path.normpath(os.path.join(folder, path))
    return joined + "/" if path.endswith("/") and not joined.endswith("/") else joined


def as_flags(options: dict, where: str) -> list[str]:
    """Command-line flags for ``{name: value}`` options (names with - or _); ``where`` names their
    source in errors."""
    actions = option_actions()
    return [flag for name, value in options.items() for flag in _flag(name, value, actions, where)]


def option_actions() -> dict[str, argparse.Action]:
    """Every flag Beam and docembed know, by option string, from the parser Beam itself builds."""
    from apache_beam.options.pipeline_options import PipelineOptions

    import docembed.pipeline.options  # noqa: F401 - registers docembed's options with Beam's parser

    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    return parsers[0]._option_string_actions


def _flag(name: str, value, actions: dict, where: str) -> list[str]:
    action = actions.get(f"--{name}")
    if isinstance(value, bool) and action is not None and action.nargs != 0:
        return [f"--{name}={value}"]  # a flag that takes a value: it gets the word
    if value is True:
        return [f"--{name}"]
    if value is False:
        negatives = [f"--no-{name}", f"--no_{name}"]
        found = [n for n in negatives if n in actions and actions[n].dest == getattr(action, "dest", None)]
        if found:
            return found[:1]
        if isinstance(action, argparse._StoreTrueAction):
            return []  # off is its default
        if action is None:
            raise UsageError(f"{where}: unknown flag --{name}")
        raise UsageError(f"{where}: {name}: false has no flag to say it ({', '.join(negatives)} do not exist)")
    if value is None:
        return []
    if isinstance(value, list):
        return [f"--{name}={item}" for item in value]
    return [f"--{name}={value}"]
