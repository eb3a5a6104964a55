"""Use: working with a finished (or growing) output on the user's own machine, without Beam.

``recipe`` reads how an output was made (its manifest's fingerprint, pinned model, numerics and
int8/uint8 calibration); ``query`` embeds texts exactly as the output's vectors were made
(``docembed query``, ``docembed.embed_queries``); ``search`` finds the nearest stored vectors,
streaming the parts (``docembed search``); ``convert`` writes a float output again in another dtype
without re-embedding (``docembed convert``).
"""
