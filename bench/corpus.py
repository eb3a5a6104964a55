"""Build the benchmark corpus: real English technical text from Python's standard library, offline.

Documents are the docstrings of the standard library's modules, classes and functions (one line to
several pages) plus pydoc's rendering of whole classes (often longer than the model's window), so the
lengths spread naturally and many documents exceed 256 tokens. Deterministic for a Python version.

    python bench/corpus.py --docs 2000 --out bench/corpus.parquet [--cycle]

The standard library holds a few thousand such documents; asked for more, it writes all of them, or
with --cycle repeats them (ids suffixed "#1", "#2", ...) until there are --docs rows.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import pydoc
import re
import sysconfig
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "antigravity", "this",
         "__main__", "pydoc_data", "xxsubtype", "_")


def _modules():
    # Only the standard library's own folders: sys.path also holds the running script's folder
    # (bench/ itself, or a project with a setup.py that exits when imported) and site-packages.
    stdlib = sysconfig.get_paths()["stdlib"]
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        where = str(getattr(info.module_finder, "path", ""))
        if info.name.startswith(_SKIP) or not where.startswith(stdlib) or "site-packages" in where:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield importlib.import_module(info.name)
        except Exception:  # platform-specific modules that do not import here
            continue


def documents():
    """(id, text) pairs: module, class and function docstrings, and pydoc pages of classes."""
    for module in _modules():
        if module.__doc__:
            yield module.__name__, inspect.cleandoc(module.__doc__)
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value):
                try:
                    page = pydoc.plain(pydoc.render_doc(value))
                    # Default values print as <object object at 0x7f...>: an address differs every run.
                    yield f"{module.__name__}.{name}:pydoc", re.sub(r" at 0x[0-9a-f]+", "", page)
                except Exception:
                    pass
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__doc__:
                yield f"{module.__name__}.{name}", inspect.cleandoc(value.__doc__)


def build(count: int, cycle: bool = False) -> pa.Table:
    seen, rows = set(), []
    for ident, text in documents():
        text = text.strip()
        if len(text.split()) < 4 or text in seen:
            continue
        seen.add(text)
        rows.append((ident, text))
    step = max(1, len(rows) // count)
    rows = rows[::step][:count]
    if cycle:
        rows = _cycled(rows, count)
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]})


def _cycled(rows: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """rows repeated until there are count of them, each repeat k's ids suffixed "#k" (unique ids)."""
    out = list(rows)
    for k in range(1, count // max(1, len(rows)) + 1):
        out += [(f"{ident}#{k}", text) for ident, text in rows[:count - len(out)]]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--out", default="bench/corpus.parquet")
    parser.add_argument("--cycle", action="store_true",
                        help="repeat the documents with new unique ids until there are --docs rows")
    args = parser.parse_args()
    table = build(args.docs, args.cycle)
    pq.write_table(table, args.out, row_group_size=500)
    print(f"wrote {table.num_rows} documents to {args.out}")


if __name__ == "__main__":
    main()
