"""obafx.passes: the pipeline stages (trace, channel graph, coupling, importance, select, rewrite, verify)."""
