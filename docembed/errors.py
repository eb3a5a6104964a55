"""Errors: the typed failures docembed reports to users as one line, without a traceback."""


class DocembedError(Exception):
    """Base class: the CLI prints the message and exits with ``exit_code``."""

    exit_code = 2


class UsageError(DocembedError):
    """A flag or a combination of flags that cannot work."""


class InputError(DocembedError):
    """The input cannot be read as asked: no files, missing columns, a changed file."""


class OutputError(DocembedError):
    """The output folder cannot be used: not writable, or holding an incompatible plan."""


class DamagedRecord(OutputError):
    """A bookkeeping file of the output folder cannot be read (cut short, or not docembed's)."""


class CommitError(OutputError):
    """Publishing a unit's part, rejections or marker failed (disk full, permission, object store)."""


class FingerprintMismatch(OutputError):
    """The output folder was made with settings that give different vectors."""


class DeviceUnavailable(DocembedError):
    """A worker cannot honour the device or precision asked for (no CUDA, no native bf16, no VNNI).
    Raised in the worker's ``setup``, naming its host: docembed never falls back silently."""


class NumericsMismatch(DocembedError):
    """A worker would commit vectors made at another device or precision than the output's."""


class CanaryMismatch(DocembedError):
    """A worker's vectors of the canary texts differ from those pinned in the output (another GPU
    type, build or library version than the output was made with): it refuses to commit."""

    exit_code = 1


class ModelError(DocembedError):
    """The model cannot be found or loaded."""


class ModelFailed(DocembedError):
    """On a worker: the model failed in a way that is not one document's doing (it fails on a
    known-good probe text too, or on more of a unit's documents than --max-model-errors allows). The
    unit raises, so nothing of it is committed; Beam retries the bundle and in the end fails the job."""

    exit_code = 1


class DeviceFailed(ModelFailed):
    """On a worker: the accelerator raised an error that leaves its context unusable (a CUDA
    device-side assert, an illegal memory access: every later CUDA call of the process fails too).
    Raised at once, without retrying the batch in halves; the process's model is dropped, but only a
    new worker process gets a working device again."""


class NonFiniteVectors(ModelFailed):
    """On a worker: the model gave NaN or infinite vectors for a whole batch, or for the probe text too
    (fp16 overflowing in a model trained in bf16, typically): a precision problem, not the documents'.
    ``rows``: the unit's document positions concerned (``embed_unit`` names their ids)."""

    def __init__(self, message: str, rows=()):
        super().__init__(message)
        self.rows = [int(r) for r in rows]


class JobFailed(DocembedError):
    """The Beam job itself failed (a write error, a worker crash): exit code 1. What was committed
    stays committed, and rerunning the same command resumes from it."""

    exit_code = 1


class LockHeld(DocembedError):
    """Another run holds the output folder's lock. Exit code 75 (EX_TEMPFAIL, "try again later"), so
    that a scheduler can tell "still running" from a configuration error (2)."""

    exit_code = 75


class UnitAbandoned(Exception):
    """On a worker: the run was told to stop and the grace period is over; the unit in hand is left
    uncommitted for the rerun. Not an error: the DoFn catches it."""


class Interrupted(DocembedError):
    """The run got SIGTERM or SIGINT and stopped after the unit in hand (or abandoned it)."""

    exit_code = 143
