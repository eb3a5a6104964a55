"""Errors: the typed failures docembed reports to users as one line, without a traceback."""


class DocembedError(Exception):
    """Base class: the CLI prints the message and exits with code 2."""


class UsageError(DocembedError):
    """A flag or a combination of flags that cannot work."""


class InputError(DocembedError):
    """The input cannot be read as asked: no files, missing columns, a changed file."""


class OutputError(DocembedError):
    """The output folder cannot be used: not writable, or holding an incompatible plan."""


class FingerprintMismatch(OutputError):
    """The output folder was made with settings that give different vectors."""


class DeviceUnavailable(DocembedError):
    """A device was asked for explicitly and is not there; docembed never falls back silently."""


class ModelError(DocembedError):
    """The model cannot be found or loaded."""
