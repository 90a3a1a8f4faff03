"""The scoring machinery every per-parameter criterion shares (hvp.py's OBA scores, criteria.py's baselines,
group_scores.py's group-exact scores): which parameters are scored, running the model functionally on detached
parameters, reading batches, chunking them, and averaging per-batch scores.

The user's model is never modified: parameters enter ``torch.func.functional_call`` as detached views, buffers as
clones, training flags are restored, ``.grad`` is never written.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from .errors import ConfigError, ScoreError
from .ops import MHA_PARAMETERS, PRUNABLE_TYPES, scored_attributes  # noqa: F401 (re-exported)

Scores = dict[str, Tensor]

def prunable_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s prunable parameters, in ``named_parameters()`` order.

    In: any ``nn.Module``. Out: names of every weight and bias of Conv1d/2d/3d, ConvTranspose1d/2d/3d and
    Linear modules, plus nn.MultiheadAttention's in_proj_weight/in_proj_bias/q,k,v_proj_weight and out_proj
    weight/bias, plus (in a torch.export graph, which has no such modules) the weights and biases its aten
    linear / conv / addmm nodes read. A parameter shared by several modules appears once, under its first name.
    """
    owned = {id(getattr(m, a)) for m in model.modules() for a in scored_attributes(m)  # the op table says which
             if isinstance(getattr(m, a, None), nn.Parameter)}
    if isinstance(model, torch.fx.GraphModule):
        owned |= {id(p) for p in _graph_layer_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in owned]


_ATEN = torch.ops.aten
# Layer ops of torch.export graphs (no nn.Linear modules there) -> argument positions of their weight and bias.
_GRAPH_LAYERS = {_ATEN.linear.default: (1, 2), _ATEN.conv1d.default: (1, 2), _ATEN.conv2d.default: (1, 2),
                 _ATEN.conv3d.default: (1, 2), _ATEN.conv1d.padding: (1, 2), _ATEN.conv2d.padding: (1, 2),
                 _ATEN.addmm.default: (2, 0)}


def _graph_layer_parameters(gm: torch.fx.GraphModule) -> list:
    """The parameters an exported graph's linear / conv / addmm (GPT-2's Conv1D) nodes read as weight or bias."""
    found = []
    for node in gm.graph.nodes:
        for i in _GRAPH_LAYERS.get(node.target, ()) if node.op == "call_function" else ():
            arg = node.args[i] if i < len(node.args) else None
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and _is_parameter(gm, arg.target):
                found.append(gm.get_parameter(arg.target))
    return found


def _is_parameter(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


# ------------------------------------------------------------------------------------------ functional setup

class Setup:
    """Everything one scoring call needs to run ``model`` functionally.

    ``theta``: prunable name -> detached view of the parameter (the point, and the HVP direction).
    ``fixed``: every other parameter (detached) and buffer (cloned, so running stats never change).
    """

    def __init__(self, model: nn.Module, names: list[str], loss_fn: Optional[Callable], train: bool):
        self.model, self.names, self.train = model, names, train
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        params = dict(model.named_parameters())
        self.theta = {n: params[n].detach() for n in names}
        self.fixed: dict[str, Optional[Tensor]] = {n: p.detach() for n, p in params.items() if n not in self.theta}
        self.fixed.update({n: b.clone() for n, b in model.named_buffers()})
        # Train-mode BatchNorm normalises with batch statistics; its running-stat update is a side effect
        # that torch.func refuses (it mutates a captured tensor). Without running stats it skips it.
        norms = [p for p, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats]
        stats = {f"{p}.{b}".lstrip(".") for p in norms for b in ("running_mean", "running_var",
                                                                    "num_batches_tracked")}
        self.fixed.update({k: None for k in stats & self.fixed.keys() if train})
        self.device, self.dtype = self.theta[names[0]].device, self.theta[names[0]].dtype
        self.backend: Optional[tuple[str, bool]] = None
        self.warned_targets = False

    def forward(self, theta: Scores, args: tuple):
        """The network output at parameters ``theta`` on inputs ``args``."""
        return functional_call(self.model, {**self.fixed, **theta}, args)

    def loss(self, output, targets) -> Tensor:
        """``loss_fn(output, targets)``, checked to be a scalar."""
        value = self.loss_fn(output, targets)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ScoreError(f"loss_fn returned {shape}, not a scalar tensor. What to do: reduce the loss to a "
                             f"scalar (e.g. reduction='mean'); scores assume the batch loss is a mean over samples")
        return value

    def predict(self, args: tuple) -> Tensor:
        """The model's own argmax predictions (class dim 1) on ``args``, used when a batch has no targets."""
        if not self.warned_targets:
            warnings.warn("obafx scoring: the batches carry no targets, so each batch is scored against the "
                          "model's own argmax predictions. Pass (inputs, targets) pairs to use labels.",
                          stacklevel=4)
            self.warned_targets = True
        with torch.no_grad():
            out = self.forward(self.theta, args)
        if not isinstance(out, Tensor) or out.dim() < 2:
            raise ScoreError("cannot derive targets: the model output is not an (N, C, ...) tensor of logits. "
                             "What to do: pass (inputs, targets) pairs")
        return out.argmax(dim=1)


def resolve_names(model: nn.Module, params: Optional[Iterable[str]]) -> list[str]:
    """The names to score: ``params`` checked against the model, or the default prunable set."""
    if params is None:
        names = prunable_parameter_names(model)
        if not names:
            raise ConfigError("the model has no Conv/Linear/MultiheadAttention parameters to score. What to do: "
                              "pass params=[...] naming the parameters to score")
        return names
    names, known = list(dict.fromkeys(params)), dict(model.named_parameters())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"params names {unknown or 'nothing'}; the model's parameters are "
                          f"{list(known)[:12]}{' ...' if len(known) > 12 else ''}. What to do: pass names from "
                          f"model.named_parameters()")
    return names


@contextlib.contextmanager
def scoring(model: nn.Module, names_or_none, loss_fn, train: bool, chunk_size: Optional[int] = None):
    """Check the arguments, put ``model`` in the requested mode for the call, restore every flag after."""
    check_chunking(model, train, chunk_size)
    names, params = resolve_names(model, names_or_none), dict(model.named_parameters())
    for n in names:  # second-order scores in half precision overflow and lose the curvature
        if params[n].dtype in (torch.float16, torch.bfloat16):
            raise ConfigError(f"parameter '{n}' is {params[n].dtype}, too coarse for Hessian scores. What to do: "
                              f"score a float32 copy (copy.deepcopy(model).float()) with float32 inputs")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield Setup(model, names, loss_fn, train)
    finally:
        for m, flag in flags:
            m.training = flag


# ---------------------------------------------------------------------------------------------- batches

def split_batch(batch) -> tuple[tuple, Optional[Tensor]]:
    """``(inputs, targets)`` -> (model args, targets); a bare tensor or tuple of inputs -> (args, None).

    A list/tuple of length 2 is read as (inputs, targets); pass ``(inputs, None)`` to have a two-input batch
    scored against the model's own predictions.
    """
    if isinstance(batch, Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 2:
            inputs, targets = batch
            return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), targets
        return tuple(batch), None
    raise ScoreError(f"a batch is a {type(batch).__name__}. What to do: pass an iterable of (inputs, targets) "
                     f"pairs or of input tensors")


def check_batch(setup: Setup, args: tuple, targets) -> None:
    """Inputs on the model's device and, if floating, in the model's dtype."""
    for t in [a for a in args if isinstance(a, Tensor)] + ([targets] if isinstance(targets, Tensor) else []):
        if t.device != setup.device:
            raise ConfigError(f"the model is on {setup.device} but a batch tensor is on {t.device}. What to do: "
                              f"move the batches to the model's device (x.to(device))")
        if t.is_floating_point() and t.dtype != setup.dtype and t is not targets:
            raise ConfigError(f"the model is {setup.dtype} but an input is {t.dtype}. What to do: cast the "
                              f"inputs to {setup.dtype}")


def chunks(args: tuple, targets, size: Optional[int]):
    """Split a batch along dim 0 into pieces of at most ``size`` samples: yields (args, targets, weight)
    with weight = piece size / batch size (so a mean-reduced loss's derivatives add up exactly)."""
    tensors = [a for a in args if isinstance(a, Tensor) and a.dim() > 0]
    n = tensors[0].shape[0] if tensors else 1
    if size is None or n <= size:
        yield args, targets, 1.0
        return
    for start in range(0, n, size):
        part = slice(start, min(start + size, n))
        cut = tuple(a[part] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a for a in args)
        yield cut, (targets[part] if isinstance(targets, Tensor) else targets), (part.stop - start) / n


def chunked(setup: Setup, args: tuple, targets, chunk_size: Optional[int], fn) -> tuple[Scores, ...]:
    """``fn(args, targets) -> tuple of dicts`` on the whole batch, computed chunk by chunk and combined
    with weights chunk size / batch size. Targets missing from the batch are predicted per chunk."""
    total: list = []
    for a, t, w in chunks(args, targets, chunk_size):
        values = fn(a, setup.predict(a) if t is None else t)
        total = [{n: v * w + (total[i][n] if total else 0.0) for n, v in d.items()} for i, d in enumerate(values)]
    return tuple(total)


def progress_bar(batches, enabled: bool, desc: str):
    """``batches`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return batches
    from tqdm.auto import tqdm  # lazy: only progress bars need it
    return tqdm(batches, desc=desc, total=len(batches) if hasattr(batches, "__len__") else None)


def accumulate(setup: Setup, batches, per_batch, progress: bool, desc: str) -> Scores:
    """Mean over batches of ``per_batch(args, targets) -> dict`` (equal weight per batch), float64 sums,
    returned in the parameters' dtype; NaN/inf raise ScoreError naming the parameter."""
    sums: Scores = {}
    count = 0
    for batch in progress_bar(batches, progress, desc):
        args, targets = split_batch(batch)
        check_batch(setup, args, targets)
        for n, v in per_batch(args, targets).items():  # float64 sums: float32 scores lose nothing
            sums[n] = v.detach().double() + sums[n] if n in sums else v.detach().double()
        count += 1
    if not count:
        raise ScoreError("batches was empty. What to do: pass at least one (inputs, targets) batch")
    out = {n: (s / count).to(setup.theta[n].dtype) for n, s in sums.items()}
    for n, v in out.items():
        if not torch.isfinite(v).all():
            raise ScoreError(f"the scores of parameter '{n}' contain NaN or inf. What to do: check the inputs "
                             f"and loss for NaN/inf and the weights for overflow; score in float32 or float64")
    return out


def check_chunking(model: nn.Module, train: bool, chunk_size: Optional[int]) -> None:
    """Chunking is exact only when samples do not interact: refuse it for train-mode batch statistics."""
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r}. What to do: pass a positive int or None")
    if train and any(isinstance(m, _NormBase) for m in model.modules()):
        raise ConfigError("chunk_size with train=True (OBA's default) on a model with BatchNorm would change "
                          "the batch statistics, so chunked scores would not equal whole-batch ones. What to do: "
                          "score in eval mode (train=False) or use smaller batches instead of chunk_size")
