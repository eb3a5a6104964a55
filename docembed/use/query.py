"""Query: embed texts exactly as an output's vectors were made, on this machine, without Beam.

Input: an output folder (any fsspec URL) and texts. Output: one vector per text in the output's
stored form, (n, width) in its dtype, ready to compare with its ``embedding`` column
(``docembed query``, ``docembed.embed_queries``).

Everything is read from the output (``recipe``), nothing from defaults: the model at its pinned
revision (files checked against the pin), the window, the truncation dimension, normalisation, the
stored dtype and, for int8/uint8, the calibration every part was bucketed with. Texts longer than the
window keep their first window, as documents do under ``--long-docs truncate``.

The prompt (``query_prompt``): a query gets the model's own ``query`` prompt where the model has one
(as sentence-transformers' ``encode_query`` does: E5's "query: " where documents got "passage: ",
BGE's search instruction where documents got none); otherwise the prefix the documents got, so a
symmetric model embeds both sides alike. ``as_documents=True`` always uses the documents' prefix:
the text's vector is then the one a run would store for it; ``prefix`` gives one outright (E5 run with
``--prefix "passage: "`` and no prompts in its configuration: ``prefix="query: "``).

The numerics (``query_numerics``): the output's device and precision where this machine can run
them, else the CPU at fp32 (a GPU-made fp16 output queried on a laptop: cosine to the GPU's vectors
stays above 0.999, the canaries' floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from docembed import vectors
from docembed.errors import DeviceUnavailable, ModelError, UsageError
from docembed.model import numerics
from docembed.model.card import ModelCard, prompts
from docembed.text import plural
from docembed.use.recipe import Recipe, load_model, model_folder, read_recipe

BATCH = 64  # queries per forward pass: length-sorted, so padding stays small


@dataclasses.dataclass
class Queries:
    """Embedded queries: ``vectors`` (n, width) in the output's dtype, ``floats`` (n, dim) float32
    before quantization, and how they were made (the prompt, the numerics, how many were cut)."""

    vectors: np.ndarray
    floats: np.ndarray
    prefix: str
    prompt: str
    numerics: dict
    truncated: int


def embed_queries(output_url: str, texts: list[str], as_documents: bool = False, device: str = "auto",
                  precision: str = "auto", prefix: str | None = None) -> np.ndarray:
    """Vectors for ``texts`` made as the output's were, in its stored form.

    Args:
        output_url: the ``--output`` of a docembed run (local path or fsspec URL).
        texts: the queries.
        as_documents: embed them with the documents' prefix, not the model's query prompt.
        device, precision: where and how to run the model ("auto": the output's where this machine
            can, else the CPU at fp32).
        prefix: the queries' prefix, in place of the one chosen above (a model whose query prompt is
            not in its configuration: E5 without prompts, run with ``--prefix "passage: "``).

    Returns:
        (len(texts), width) in the output's ``output_dtype`` (width: its dimension, or bytes of bits
        for binary and ubinary), comparable with its ``embedding`` column.
    """
    return embed(read_recipe(output_url), texts, as_documents, device, precision, prefix).vectors


def embed(recipe: Recipe, texts: list[str], as_documents: bool = False, device: str = "auto",
          precision: str = "auto", prefix: str | None = None) -> Queries:
    """``embed_queries``, with how the vectors were made."""
    texts = _checked(texts)
    here = query_numerics(recipe.numerics, device, precision)
    if prefix is not None:
        prompt = "given"
    else:
        folder_prompts = prompts(model_folder(recipe.model_ref))
        prefix, prompt = query_prompt(recipe.fingerprint["prefix"], folder_prompts, as_documents)
    embedder = load_model(recipe.model_ref, here["device"], here["precision"], **recipe.model_settings(prefix))
    _check_card(embedder, recipe, prefix)
    floats, truncated = embed_texts(embedder, texts)
    stored = vectors.quantize(floats, recipe.output_dtype, recipe.ranges)
    return Queries(stored, floats, prefix, prompt, here, truncated)


def query_prompt(documents_prefix: str, model_prompts: dict[str, str], as_documents: bool = False) -> tuple[str, str]:
    """(the prefix for queries, which it is: "query" (the model's query prompt) or "documents' prefix")."""
    if not as_documents and "query" in model_prompts:
        return model_prompts["query"], "query"
    return documents_prefix, "documents' prefix"


def query_numerics(made: dict | None, device: str, precision: str) -> dict:
    """This machine's numerics for the queries: as asked, where ``auto`` means the output's own
    device and precision where they run here, else the CPU at fp32. An explicit request this machine
    cannot honour is refused (``numerics.resolve``)."""
    made = made or {}
    if device != "auto" or precision != "auto":
        return numerics.resolve(device, precision)
    try:
        return numerics.resolve(made.get("device", "cpu"), made.get("precision", "fp32"))
    except (DeviceUnavailable, UsageError):
        return numerics.resolve("cpu", "fp32")


def embed_texts(embedder, texts: list[str]) -> tuple[np.ndarray, int]:
    """(float32 vectors, how many texts were longer than the window): each text's first window,
    embedded in length-sorted batches of ``BATCH``, returned in the texts' order."""
    ids = embedder.encode(texts)
    windows = [t[:embedder.window_size] for t in ids]
    order = np.argsort([len(w) for w in windows], kind="stable")
    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        out[rows] = embedder.forward(embedder.prepare_ids([windows[i] for i in rows]))
    return out, sum(len(t) > embedder.window_size for t in ids)


def _checked(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise UsageError("no query texts given")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UsageError(f"query {bad[0] + 1} of {len(texts)} is empty or not text ({texts[bad[0]]!r}); "
                         "a run rejects such documents, so there is nothing to compare it with")
    return texts


def _check_card(embedder, recipe: Recipe, prefix: str) -> None:
    """The loaded model must be the one the output describes (dimension, window, pooling)."""
    fp = recipe.fingerprint
    described = ModelCard(recipe.dim, fp["max_seq_length"], fp["pooling"], fp["normalize"], 0)
    differences = embedder.card().differences(described)
    if differences:
        raise ModelError(f"the model loaded here is not the one that made {recipe.url} ({'; '.join(differences)}): "
                         "install the docembed and libraries the output was made with")


def query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="docembed query",
        description="Embed query texts exactly as the output's vectors were made (its model at the pinned "
                    "revision, prompt, window, dimensions, normalisation, dtype and calibration) and print one "
                    "JSON line per text: {\"text\", \"embedding\"}, the embedding in the output's stored form.")
    p.add_argument("--output", required=True, help="the output folder (local path or fsspec URL) of a docembed run")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="query texts")
    p.add_argument("--file", default=None, help="a UTF-8 text file of queries, one per line (- for stdin)")
    p.add_argument("--as-documents", action="store_true",
                   help="embed with the documents' prefix, not the model's query prompt: the vector a run "
                        "would store for the text")
    p.add_argument("--prefix", default=None,
                   help="the queries' prefix, in place of the model's query prompt or the documents' prefix "
                        "(for a model whose query prompt is not in its configuration, e.g. --prefix 'query: ')")
    p.add_argument("--to", default=None, metavar="FILE.parquet",
                   help="write the vectors to this Parquet file (text, embedding) instead of printing them")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run the model (default: the output's device if this machine has it, else the CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
                   help="at what precision (default: the output's where it runs here, else fp32)")
    return p


def read_texts(args) -> list[str]:
    """The positional texts, then the lines of ``--file`` (blank lines skipped)."""
    texts = list(args.texts)
    if args.file:
        handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with handle:
            texts += [line.rstrip("\n") for line in handle if line.strip()]
    if not texts:
        raise UsageError("give query texts as arguments, or --file FILE with one per line")
    return texts


def query_command(argv: list[str]) -> int:
    """``docembed query``: the vectors as JSON lines on stdout (or a Parquet file), how they were made
    on stderr."""
    args = query_parser().parse_args(argv)
    texts = read_texts(args)
    recipe = read_recipe(args.output)
    made = embed(recipe, texts, args.as_documents, args.device, args.precision, args.prefix)
    print(describe(recipe, made, len(texts)), file=sys.stderr)
    if args.to:
        write_parquet(args.to, texts, made.floats, recipe)
        print(f"docembed: wrote {args.to}", file=sys.stderr)
        return 0
    for text, vector in zip(texts, made.vectors):
        print(json.dumps({"text": text, "embedding": vector.tolist()}))
    return 0


def describe(recipe: Recipe, made: Queries, count: int) -> str:
    """One line: the model, prompt, numerics and stored form the queries were made with."""
    fp = recipe.fingerprint
    cut = f"; {made.truncated} of {count} cut to the {fp['max_seq_length']}-token window" if made.truncated else ""
    return (f"docembed: {plural(count, 'query', 'queries')} embedded with {fp['model']} "
            f"({fp['model_revision']}), prompt {made.prompt} {made.prefix!r}, "
            f"{numerics.describe_numerics(made.numerics)}, stored as {recipe.output_dtype} x {recipe.width}{cut}")


def write_parquet(path: str, texts: list[str], floats: np.ndarray, recipe: Recipe) -> None:
    """``text`` and ``embedding`` (the output's column type, quantized as its parts are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = vectors.column(floats, recipe.output_dtype, recipe.dim, recipe.ranges)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "embedding": column}), path)
