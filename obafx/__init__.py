"""obafx: structured pruning with Optimal Brain Apoptosis, as a torch.fx compiler pass pipeline."""
from obafx.api import compile_prune
from obafx.passes.errors import (BudgetError, ConfigError, ObafxError, PlanError, ScoreError, TraceError,
                                 UnsupportedOpError)
from obafx.report import Report, report

__all__ = [
    "compile_prune", "report", "Report",
    "ObafxError", "TraceError", "ConfigError", "BudgetError", "PlanError", "ScoreError", "UnsupportedOpError",
]
__version__ = "0.1.0"
