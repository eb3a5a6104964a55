"""The launcher's side: runs once per job, on the machine that submits it; never on a worker.

In the order a run goes: ``options`` and ``jobs`` (flags and job files) -> ``plan`` (work units from the
input's Parquet footers) -> ``settings`` (the model pinned and described: ``pin``) -> ``lock`` ->
``resume`` and ``guard`` (where the run starts in an existing output) -> ``graph`` and ``execute`` (the
Beam job) -> ``admin.manifest`` and ``admin.report``; ``run`` strings these together for ``docembed
run``, ``api`` for the two PTransforms. ``interrupt`` and ``progress`` watch the job. ``admin/`` holds
the commands on an output (status, verify, report) and the repairs a run makes.
"""
