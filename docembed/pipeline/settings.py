"""Settings: what one run's options resolve to (``EmbedSettings``), decided on the launcher before any work.

The model is pinned to a reference every worker resolves and described from its configuration files
(dimension, window, pooling) without its weights; the prompt, the batch token budget and the long-
document settings are fixed here. Device and precision are checked as asked; each worker resolves them
on its own hardware.
"""

from __future__ import annotations

import time
import uuid

from docembed.errors import UsageError
from docembed.model.card import ModelFolder, describe_model, prompts
from docembed.model.numerics import check_here, check_request
from docembed.pipeline import options as opts_mod
from docembed.pipeline.options import EmbedOptions
from docembed.pipeline.pin import pin_model
from docembed.records import EmbedSettings


def resolve_settings(opts: EmbedOptions, passthrough_schema=None, threads: int = 0,
                     local_runner: bool = True, locations: dict | None = None) -> EmbedSettings:
    """EmbedSettings for this run: the model pinned to a reference every worker resolves, and
    described from its configuration files (dimension, window, pooling) without loading its weights.
    Device and precision stay as asked; each worker resolves them on its own hardware."""
    check_request(opts.device, opts.precision)
    if local_runner:
        check_here(opts.device, opts.precision)
    ref, folder = pin_model(opts.model, opts.model_revision, local_runner)
    model = ModelFolder.read(folder)
    check_own_code(model, opts.model, opts.trust_remote_code)
    prefix = prompt_text(folder, opts.prompt_name) if opts.prompt_name else opts.prefix
    card = describe_model(folder, opts.max_seq_length, prefix, opts.truncate_dim)
    budget = batch_budget(opts.max_batch_tokens, opts.min_batch_size, card.max_seq_length)
    return EmbedSettings(
        output=opts.output, model_ref=ref, dim=card.dim, max_seq_length=card.max_seq_length, pooling=card.pooling,
        normalize=card.has_normalize if opts.normalize is None else opts.normalize,
        precision=opts.precision, device=opts.device, prefix=prefix, id_column=opts.id_column,
        text_column=opts.text_column, passthrough_columns=opts_mod.passthrough(opts),
        min_batch_size=opts.min_batch_size, max_batch_size=opts.max_batch_size, max_batch_tokens=budget,
        run_id=new_run_id(),
        skip_bad_files=opts.skip_bad_files, on_duplicate_id=opts.on_duplicate_id, locations=locations,
        max_model_errors=opts.max_model_errors,
        passthrough_schema=passthrough_schema, threads=threads,
        truncate_dim=opts.truncate_dim, trust_remote_code=opts.trust_remote_code, output_dtype=opts.output_dtype,
        canary_threshold=opts.canary_threshold, trained_dtype=model.trained_dtype,
        **opts_mod.window_settings(opts, card.window_size),
    )


def new_run_id() -> str:
    """A run's id: a timestamp first, so that ids sort by time, and a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_own_code(model: ModelFolder, name: str, trusted: bool) -> None:
    """A model that ships its own code runs only with ``--trust-remote-code``: refused here, before any
    work, rather than failing on every worker (or loading a stock class that makes other vectors)."""
    code = model.own_code
    if code and not trusted:
        raise UsageError(f"--model {name} runs its own Python code ({code}, named by its config.json's auto_map): "
                         "read it, then pass --trust-remote-code to run it")


def batch_budget(max_batch_tokens: int | None, min_batch_size: int, window: int) -> int:
    """Padded tokens per batch: as asked, else enough for ``min_batch_size`` full windows; a budget
    that cannot hold them is refused."""
    budget = max_batch_tokens or min_batch_size * window
    if budget < min_batch_size * window:
        raise UsageError(f"--max-batch-tokens {budget} is below --min-batch-size x window "
                         f"({min_batch_size} x {window}); raise it or lower --min-batch-size")
    return budget


def prompt_text(folder, name: str) -> str:
    """The text of the model's own prompt ``name`` (``--prompt-name``); a name it lacks is refused,
    with the names it has."""
    known = prompts(folder)
    if name not in known:
        raise UsageError(f"--prompt-name {name}: the model has no such prompt (its prompts: "
                         f"{', '.join(sorted(known)) or 'none'})")
    return known[name]
