"""Model: the narrow embedding contract, and what the launcher may know of a model without its weights.

``Embedder`` is all a stage sees of a model:

- ``dim``, ``max_seq_length``, ``overhead`` (the special and prefix tokens around a text) and
  ``window_size`` (content tokens that fit the window);
- ``encode(texts)``: each text's token ids, without special tokens, prefix or truncation (one
  tokenization per document: the same ids give the lengths to sort by and the model's inputs);
  ``encode_with_offsets(texts)``: the same with character offsets, for the whole-document modes;
- ``prepare_ids(windows)``: padded model inputs for windows of content ids (each at most
  ``window_size``), wrapped in the special and prefix tokens exactly as the tokenizer wraps a text;
- ``forward(features) -> float32 array (n, dim)``, row order preserved, L2-normalised when asked;
  ``embed(texts)`` is ``forward(prepare_ids(first windows of encode(texts)))``.

It runs a sentence-transformers model folder (``modules``: transformer, pooling, dense, normalise, read
from the folder's own configuration) with transformers' ``AutoModel``, at the device and precision a
worker resolved (``numerics``), without importing sentence-transformers (seconds of start-up).

``describe`` reads, from a model folder's configuration files and ``tokenizer.json`` only, what the
launcher needs for the settings and the fingerprint (``ModelCard``: dimension, window, pooling,
normalisation): neither torch nor transformers is imported, no weights are loaded and no device is
touched. Each worker checks the model it loaded against it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from docembed.store import faults
from docembed.errors import ModelError
from docembed.model.stack import Spec, build, read_json, read_stack
from docembed.model.quantize import quantize_int8

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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
class _Folder:
    """A sentence-transformers folder's configuration: the module stack and the transformer's files."""

    root: Path
    base: Path
    specs: list[Spec]
    config: dict
    sbert: dict

    @classmethod
    def read(cls, folder: str | Path) -> "_Folder":
        folder = Path(folder)
        entries = read_json(folder / "modules.json")
        base = folder / (entries[0].get("path", "") if entries else "")
        config = read_json(base / "config.json")
        if config is None:
            raise ModelError(f"{base} has no config.json: not a transformers or sentence-transformers model folder")
        specs = read_stack(folder, entries, config.get("hidden_size", 0))
        return cls(folder, base, specs, config, read_json(base / "sentence_bert_config.json") or {})

    def window(self, asked: int | None, model_max_length: int) -> int:
        """The window as sentence-transformers sets it: asked, else the folder's own, else the
        tokenizer's limit capped at the model's position table."""
        positions = self.config.get("max_position_embeddings", model_max_length)
        return int(asked or self.sbert.get("max_seq_length") or min(model_max_length, positions))

    def card(self, window: int, overhead: int, truncate_dim: int | None = None) -> ModelCard:
        """The card; with ``truncate_dim`` (Matryoshka), the dimension kept."""
        after = self.specs[1:]
        dim = next((s.dimension for s in reversed(after) if s.dimension), self.config.get("hidden_size"))
        if truncate_dim and truncate_dim > dim:
            raise ModelError(f"--truncate-dim {truncate_dim} is more than the model's {dim} dimensions")
        return ModelCard(int(truncate_dim or dim), window, pooling_description(after),
                         any(s.kind == "Normalize" for s in after), overhead)


def describe(folder: str | Path, max_seq_length: int | None = None, prefix: str = "",
             truncate_dim: int | None = None) -> ModelCard:
    """The ModelCard of the model in ``folder``, read as a worker loads it, but from its configuration
    and ``tokenizer.json`` alone: a launcher needs neither the weights, torch, nor an accelerator."""
    model = _Folder.read(folder)
    tokenizer, model_max_length = _launcher_tokenizer(model.base)
    head, tail = special_layout(_private_copy(tokenizer, model.sbert.get("do_lower_case", False)), prefix)
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
    hf = _hf_tokenizer(base, None, False)
    return hf.backend_tokenizer, hf.model_max_length


def _hf_tokenizer(base: Path, window: int | None, trust_remote_code: bool):
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


class Embedder:
    """A sentence-transformers model folder behind the narrow contract above."""

    def __init__(self, folder: str | Path, device: str, precision: str, normalize: bool | None,
                 max_seq_length: int | None = None, prefix: str = "", threads: int = 0,
                 truncate_dim: int | None = None, trust_remote_code: bool = False):
        """``device`` and ``precision`` as a worker resolved them (``numerics.resolve``); ``truncate_dim``
        keeps the first dimensions (Matryoshka), re-normalised when the vectors are normalised."""
        import torch

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        folder = _Folder.read(folder)
        self._read_tokenizer(folder, max_seq_length, prefix, trust_remote_code)
        self._card = folder.card(self.max_seq_length, self.overhead, truncate_dim)
        self.truncate_dim = truncate_dim
        self.normalize = self._card.has_normalize if normalize is None else normalize
        self.device, self.precision, self._torch = device, precision, torch
        # Pooling that leaves the prompt out skips the prompt's tokens after the specials in front.
        self.model, self.after = _load_modules(folder, device, precision, len(self._head) if prefix else 0,
                                               trust_remote_code)
        faults.hit("loaded", target=self.model)  # tests make the weights differ here, as another build would

    def _read_tokenizer(self, folder: _Folder, max_seq_length: int | None, prefix: str, trust_remote_code: bool):
        """The tokenizer as sentence-transformers sets it up (transformers' AutoTokenizer, the folder's
        window and lower-casing), used through its fast core; where the specials and prefix go; padding."""
        hf = _hf_tokenizer(folder.base, folder.sbert.get("max_seq_length"), trust_remote_code)
        self.max_seq_length = folder.window(max_seq_length, hf.model_max_length)
        self.tokenizer = _private_copy(hf.backend_tokenizer, folder.sbert.get("do_lower_case", False))
        self._head, self._tail = special_layout(self.tokenizer, prefix)
        self.overhead = len(self._head) + len(self._tail)  # tokens an empty text has: specials, prefix
        self.window_size = self.max_seq_length - self.overhead
        self._pad = hf.pad_token_id if hf.pad_token_id is not None else 0
        self._left = hf.padding_side == "left"
        self._type_ids = "token_type_ids" in hf.model_input_names

    def card(self) -> ModelCard:
        """What the loaded model is, in the terms ``describe`` gives the launcher."""
        return self._card

    @property
    def dim(self) -> int:
        """Dimensions of the vectors ``forward`` returns (after ``truncate_dim``)."""
        return self._card.dim

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens, prefix or truncation."""
        return [e.ids for e in self._encode(texts)]

    def count(self, texts: list[str]) -> np.ndarray:
        """Tokens of each text, without special tokens, prefix or truncation. Safe beside ``encode``
        in another thread: the tokenizer's settings never change after loading."""
        return np.fromiter((len(e) for e in self._encode(texts)), dtype=np.int64, count=len(texts))

    def _encode(self, texts: list[str]):
        fast = getattr(self.tokenizer, "encode_batch_fast", None)  # no offsets: tokenizers >= 0.21
        return (fast or self.tokenizer.encode_batch)(texts, add_special_tokens=False)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(token ids, character offsets) of each text, without special tokens, prefix or truncation."""
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encoded]

    def prepare_ids(self, windows: list) -> dict:
        """Padded model inputs (torch tensors in host memory) for windows of content token ids, each
        wrapped in the special and prefix tokens; pinned on CUDA so the copy can overlap other work."""
        torch = self._torch
        head, tail = self._head, self._tail
        sizes = np.fromiter((len(w) for w in windows), dtype=np.int64, count=len(windows)) + self.overhead
        width = int(sizes.max()) if len(windows) else 0
        ids = np.full((len(windows), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(windows), width), dtype=np.int64)
        for row, (window, size) in enumerate(zip(windows, sizes)):
            start = width - size if self._left else 0
            body = start + len(head)
            ids[row, start:body] = head
            ids[row, body:body + len(window)] = window
            ids[row, body + len(window):start + size] = tail
            mask[row, start:start + size] = 1
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self._type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        if self.device == "cuda":
            features = {k: v.pin_memory() for k, v in features.items()}
        return features

    def release_memory(self) -> None:
        """After a failed batch: give cached CUDA memory back before the halves are retried."""
        if self.device == "cuda":
            self._torch.cuda.empty_cache()

    def forward(self, features: dict) -> np.ndarray:
        """float32 (batch, dim) for prepared inputs, row order preserved."""
        return self.forward_with_norms(features)[0]

    def forward_with_norms(self, features: dict) -> tuple[np.ndarray, np.ndarray]:
        """``forward``'s vectors, and each one's L2 norm before normalisation (a quality signal: the
        norms move when the input's nature or the model's numbers do)."""
        torch = self._torch
        faults.hit("forward", features["input_ids"].numel())
        with torch.inference_mode():
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
            hidden = self.model(**inputs, return_dict=True).last_hidden_state
            state = {"token_embeddings": hidden, "attention_mask": inputs["attention_mask"]}
            for module in self.after:
                state = module(state)
            vectors = state["sentence_embedding"].float()[:, :self.truncate_dim]
            norms = torch.linalg.vector_norm(vectors, dim=1)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.cpu().numpy(), norms.cpu().numpy()

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dim), one row per text in order, each from its first window."""
        return self.forward(self.prepare_ids([ids[:self.window_size] for ids in self.encode(texts)]))


def _load_modules(folder: _Folder, device: str, precision: str, prompt_length: int, trust_remote_code: bool):
    """(transformers' model, the modules after it) on ``device`` at ``precision``. The model is read in
    fp32 (a checkpoint stored in fp16 is widened) and reduced after, as asked."""
    import torch
    import transformers
    from transformers import AutoModel

    transformers.logging.disable_progress_bar()  # it would garble docembed's own progress bar
    try:
        model = AutoModel.from_pretrained(folder.base, dtype=torch.float32,
                                          trust_remote_code=trust_remote_code).to(device).eval()
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder.base}: {exc}") from exc
    after = [build(s, folder.root, prompt_length).to(device) for s in folder.specs[1:] if s.kind != "Normalize"]
    if precision == "int8":
        quantize_int8(model)
    elif precision != "fp32":
        dtype = getattr(torch, _PRECISIONS[precision])
        model.to(dtype)
        after = [m.to(dtype) for m in after]
    return model, after


def _private_copy(tokenizer, lowercase: bool):
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
