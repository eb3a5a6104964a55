"""Model: the narrow embedding contract, and what the launcher may know of a model without its weights.

``Embedder`` is all a stage sees of a model:

- ``dim`` and ``max_seq_length``;
- ``token_lengths(texts)``: tokens per text including special tokens, not capped at the window;
  ``count_tokens(texts)``: whole texts' tokens, special tokens excluded, safe in a second thread;
- ``embed(texts) -> float32 array (n, dim)``, row order preserved, L2-normalised when asked;
  it is ``forward(prepare(texts))``, split so that tokenizing the next batch can overlap the model;
- for whole-document modes: ``encode_with_offsets(texts)`` (tokens and character offsets, no
  special tokens), ``window_size`` (content tokens that fit the window) and ``prepare_ids(windows)``
  (model inputs built from token ids, with the special and prefix tokens around them).

It wraps a sentence-transformers model so that pooling, dense layers and normalisation come from the
model's own configuration. It runs at the device and precision a worker resolved (``numerics``).

``describe`` reads, from a model folder's configuration files and tokenizer only, what the launcher
needs for the settings and the fingerprint (``ModelCard``: dimension, window, pooling, normalisation):
no weights are loaded and no device is touched. Each worker checks the model it loaded against it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from transforms import faults
from transforms.errors import ModelError
from transforms.quantize import quantize_int8

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_COUNT_CHUNK = 512


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


def describe(folder: str | Path, max_seq_length: int | None = None, prefix: str = "") -> ModelCard:
    """The ModelCard of the sentence-transformers model in ``folder``, read as sentence-transformers
    would load it (modules.json, the transformer's config and tokenizer, the modules after it), but
    without the transformer's weights: a launcher needs neither them nor an accelerator."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    modules = _modules(folder)
    base = folder / modules[0]["path"]
    config = AutoConfig.from_pretrained(base)
    sbert = _read_json(base / "sentence_bert_config.json") or {}
    own_window = sbert.get("max_seq_length")
    tokenizer = AutoTokenizer.from_pretrained(base, **({"model_max_length": own_window} if own_window else {}))
    window = max_seq_length or own_window or min(tokenizer.model_max_length,
                                                 getattr(config, "max_position_embeddings", tokenizer.model_max_length))
    after = [_load_module(folder, m) for m in modules[1:]] if len(modules) > 1 else _default_pooling(config)
    dim = next((d for d in map(_dimension, reversed(after)) if d is not None), config.hidden_size)
    head, tail = special_layout(tokenizer, prefix)
    return ModelCard(int(dim), int(window), pooling_description(after), any(map(_is_normalize, after)),
                     len(head) + len(tail))


def _modules(folder: Path) -> list[dict]:
    """modules.json's entries; a plain transformers folder has none, and sentence-transformers then
    adds mean pooling, as ``_default_pooling`` does."""
    return _read_json(folder / "modules.json") or [{"path": "", "type": "Transformer"}]


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def _load_module(folder: Path, entry: dict):
    """A module after the transformer (pooling, dense, normalise), loaded by its own class."""
    from sentence_transformers.util.misc import import_module_class

    try:
        module_class = import_module_class(entry["type"])
        return module_class.load(str(folder), subfolder=entry["path"])
    except Exception as exc:  # an unknown class or a broken config: the model cannot be described
        raise ModelError(f"cannot read module {entry['type']} of the model in {folder}: {exc}") from exc


def _default_pooling(config) -> list:
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    return [Pooling(config.hidden_size, "mean")]


def _dimension(module) -> int | None:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension", "get_word_embedding_dimension"):
        method = getattr(module, name, None)
        if callable(method):
            return method()
    return None


def pooling_description(modules) -> str:
    """The layers after the transformer (pooling, dense, ...), normalisation left out, as a stable
    string: part of the fingerprint."""
    described = []
    for module in modules:
        if _is_normalize(module):
            continue
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        described.append(f"{type(module).__name__}{json.dumps(config, sort_keys=True)}")
    return " > ".join(described)


def special_layout(tokenizer, prefix: str) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after a text's own tokens (special tokens and the
    prefix), found by locating a probe word's tokens in its full encoding."""
    full = tokenizer(prefix + "hello")["input_ids"]
    for probe in ("hello", " hello"):
        body = tokenizer(probe, add_special_tokens=False)["input_ids"]
        for i in range(len(full) - len(body), -1, -1):
            if full[i:i + len(body)] == body:
                return list(full[:i]), list(full[i + len(body):])
    raise ModelError(f"cannot tell where this tokenizer puts its special tokens (it encodes {full}); "
                     "--long-docs mean and chunks need that: use --long-docs truncate")


class Embedder:
    """A sentence-transformers model behind the narrow contract above."""

    def __init__(self, folder: str | Path, device: str, precision: str, normalize: bool | None,
                 max_seq_length: int | None = None, prefix: str = "", threads: int = 0):
        """``device`` and ``precision`` as a worker resolved them (``numerics.resolve``)."""
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()  # it would garble docembed's own progress bar

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        try:
            self.model = SentenceTransformer(str(folder), device=device)
        except Exception as exc:
            raise ModelError(f"cannot load model from {folder}: {exc}") from exc
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.model.eval()
        if precision == "int8":
            quantize_int8(self.model)
        elif precision != "fp32":
            self.model.to(getattr(torch, _PRECISIONS[precision]))
        self.device = device
        self.precision = precision
        self.prefix = prefix
        self.has_normalize = any(_is_normalize(m) for m in self.model)
        self.normalize = self.has_normalize if normalize is None else normalize
        self.dim = int(self.model.get_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self.tokenizer = self.model.tokenizer
        self._torch = torch
        self._head, self._tail = special_layout(self.tokenizer, prefix)
        self.overhead = len(self._head) + len(self._tail)  # tokens an empty text has: specials, prefix
        self.window_size = self.max_seq_length - self.overhead
        self._counter = _counting_copy(self.tokenizer)
        # Non-tensor entries the model's own preprocessing adds (sentence-transformers 6 adds the
        # modality), so that inputs built from ids take the same path through the modules.
        self._extras = {k: v for k, v in self.model.preprocess(["a"]).items() if not hasattr(v, "shape")}

    def card(self) -> ModelCard:
        """What the loaded model is, in the terms ``describe`` gives the launcher."""
        return ModelCard(self.dim, self.max_seq_length, self.pooling(), self.has_normalize, self.overhead)

    def pooling(self) -> str:
        """The model's layers after the transformer (pooling, dense, ...), as a stable string."""
        return pooling_description(list(self.model)[1:])

    def token_lengths(self, texts: list[str], limit: int) -> np.ndarray:
        """Tokens per text (special tokens included), counted up to ``limit``; in chunks, so that a
        unit's token ids never all sit in memory as Python lists at once."""
        lengths = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), _COUNT_CHUNK):
            chunk = texts[start:start + _COUNT_CHUNK]
            encoded = self.tokenizer(
                [self.prefix + t for t in chunk], add_special_tokens=True, truncation=True,
                max_length=limit, return_attention_mask=False, return_token_type_ids=False,
            )
            lengths[start:start + len(chunk)] = [len(ids) for ids in encoded["input_ids"]]
        return lengths

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """Tokens of each text, without special tokens, prefix or truncation. It runs on a private
        copy of the tokenizer, so it is safe beside ``prepare`` in another thread (a tokenizer
        whose truncation settings change under a running call fails with "Already borrowed")."""
        encoded = self._counter.encode_batch(texts, add_special_tokens=False)
        return np.array([len(e.ids) for e in encoded], dtype=np.int64)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(token ids, character offsets) of each text, without special tokens, prefix or truncation."""
        # verbose=False: whole documents are longer than the model's window on purpose; no warning.
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"]))

    def prepare_ids(self, windows: list) -> dict:
        """Padded model inputs for windows of content token ids (each at most ``window_size``),
        wrapped in the special and prefix tokens exactly as the tokenizer wraps a text."""
        ids = [self._head + np.asarray(w).tolist() + self._tail for w in windows]
        features = dict(self.tokenizer.pad({"input_ids": ids}, return_tensors="pt"))
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = self._torch.zeros_like(features["input_ids"])
        features.update(self._extras)
        return self._pinned(features)

    def release_memory(self) -> None:
        """After a failed batch: give cached CUDA memory back before the halves are retried."""
        if self.device == "cuda":
            self._torch.cuda.empty_cache()

    def prepare(self, texts: list[str]) -> dict:
        """Tokenize a batch into padded model inputs (ST's own preprocessing), in host memory; pinned
        on CUDA so the copy to the GPU can overlap other work."""
        return self._pinned(self.model.preprocess(texts, prompt=self.prefix or None))

    def _pinned(self, features: dict) -> dict:
        """On CUDA, host tensors in pinned memory, so the copy to the GPU can overlap other work."""
        if self.device != "cuda":
            return features
        return {k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in features.items()}

    def forward(self, features: dict) -> np.ndarray:
        """float32 (batch, dim) for prepared inputs, row order preserved."""
        ids = features.get("input_ids")
        faults.hit("forward", ids.numel() if hasattr(ids, "numel") else 0)
        with self._torch.inference_mode():
            features = {k: (v.to(self.device, non_blocking=True) if hasattr(v, "to") else v)
                        for k, v in features.items()}
            for module in self.model:
                if _is_normalize(module):
                    continue
                features = module(features)
            vectors = features["sentence_embedding"].float()
            if self.normalize:
                vectors = self._torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.cpu().numpy()

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dim), one row per text in order."""
        return self.forward(self.prepare(texts))


def _counting_copy(tokenizer):
    """A private copy of the fast tokenizer with no truncation or padding, for exact counts."""
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter


def _is_normalize(module) -> bool:
    return type(module).__name__ == "Normalize"
