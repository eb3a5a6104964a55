"""Graph: the Beam pipeline, five labelled steps over work units.

The only shuffle is over the small list of units (``SpreadUnits``), so runners can spread units over
workers. Everything after it fuses: a unit is committed as soon as its vectors exist. A shuffle
between embedding and committing would hold every commit back until all embedding was done.
"""

from __future__ import annotations

import apache_beam as beam

from transforms.commit import CommitUnit
from transforms.embed import EmbedUnit
from transforms.read import ReadUnit
from transforms.records import EmbedSettings, WorkUnit


def build_graph(pipeline: beam.Pipeline, units: list[WorkUnit], settings: EmbedSettings):
    """Adds the steps to ``pipeline``; returns the PCollection of done-marker records."""
    return (
        pipeline
        | "PlanUnits" >> beam.Create(units, reshuffle=False)
        | "SpreadUnits" >> beam.Reshuffle()
        | "ReadUnit" >> beam.ParDo(ReadUnit(settings))
        | "EmbedUnit" >> beam.ParDo(EmbedUnit(settings))
        | "CommitUnit" >> beam.ParDo(CommitUnit(settings))
    )
