"""Build jobs/sample/docs.parquet: a few hundred real documents, the docstrings of Python's standard
library (modules, classes and functions), with natural lengths from one line to several pages.

    python jobs/sample/make_sample.py [--count 400] [--out jobs/sample/docs.parquet]
"""

import argparse
import importlib
import inspect

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
]


def docstrings():
    for name in MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            yield name, module.__doc__
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__doc__:
                yield f"{name}.{attr}", inspect.cleandoc(value.__doc__)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--out", default="jobs/sample/docs.parquet")
    args = parser.parse_args()
    rows = [(qual, text) for qual, text in docstrings() if len(text.split()) >= 5]
    step = max(1, len(rows) // args.count)
    rows = rows[::step][: args.count]
    table = pa.table({
        "id": [f"doc-{i:05d}" for i in range(len(rows))],
        "text": [text for _, text in rows],
        "source": [qual for qual, _ in rows],
    })
    pq.write_table(table, args.out, row_group_size=100)
    print(f"wrote {table.num_rows} documents to {args.out}")


if __name__ == "__main__":
    main()
