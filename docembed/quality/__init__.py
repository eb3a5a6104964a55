"""Quality: ``stats``, the statistics each unit carries in its marker (lengths, blanks, vector norms and
cosines), and ``drift``, those of one run against earlier runs' (used by report and status)."""
