"""Graph: the Beam pipeline, labelled steps over work units.

The graph holds the names of the plan's shards, never the units themselves: ``ExpandPlan`` reads them
from the output folder on the workers, so the job request stays a few kilobytes however large the
corpus (Dataflow refuses requests over 20 MB). ``FindDuplicates`` reads every id to do, and the
output's, and hands ``ReadUnit`` the rows to reject as a side input: it finishes before any unit is
read for embedding. The only shuffle on the embedding path is over the units (``SpreadUnits``), so
runners can spread them over workers; everything after it fuses, and a unit is committed as soon as
its vectors exist (a shuffle between embedding and committing would hold every commit back until all
embedding was done).
"""

from __future__ import annotations

import apache_beam as beam

from transforms.checkpoint import UnitStore
from transforms.commit import CommitUnit
from transforms.dedup import FindDuplicates
from transforms.embed import EmbedUnit
from transforms.read import ReadUnit
from transforms.records import EmbedSettings


def build_graph(pipeline: beam.Pipeline, shards: list[str], settings: EmbedSettings):
    """Adds the steps to ``pipeline``; ``shards`` name the plan's unit files in the output folder.
    Returns the PCollection of done-marker records."""
    store = UnitStore(settings.output)
    units = (
        pipeline
        | "PlanShards" >> beam.Create(shards, reshuffle=False)
        | "ExpandPlan" >> beam.FlatMap(store.plan_units)
        | "SpreadUnits" >> beam.Reshuffle()
    )
    duplicates = units | "FindDuplicates" >> FindDuplicates(settings)
    return (
        units
        | "ReadUnit" >> beam.ParDo(ReadUnit(settings), duplicates=beam.pvalue.AsMultiMap(duplicates))
        | "EmbedUnit" >> beam.ParDo(EmbedUnit(settings))
        | "CommitUnit" >> beam.ParDo(CommitUnit(settings))
    )
