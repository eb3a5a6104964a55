"""Records: the plain, frozen values that flow between stages (settings, work units, unit payloads)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional
import numpy as np
import pyarrow as pa

from docembed.model.canaries import THRESHOLD as CANARY_THRESHOLD
from docembed.model.ref import ModelRef



@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """How to cut: ``size`` content tokens per window, ``overlap`` tokens shared by neighbours,
    ``boundary`` "token" or "sentence", and ``lookback``: how far before a full window a sentence
    boundary may end it."""

    size: int
    overlap: int
    boundary: str = "token"
    lookback: int = 0


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """Everything a worker needs, decided once on the launcher and shipped to every DoFn.

    Nothing in it is a path on the launcher's disk or a fact about the launcher's hardware: the
    model is a reference each worker resolves (``model_ref``), and ``device`` and ``precision`` are
    what was asked for (``auto`` allowed, or the output's own, adopted by the launcher), which each
    worker resolves against its own hardware. Fields listed in ``VECTOR_FIELDS`` change the vectors
    and therefore form the output's fingerprint; device and precision are the output's numerics,
    pinned by its first commit (``docembed.model.numerics``).
    """

    output: str
    model_ref: ModelRef
    dim: int
    max_seq_length: int
    pooling: str
    normalize: bool
    precision: str
    device: str
    prefix: str
    id_column: str
    text_column: str
    passthrough_columns: tuple[str, ...]
    min_batch_size: int
    max_batch_size: int
    max_batch_tokens: int
    run_id: str
    skip_bad_files: bool = False
    on_duplicate_id: str = "error"  # a repeated id fails the job (error) or is rejected (keep-first)
    max_model_errors: float = 0.01  # a unit whose documents fail more often than this raises instead
    # Input files whose URL carries credentials: the name units and records use -> the URL to read.
    # Records (markers, manifest, rejections, plan shards) and messages only ever hold the name.
    locations: dict = dataclasses.field(default_factory=dict)
    threads: int = 0  # CPU threads for the model per worker process; 0 leaves torch's default
    lock_token: str = ""  # the output lock this run holds; commits check it before each marker
    # Pass-through column types unified across input files at planning; parts are cast to them.
    passthrough_schema: Optional[pa.Schema] = None
    # Whole documents: "truncate" (first window only), "mean" (one vector from every window) or
    # "chunks" (one row per window); windows overlap by ``chunk_overlap`` tokens and, with
    # ``chunk_boundary`` "sentence", end at a sentence or paragraph end in their last ``boundary_lookback``.
    long_docs: str = "truncate"
    chunk_overlap: int = 0
    chunk_boundary: str = "token"
    boundary_lookback: int = 0
    chunk_text: bool = False  # chunks: store each window's text too
    # truncate: the tokens past the window tokenized and counted ("exact"), or estimated from their
    # characters ("estimate", for a GPU's host); reports only, never the vectors.
    count_dropped: str = "exact"
    truncate_dim: Optional[int] = None  # Matryoshka: the first N dimensions, re-normalised when normalised
    trust_remote_code: bool = False  # the model's folder may run its own Python code
    output_dtype: str = "float32"  # how the vectors are stored (docembed.vectors)
    # A worker whose vectors of the canary texts fall below this cosine to the output's refuses to commit.
    canary_threshold: float = CANARY_THRESHOLD
    # The dtype the model's weights were saved in (its config.json), read on the launcher: on CUDA,
    # ``auto`` precision is bf16 for a model saved in bf16 where the card has it (numerics.auto_precision).
    trained_dtype: Optional[str] = None

    VECTOR_FIELDS = (
        "model",
        "model_revision",
        "dim",
        "max_seq_length",
        "pooling",
        "normalize",
        "prefix",
        "text_column",
        "truncate_dim",
        "trust_remote_code",
        "output_dtype",
    )

    def locate(self, source: str) -> str:
        """The URL to read a unit's file from."""
        return self.locations.get(source, source)

    @property
    def model(self) -> str:
        """The model as the user named it."""
        return self.model_ref.name

    @property
    def model_revision(self) -> str:
        """What pins the model's files: a hub commit, or ``sha256:`` of the files."""
        return self.model_ref.revision

    WINDOW_FIELDS = ("chunk_overlap", "chunk_boundary", "boundary_lookback")

    def fingerprint(self) -> dict:
        """The settings that change the vectors, as a plain dict (stored in the manifest and in parts).
        How windows are cut matters only when documents are cut into windows."""
        fields = self.VECTOR_FIELDS + ("long_docs",) + (self.WINDOW_FIELDS if self.long_docs != "truncate" else ())
        return {name: getattr(self, name) for name in fields}

    def chunk_spec(self, window_size: int) -> ChunkSpec:
        """How to cut windows of ``window_size`` content tokens (the model's, known on workers)."""
        lookback = self.boundary_lookback if self.chunk_boundary == "sentence" else 0
        return ChunkSpec(window_size, self.chunk_overlap, self.chunk_boundary, lookback)


# Fingerprint fields added after outputs were first written, with the value those outputs implied.
FINGERPRINT_DEFAULTS = {"long_docs": "truncate", "truncate_dim": None, "trust_remote_code": False,
                        "output_dtype": "float32"}
# Fingerprint fields of older outputs that now live elsewhere: precision is part of the numerics.
FINGERPRINT_MOVED = ("precision",)


def with_defaults(fingerprint: dict) -> dict:
    """A stored fingerprint with fields it predates filled in, and fields that moved out of it
    dropped, so older outputs still resume."""
    return {k: v for k, v in {**FINGERPRINT_DEFAULTS, **fingerprint}.items() if k not in FINGERPRINT_MOVED}


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """A file plus a row range ``[row_start, row_end)``: the unit of work, commit and resume.

    ``unit_id`` is derived from the file's identity (URL and fingerprint) and the row range, never
    from a position in a list, so adding files or changing worker counts cannot renumber done work.
    ``row_groups`` are the Parquet row groups that cover the range.
    """

    source: str
    file_fingerprint: str
    row_start: int
    row_end: int
    row_groups: tuple[int, ...]
    text_bytes: int = 0  # estimated text size, for progress and ETAs; not part of the identity
    # --retry-rejects: a done unit whose rejections for these reasons are to be embedded again.
    retry: tuple[str, ...] = ()
    retry_rejects: str = ""  # the rejections file the retry starts from, as the run was planned
    cut: int = 0  # the --checkpoint-every its file was cut with (0 in markers written before it was kept)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def unit_id(self) -> str:
        return unit_id_for(self.source, self.file_fingerprint, self.row_start, self.row_end)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["row_groups"] = list(self.row_groups)
        data["unit_id"] = self.unit_id
        return data

    @classmethod
    def from_json(cls, data: dict) -> "WorkUnit":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["row_groups"] = tuple(kwargs["row_groups"])
        kwargs["retry"] = tuple(kwargs.get("retry", ()))
        return cls(**kwargs)


def unit_id_for(source: str, file_fingerprint: str, row_start: int, row_end: int) -> str:
    """A short, stable id: the same file identity and row range always give the same id."""
    key = json.dumps([source, file_fingerprint, row_start, row_end])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclasses.dataclass
class UnitRows:
    """Read -> Embed: a unit's rows to embed (``id`` string, text, pass-through, ``_row``) and its rejections."""

    unit: WorkUnit
    table: pa.Table
    rejects: pa.Table
    seconds: dict = dataclasses.field(default_factory=dict)  # time per stage so far: {"read": s}
    started_at: float = 0.0  # wall clock when the unit's reading began
    # A retry of rejections: {"marker": the unit's done-marker, "kept": its rejections not retried}.
    retry: Optional[dict] = None
    text_digest: str = ""  # of the unit's text column as read (``docembed.transforms.digest``), for its marker


@dataclasses.dataclass
class UnitEmbeddings:
    """Embed -> Commit: a unit's rows (documents, in input order) and their float32 vectors: one per
    document, or with ``chunks`` (``--long-docs chunks``) one per window, ``chunks`` saying which
    row (``row``) and where in its text (``chunk``, ``char_start``, ``char_end``) each one is."""

    unit: WorkUnit
    table: pa.Table
    rejects: pa.Table
    embeddings: np.ndarray
    truncated: int
    tokens: int
    padded_tokens: int
    batches: int
    seconds: dict = dataclasses.field(default_factory=dict)  # read, tokenize, forward (and write, at commit)
    # Per batch: [documents, real tokens, padded tokens, seconds in the model], for the run report.
    batch_stats: list = dataclasses.field(default_factory=list)
    started_at: float = 0.0  # wall clock when the unit's reading began
    chunks: Optional[pa.Table] = None
    windows: int = 0  # windows the model embedded for the kept documents (one each under truncate)
    text_tokens: int = 0  # tokens of the embedded documents' whole texts (special tokens excluded)
    dropped_tokens: int = 0  # truncate: of those, the tokens beyond the window that no vector covers
    numerics: dict = dataclasses.field(default_factory=dict)  # the worker's resolution (transforms.numerics)
    retry: Optional[dict] = None  # as UnitRows.retry
    quality: dict = dataclasses.field(default_factory=dict)  # the unit's statistics (transforms.quality)
    canaries: Optional[dict] = None  # the worker's canary record (transforms.canaries)
    text_digest: str = ""  # as UnitRows.text_digest
