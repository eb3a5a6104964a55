"""Model card: what the launcher may know of a model without its weights.

``describe_model`` reads, from a model folder's configuration files and ``tokenizer.json`` only, what
the launcher needs for the settings and the fingerprint (``ModelCard``: dimension, window, pooling,
normalisation): neither torch nor transformers is imported, no weights are loaded and no device is
touched. Each worker checks the model it loaded against it (``embedder.Embedder.card``). ``prompts``
are the model's own named prompts (``--prompt-name``). A window longer than the model's position
table holds is refused here (``ModelFolder.window``), not met as a failure on every long document.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from docembed.errors import ModelError, UsageError
from docembed.model.stack import Spec, read_json, read_stack

# Model types whose position ids count on from the padding id (transformers' RoBERTa-style
# ``create_position_ids_from_input_ids``): the first pad_token_id + 1 rows of the position table are
# never a token's, so a table of 514 holds 512 tokens. A window past the table is no error in the
# tokenizer: on CUDA it is a device-side assert that poisons the worker's process, on the CPU an IndexError.
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                              "data2vec-text", "ibert", "roberta-prelayernorm", "luke", "markuplm", "xmod"})


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What the settings and the fingerprint need to know of a model; ``overhead`` is the tokens an
    empty text has (special tokens and the prefix), so ``window_size`` is the text a window holds."""

    dim: int
    max_seq_length: int
    pooling: str
    has_normalize: bool
    overhead: int

    @property
    def window_size(self) -> int:
        return self.max_seq_length - self.overhead

    def differences(self, other: "ModelCard") -> list[str]:
        """The fingerprint's fields (dimension, window, pooling) in which two cards differ."""
        return [f"{f}: {getattr(self, f)!r} != {getattr(other, f)!r}"
                for f in ("dim", "max_seq_length", "pooling") if getattr(self, f) != getattr(other, f)]


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A sentence-transformers folder's configuration: the module stack and the transformer's files."""

    root: Path
    base: Path
    specs: list[Spec]
    config: dict
    sbert: dict

    @classmethod
    def read(cls, folder: str | Path) -> "ModelFolder":
        folder = Path(folder)
        entries = read_json(folder / "modules.json")
        base = folder / (entries[0].get("path", "") if entries else "")
        config = read_json(base / "config.json")
        if config is None:
            raise ModelError(f"{base} has no config.json: not a transformers or sentence-transformers model folder")
        specs = read_stack(folder, entries, config.get("hidden_size", 0))
        return cls(folder, base, specs, config, read_json(base / "sentence_bert_config.json") or {})

    @property
    def own_code(self) -> str | None:
        """The model class the folder's configuration names in its own code (``auto_map``), if any:
        transformers runs it only with ``trust_remote_code``, and without it may load a stock class of
        the same ``model_type`` instead (other vectors, no error)."""
        auto_map = self.config.get("auto_map") or {}
        return auto_map.get("AutoModel") if isinstance(auto_map, dict) else None

    @property
    def trained_dtype(self) -> str | None:
        """The dtype the transformer's weights were saved in (``dtype``, ``torch_dtype`` before
        transformers 5), e.g. "bfloat16": ``numerics.resolve``'s ``trained``."""
        dtype = self.config.get("dtype") or self.config.get("torch_dtype")
        return dtype if isinstance(dtype, str) else None

    @property
    def positions(self) -> int | None:
        """The most tokens the model's position table holds: ``max_position_embeddings``, less the rows
        RoBERTa-style models reserve (``OFFSET_POSITIONS``); None where the configuration names none."""
        table = self.config.get("max_position_embeddings")
        if not isinstance(table, int):
            return None
        if self.config.get("model_type") in OFFSET_POSITIONS:
            pad = self.config.get("pad_token_id")
            return table - ((pad if isinstance(pad, int) else 1) + 1)
        return table

    def window(self, asked: int | None, model_max_length: int) -> int:
        """The window as sentence-transformers sets it: asked, else the folder's own, else the
        tokenizer's limit capped at the model's position table. A window the table cannot hold is
        refused here, on the launcher (``describe_model``), before any work."""
        positions = self.positions
        own = self.sbert.get("max_seq_length")
        window = int(asked or own or min(model_max_length, positions or model_max_length))
        if positions is not None and window > positions:
            raise self._too_long(window, positions, asked)
        return window

    def _too_long(self, window: int, positions: int, asked: int | None) -> Exception:
        table = self.config["max_position_embeddings"]
        held = f"{positions} tokens" + (f" (max_position_embeddings {table}, less {table - positions} rows its "
                                         "position ids skip)" if positions != table else "")
        what = (f"--max-seq-length {window}" if asked
                else f"the window of {window} tokens its sentence_bert_config.json sets")
        message = (f"{what} is more than the model in {self.root} can take: its position table holds {held}; "
                   f"use --max-seq-length {positions} or less")
        return UsageError(message) if asked else ModelError(message)

    def card(self, window: int, overhead: int, truncate_dim: int | None = None) -> ModelCard:
        """The card; with ``truncate_dim`` (Matryoshka), the dimension kept."""
        after = self.specs[1:]
        dim = next((s.dimension for s in reversed(after) if s.dimension), self.config.get("hidden_size"))
        if truncate_dim and truncate_dim > dim:
            raise ModelError(f"--truncate-dim {truncate_dim} is more than the model's {dim} dimensions")
        return ModelCard(int(truncate_dim or dim), window, pooling_description(after),
                         any(s.kind == "Normalize" for s in after), overhead)


def describe_model(folder: str | Path, max_seq_length: int | None = None, prefix: str = "",
             truncate_dim: int | None = None) -> ModelCard:
    """The ModelCard of the model in ``folder``, read as a worker loads it, but from its configuration
    and ``tokenizer.json`` alone: a launcher needs neither the weights, torch, nor an accelerator."""
    model = ModelFolder.read(folder)
    tokenizer, model_max_length = _launcher_tokenizer(model.base)
    head, tail = special_layout(private_copy(tokenizer, model.sbert.get("do_lower_case", False)), prefix)
    return model.card(model.window(max_seq_length, model_max_length), len(head) + len(tail), truncate_dim)


def prompts(folder: str | Path) -> dict[str, str]:
    """The model's own named prompts (``config_sentence_transformers.json``), e.g. {"query": "query: "}."""
    return (read_json(Path(folder) / "config_sentence_transformers.json") or {}).get("prompts") or {}


def _launcher_tokenizer(base: Path):
    """(the fast tokenizer, its model_max_length) from ``tokenizer.json``; a folder without one (a
    slow tokenizer's files only) is read through transformers, which converts it."""
    if (base / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        limit = (read_json(base / "tokenizer_config.json") or {}).get("model_max_length")
        return Tokenizer.from_file(str(base / "tokenizer.json")), int(limit or 1e9)
    hf = hf_tokenizer(base, None, False)
    return hf.backend_tokenizer, hf.model_max_length


def hf_tokenizer(base: Path, window: int | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code,
                                           **({"model_max_length": window} if window else {}))
    except Exception as exc:  # a missing or broken tokenizer: the model cannot run
        raise ModelError(f"cannot load the tokenizer of the model in {base}: {exc}") from exc
    if not getattr(hf, "is_fast", False):
        raise ModelError(f"the tokenizer in {base} has no fast (Rust) version; docembed needs one")
    return hf


def pooling_description(specs: list[Spec]) -> str:
    """The layers after the transformer (pooling, dense, ...), normalisation left out, as a stable
    string: part of the fingerprint."""
    return " > ".join(s.describe() for s in specs if s.kind != "Normalize")


def special_layout(tokenizer, prefix: str) -> tuple[list[int], list[int]]:
    """The token ids a fast tokenizer (``tokenizers.Tokenizer``) puts before and after a text's own
    tokens (special tokens and the prefix), found by locating a probe word's tokens in its full encoding."""
    full = tokenizer.encode(prefix + "hello").ids
    for probe in ("hello", " hello"):
        body = tokenizer.encode(probe, add_special_tokens=False).ids
        for i in range(len(full) - len(body), -1, -1):
            if full[i:i + len(body)] == body:
                return list(full[:i]), list(full[i + len(body):])
    raise ModelError(f"cannot tell where this tokenizer puts its special tokens (it encodes {full}); "
                     "docembed builds the model's inputs from token ids and needs that")


def private_copy(tokenizer, lowercase: bool):
    """A private copy of the fast tokenizer with no truncation or padding (docembed truncates and pads
    token ids itself), safe to use beside the original in another thread. ``lowercase``: the folder's
    ``do_lower_case``, added to the normaliser where the tokenizer does not lowercase already."""
    from tokenizers import Tokenizer, normalizers

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    if lowercase and copy.normalizer is not None and copy.normalizer.normalize_str("A") != "a":
        copy.normalizer = normalizers.Sequence([copy.normalizer, normalizers.Lowercase()])
    elif lowercase and copy.normalizer is None:
        copy.normalizer = normalizers.Lowercase()
    return copy
