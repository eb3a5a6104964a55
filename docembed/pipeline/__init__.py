"""docembed driver: plan work units, guard the output, run the Beam graph, report."""
