"""Channel graph: walk the traced graph once on (meta) values and on channel planes side by side.

In: a `Traced` model. Out: `ChannelFacts` - every node's planes and real shapes, every parameter slot, every
union the op rules recorded and every barrier. Ops without a rule are barriers (see ops.py); no guessing.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.fx as fx

from .call import Call
from .errors import ObafxError
from .labels import Plane, Store
from .ops import rule_for
from .rules_shape import barrier
from .facts import ChannelFacts, Traced, frozen_map
from .record import record_values
from .tensors import aliases_of, modules_by_name, named_tensors


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def _labels_of(arg: Any, planes: Dict[str, Any]) -> Any:
    """The planes of an argument: nodes map to their planes, containers recurse, constants have none."""
    if type(arg) is fx.Node:
        return planes.get(arg.name, ())
    if isinstance(arg, (tuple, list)):
        # a loop with nodes and constants inline: every node's arguments come through here
        return tuple([planes.get(a.name, ()) if type(a) is fx.Node else () if type(a) in _CONSTANTS
                      else _labels_of(a, planes) for a in arg])
    if isinstance(arg, fx.Node):  # a Node subclass
        return planes.get(arg.name, ())
    if isinstance(arg, dict):
        return {k: _labels_of(v, planes) for k, v in arg.items()}
    return ()


_CONSTANTS = frozenset((int, float, bool, str, type(None)))


class _Analyzer:
    """Replays recorded node values in graph order and applies each node's op rule to the inputs' planes.

    A plain loop over the nodes, not an fx.Interpreter: nothing is computed, so the interpreter's per-node
    bookkeeping would be most of the cost.
    """

    def __init__(self, gm: fx.GraphModule, values: Dict[str, Any], aliases: Dict[str, str],
                 submodules: Dict[str, Any]):
        self.module = gm
        self.submodules = submodules  # `modules_by_name(gm)`: a shared module under every name
        self.values = values
        self._value_of = lambda a: values[a.name]  # noqa: E731 (one closure for the run, not two a node)
        self.store = Store(aliases=aliases)
        self.planes: Dict[str, Any] = {}
        self.shapes: Dict[str, Any] = {}

    def run(self) -> None:
        for n in self.module.graph.nodes:
            value = self.values[n.name]  # recorded by trace.record_values: no compute here
            self.shapes[n.name] = _shape_of(value)
            self.planes[n.name] = self._planes(n, value)

    def _planes(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return ()
        if n.op == "get_attr":
            return self._param_planes(n, value)
        args = fx.node.map_arg(n.args, self._value_of)
        kwargs = fx.node.map_arg(n.kwargs, self._value_of) if n.kwargs else {}
        module = self.submodules[n.target] if n.op == "call_module" else None
        call = Call(n, self.store, self.module, tuple(args), dict(kwargs), _labels_of(n.args, self.planes),
                    _labels_of(n.kwargs, self.planes) if n.kwargs else {}, value, module)
        if n.op == "output":
            from .rules_shape import output
            return output(call)
        rule = rule_for(n.op, n.target, module)
        if rule is None:
            return barrier(call, f"{n.op} {_target_name(n, module)} is not in obafx's op table")
        try:
            return rule(call)
        except ObafxError:
            raise
        except Exception as exc:  # a rule that cannot handle this use of its op: be safe, not clever
            return barrier(call, f"{_target_name(n, module)} used in a way obafx does not model ({type(exc).__name__}: {exc})")

    def _param_planes(self, n: fx.Node, value: Any) -> Tuple[Plane, ...]:
        """A parameter or buffer read by get_attr: one plane per dim wider than 1 (a 'free' slot each)."""
        if not isinstance(value, torch.Tensor):
            return ()
        planes = []
        for d, size in enumerate(value.shape):
            if size > 1:
                labels = self.store.slot(n.target, d, size, "free", n.target)
                shape = [1] * value.dim()
                shape[d] = size
                planes.append(Plane((d,), labels.reshape(shape)))
        return tuple(planes)


def _target_name(n: fx.Node, module) -> str:
    if module is not None:
        return type(module).__name__
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def analyze(traced: Traced) -> ChannelFacts:
    """Run the channel analysis on ``traced`` (its recorded node values, or one fresh eval-mode run's)."""
    gm = traced.gm
    submodules = modules_by_name(gm)
    named = named_tensors(gm, submodules)  # one walk for the rules, the recorded values' check and the ties
    values = traced.recorded_values(named)
    if values is None:
        values = record_values(gm, traced.inputs)
    analyzer = _Analyzer(gm, values, aliases_of(named), submodules)
    with torch.no_grad():  # rules may compute on the (meta) values: never record autograd history
        analyzer.run()
    return ChannelFacts(traced, analyzer.store.freeze(), frozen_map(analyzer.planes), frozen_map(analyzer.shapes))
