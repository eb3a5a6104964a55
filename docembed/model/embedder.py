"""The worker's model: the narrow embedding contract every stage sees (``Embedder``).

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
worker resolved (``numerics``; read at that precision before it is moved to the device, fp32 as true
fp32), without importing sentence-transformers (seconds of start-up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from docembed.errors import ModelError
from docembed.model.card import ModelCard, ModelFolder, hf_tokenizer, private_copy, special_layout
from docembed.model.numerics import use_true_fp32
from docembed.model.quantize import quantize_int8
from docembed.model.stack import build_module
from docembed.store import faults

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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
        use_true_fp32()  # as numerics.resolve records it, for an Embedder made without resolving
        folder = ModelFolder.read(folder)
        self._read_tokenizer(folder, max_seq_length, prefix, trust_remote_code)
        self._card = folder.card(self.max_seq_length, self.overhead, truncate_dim)
        self.truncate_dim = truncate_dim
        self.normalize = self._card.has_normalize if normalize is None else normalize
        self.device, self.precision, self._torch = device, precision, torch
        # Pooling that leaves the prompt out skips the prompt's tokens after the specials in front.
        self.model, self.after = _load_modules(folder, device, precision, len(self._head) if prefix else 0,
                                               trust_remote_code)
        faults.hit("loaded", target=self.model)  # tests make the weights differ here, as another build would

    def _read_tokenizer(self, folder: ModelFolder, max_seq_length: int | None, prefix: str, trust_remote_code: bool):
        """The tokenizer as sentence-transformers sets it up (transformers' AutoTokenizer, the folder's
        window and lower-casing), used through its fast core; where the specials and prefix go; padding."""
        hf = hf_tokenizer(folder.base, folder.sbert.get("max_seq_length"), trust_remote_code)
        self.max_seq_length = folder.window(max_seq_length, hf.model_max_length)
        self.tokenizer = private_copy(hf.backend_tokenizer, folder.sbert.get("do_lower_case", False))
        self._head, self._tail = special_layout(self.tokenizer, prefix)
        self.overhead = len(self._head) + len(self._tail)  # tokens an empty text has: specials, prefix
        self.window_size = self.max_seq_length - self.overhead
        self._pad = hf.pad_token_id if hf.pad_token_id is not None else 0
        self._left = hf.padding_side == "left"
        self._type_ids = "token_type_ids" in hf.model_input_names

    def card(self) -> ModelCard:
        """What the loaded model is, in the terms ``card.describe_model`` gives the launcher."""
        return self._card

    @property
    def frees_host(self) -> bool:
        """Whether the forward pass leaves the host's cores free (an accelerator computes it while the
        host thread waits with the GIL released): host work is then best done beside it."""
        return self.device != "cpu"

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


def _load_modules(folder: ModelFolder, device: str, precision: str, prompt_length: int, trust_remote_code: bool):
    """(transformers' model, the modules after it) on ``device`` at ``precision``. Each is made at its
    precision before it is moved: a model read in fp32 and cast on the GPU needs twice its fp16 size
    there first, so one that fits at fp16 could fail to load. int8 is read in fp32 and quantized (CPU)."""
    import torch
    import transformers
    from transformers import AutoModel

    dtype = torch.float32 if precision == "int8" else getattr(torch, _PRECISIONS[precision])
    transformers.logging.disable_progress_bar()  # it would garble docembed's own progress bar
    try:
        # Read straight at ``dtype`` (a checkpoint stored in another precision is converted as it is read).
        model = AutoModel.from_pretrained(folder.base, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        if precision == "int8":
            quantize_int8(model)
        model.to(device)  # short of device memory: the model cannot be loaded, as before
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder.base}: {exc}") from exc
    after = [build_module(s, folder.root, prompt_length).to(dtype).to(device)
             for s in folder.specs[1:] if s.kind != "Normalize"]
    return model, after
