"""Commands on an output, finished or running (launcher side): ``status``, ``verify``, ``report``; and
the bookkeeping a run keeps of itself: ``manifest`` and ``repair`` (damaged markers, parts, canaries)."""
