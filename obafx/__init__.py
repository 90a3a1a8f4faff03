"""obafx: structured pruning with Optimal Brain Apoptosis, as a torch.fx compiler pass pipeline."""
from obafx.api import compile_prune
from obafx.hf import causal_lm_loss, hf_options, to_hf
from obafx.io import load, save
from obafx.latency_timing import LatencyOptions
from obafx.passes.errors import (BudgetError, ConfigError, ObafxError, PathError, PlanError, ScoreError,
                                 TraceError, UnsupportedOpError)
from obafx.passes.hessian_blocks import hessian_blocks
from obafx.passes.hvp import parameter_scores
from obafx.report import Report, report

__all__ = [
    "compile_prune", "causal_lm_loss", "to_hf", "hf_options", "report", "Report", "LatencyOptions", "parameter_scores", "hessian_blocks", "save", "load",
    "ObafxError", "TraceError", "ConfigError", "BudgetError", "PlanError", "PathError", "ScoreError",
    "UnsupportedOpError",
]
from obafx.version import __version__

_LAZY = {  # loaded on first use, so that `import obafx` does not import torch_pruning or torch.distributed
    "OBAImportance": "obafx.tp_interop", "CriterionImportance": "obafx.tp_interop",
    "distributed_importance": "obafx.distributed", "init_distributed": "obafx.distributed",
    "shard": "obafx.distributed", "all_reduce_scores": "obafx.distributed",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obafx' has no attribute {name!r}")
