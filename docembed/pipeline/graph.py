"""Graph: the run's two Beam pipelines, labelled steps over work units.

A run is two jobs on the same runner, one after the other:

- the duplicate-id job (``build_dedup_graph``): every id to do, and the output's as the run was
  planned, grouped by id; each unit's repeats written to the plan (``docembed.transforms.dedup``). Under
  ``--on-duplicate-id error`` it fails on any repeat, before a single document is embedded. (On local
  runners the launcher does the same steps in its own process: ``dedup.find_here``.)
- the embedding job (``build_graph``): read -> embed -> commit, one work unit at a time.

Both name the plan's shards, never the units themselves: ``ExpandPlan`` reads them from the output
folder on the workers, so the job request stays a few kilobytes however large the corpus (Dataflow
refuses requests over 20 MB). The only shuffle on the embedding path is over the units
(``SpreadUnits``), so runners can spread them over workers; everything after it fuses, and a unit is
committed as soon as its vectors exist (a shuffle between embedding and committing would hold every
commit back until all embedding was done).

On Dask (``JobPlan.in_graph``) the units are put in the graph itself, one per Dask partition:
Beam's DaskRunner partitions only what ``Create`` holds (its Reshuffle does nothing) and evaluates a
partition stage by stage, so a shard read on a worker would be one task that holds every unit and
commits them all at the end.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from docembed.store.units import UnitStore
from docembed.transforms.commit import CommitUnit
from docembed.transforms.dedup import FindDuplicates
from docembed.transforms.embed import EmbedUnit
from docembed.transforms.read import ReadUnit
from docembed.records import EmbedSettings, WorkUnit


@dataclasses.dataclass
class JobPlan:
    """What a run's jobs read, as the launcher wrote it to ``_plans/<run_id>/``: the shards of the
    units to do and of the output's files (``docembed.store.admin.snapshot``), and those records as the
    launcher holds them; ``in_graph``: put the records in the graph, one per task, not the shards."""

    units: list[str]
    output: list[str]
    records: tuple[list[WorkUnit], list[dict]]
    in_graph: bool = False


def build_graph(pipeline: beam.Pipeline, plan: JobPlan, settings: EmbedSettings):
    """Adds the embedding job's steps to ``pipeline``. Returns the PCollection of done-marker records."""
    return (
        _units(pipeline, plan, settings)
        | "ReadUnit" >> beam.ParDo(ReadUnit(settings))
        | "EmbedUnit" >> beam.ParDo(EmbedUnit(settings))
        | "CommitUnit" >> beam.ParDo(CommitUnit(settings))
    )


def build_dedup_graph(pipeline: beam.Pipeline, plan: JobPlan, settings: EmbedSettings):
    """Adds the duplicate-id job's steps to ``pipeline``. Returns the PCollection of its counts."""
    store = UnitStore(settings.output)
    if plan.in_graph:  # one record per Dask partition: a shuffle partition then holds about one unit's ids
        output = pipeline | "OutputFiles" >> beam.Create(plan.records[1], reshuffle=False)
    else:
        output = (pipeline
                  | "OutputShards" >> beam.Create(plan.output, reshuffle=False)
                  | "ExpandOutput" >> beam.FlatMap(store.plan_records)
                  | "SpreadOutput" >> beam.Reshuffle())
    return (_units(pipeline, plan, settings), output) | "FindDuplicates" >> FindDuplicates(settings)


def _units(pipeline: beam.Pipeline, plan: JobPlan, settings: EmbedSettings):
    if plan.in_graph:
        return pipeline | "Units" >> beam.Create(plan.records[0], reshuffle=False)
    return (pipeline
            | "PlanShards" >> beam.Create(plan.units, reshuffle=False)
            | "ExpandPlan" >> beam.FlatMap(UnitStore(settings.output).plan_units)
            | "SpreadUnits" >> beam.Reshuffle())
