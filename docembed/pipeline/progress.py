"""Progress: a tqdm bar fed from the checkpoints while the pipeline runs, and the end-of-run summary.

The bar polls the same records ``status`` reads (done-marker names and running units' progress),
so it needs no channel from the workers and works with several worker processes.
"""

from __future__ import annotations

import threading

from tqdm import tqdm

from docembed.pipeline.plan import describe_outside
from docembed.pipeline.admin.report import coverage
from docembed.store.admin import OutputAdmin
from docembed.text import plural

POLL_S = 1.0


class ProgressBar:
    """Progress in text bytes (a characters count known from Parquet metadata before reading), so
    the ETA follows the text remaining at a recent rate (tqdm's moving average), not a document count
    that misleads on skewed corpora. Documents done are shown beside it. A context manager."""

    def __init__(self, output: OutputAdmin, units: dict[str, tuple[int, int]], done: list[str]):
        self._output = output
        self._units = units  # unit_id -> (rows, text bytes)
        self._docs_total = sum(rows for rows, _ in units.values())
        initial = sum(units[u][1] for u in done)
        self._bar = tqdm(total=sum(b for _, b in units.values()), initial=initial, unit="B", unit_scale=True,
                         desc="embedding", smoothing=0.3, mininterval=POLL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()
        self._bar.close()

    def _poll(self):
        while not self._stop.wait(POLL_S):
            self._update()

    def _update(self):
        try:
            done = self._output.done_ids()
            running = {uid: p for uid, p in self._output.progress().items() if uid not in done}
        except OSError:  # a transient listing error must not kill the run; the next poll retries
            return
        docs = sum(self._units.get(uid, (0, 0))[0] for uid in done)
        text = sum(self._units.get(uid, (0, 0))[1] for uid in done)
        for uid, progress in running.items():
            rows, size = self._units.get(uid, (0, 0))
            docs += progress["docs"]
            text += int(size * progress["docs"] / rows) if rows else 0
        self._bar.set_postfix_str(f"{docs}/{self._docs_total} docs", refresh=False)
        if text > self._bar.n:
            self._bar.update(text - self._bar.n)


def format_summary(summary: dict) -> str:
    s = summary
    rate = s["processed"] / s["seconds"] if s["seconds"] > 0 else 0.0
    lines = [
        f"docembed: output in {s['output']}",
        f"  documents  {s['input_rows']} in input: {s['embedded']} embedded this run, "
        f"{s['skipped']} skipped (already done), {s['rejected']} rejected"
        + (f"; {plural(s['rows'], 'chunk row')} written" if s["long_docs"] == "chunks" else ""),
        *(f"  {label:<10} {line}" for label, line in coverage(
            s["long_docs"], s["embedded"], s["truncated"], s["windows"], s["text_tokens"], s["dropped_tokens"],
            s["max_seq_length"], s.get("dropped_estimated", False))),
        f"  accounted  {plural(s['input_rows'], 'input row')} = {s['total_embedded']} embedded + "
        f"{s['total_rejected']} rejected, over all runs into this output"
        + ("" if s["input_rows"] == s["total_embedded"] + s["total_rejected"] else " (units still to do)"),
        f"  units      {s['units_committed']} committed this run, {s['units_skipped']} already done, "
        f"{s['units_total']} in all",
        f"  time       {s['seconds']:.1f} s, {rate:.1f} docs/s",
    ]
    if s["rejected"]:
        reasons = ", ".join(f"{n} {r}" for r, n in s["rejected_by_reason"].items())
        lines.append(f"  rejected   {reasons}; rows and messages in {s['output'].rstrip('/')}/_rejects/")
    for skipped in s["skipped_files"]:
        lines.append(f"  skipped    {skipped['url']} (--skip-bad-files): {skipped['error']}")
    lines += [f"  repaired   {r}; redone by this run" if r.startswith("unit ") else f"  repaired   {r}"
              for r in s.get("repairs", [])]
    for group in s.get("outside_inputs", []):
        if group.get("pruned"):
            lines.append(f"  pruned     {describe_outside(group)} were deleted (--prune-removed)")
        else:
            advice = "; --prune-removed deletes them" if group["gone"] else ""
            lines.append(f"  {'removed' if group['gone'] else 'elsewhere':<10} {describe_outside(group)} stay in "
                         f"the output{advice}")
    if s.get("retried"):
        r = s["retried"]
        lines.append(f"  retried    {plural(r['tried'], 'rejected row')} ({', '.join(r['reasons'])}) of "
                     f"{plural(r['units'], 'unit')}: "
                     f"{r['embedded']} embedded now, {r['tried'] - r['embedded']} rejected again")
    if s.get("cleaned"):
        names = ", ".join(c.rsplit("/", 1)[-1] for c in s["cleaned"][:5]) + (" ..." if len(s["cleaned"]) > 5 else "")
        lines.append(f"  cleaned    {plural(len(s['cleaned']), 'file')} without a done-marker removed (left by "
                     f"interrupted attempts, or not docembed's): {names}")
    return "\n".join(lines)


def format_dry_run(d: dict) -> str:
    s = d["settings"]
    where = "resolved by each worker on its own hardware" if "auto" in (s.device, s.precision) \
        else "checked by each worker on its own hardware"
    lines = [
        "docembed: dry run; nothing was written or submitted",
        f"  input      {plural(d['files'], 'file')}, {plural(d['units'], 'unit')}, {plural(d['rows'], 'row')}, "
        f"{d['text_bytes'] / 1e6:.1f} MB of text",
        f"  output     {s.output}: {plural(d['units_done'], 'unit')} ({plural(d['rows_done'], 'row')}) already done, "
        f"{plural(d['units_todo'], 'unit')} ({plural(d['rows_todo'], 'row')}, {d['text_bytes_todo'] / 1e6:.1f} MB of "
        "text) to do"
        + (f", {d['superseded_units']} to redo (their input files changed)" if d["superseded_units"] else ""),
        f"  model      {s.model} ({s.model_ref.kind}, {s.model_revision}): dim {s.dim}, window {s.max_seq_length}, "
        f"normalize {s.normalize}",
        f"  workers    {d['runner']}: --device {s.device}, --precision {s.precision}, {where}",
    ]
    for skipped in d["skipped_files"]:
        lines.append(f"  skipped    {skipped['url']} (--skip-bad-files): {skipped['error']}")
    lines += [f"  damaged    {r}; a run would redo it" for r in d["repairs"]]
    lines += [f"  lock       {lock_line(d['lock'])}"] if d.get("lock") else []
    return "\n".join(lines)


def lock_line(lock: dict) -> str:
    """What the output's lock (``lock.lock_state``) means for a run started now."""
    if lock["live"]:
        return (f"held by a running run ({lock['holder']}): a run started now would exit 75; wait for it, or "
                "pass --wait-for-lock SECONDS")
    return f"left by a run that is no longer running ({lock['holder']}; {lock['stale']}): a run takes it over"
