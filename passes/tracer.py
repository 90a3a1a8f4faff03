"""obafx's torch.fx tracer: fx's symbolic tracer with user-chosen leaf modules, source lines on every node, and
cheaper bookkeeping per module call and per node.

The graph, node names, ``node.meta["nn_module_stack"]`` and the tracer's scope bookkeeping come out exactly as
fx's own ``Tracer`` makes them (tests/test_tracer.py compares the two on a zoo of models); only the Python that
gets there is shorter (a DenseNet-121 traces in about 60% of fx's time):
- the module stack and the scope are saved without ``copy.copy`` (``__reduce_ex__``, microseconds each, once per
  node and once per module call);
- nodes are made by replaying ``Graph.create_node`` without its pytree scan for raw SymInts (`_graph_node`);
- torch functions on proxies find their tracer without pytree (`_Proxy`);
- plain arguments and non-tensor attribute reads skip fx's chains of type checks;
- the module tree is walked before the trace by plain loops (`tracer_root.trace_module`).
Where fx is asked for more (preserved node meta, stack traces, mutable-operation checks) or meets a container
these paths do not open, fx's own code runs.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch import nn

from .errors import SOURCE_KEY
from .tracer_root import TRACE_CODE, module_target_names, replays_this_torch, trace_module


class _Proxy(fx.Proxy):
    """fx's Proxy, with fx's ``__torch_function__`` (a torch function called on proxies: ``torch.cat(xs, 1)``,
    ``F.relu(x)``) finding the tracer by a plain walk of tuples, lists and dicts instead of pytree's
    (a DenseNet's cats of up to 32 proxies: a tenth of a trace). The node it records is the one fx records;
    arguments in any other container, or script methods and higher-order operators, go to fx's own."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        args = args if args else ()
        kwargs = kwargs if kwargs else {}
        tracers: Dict[Any, None] = {}
        if (isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator))
                or not _find_tracers(args, tracers) or not _find_tracers(kwargs, tracers) or len(tracers) != 1):
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        if _is_tensor_method(orig_method):
            return tracer.create_proxy("call_method", orig_method.__name__, args, kwargs)
        return tracer.create_proxy("call_function", orig_method, args, kwargs,
                                   name=tracer.graph._target_to_str(orig_method.__name__))


_TENSOR_METHOD: Dict[Any, bool] = {}


def _is_tensor_method(func: Any) -> bool:
    """torch.overrides.is_tensor_method_or_property, remembered per function: torch's wraps each call in a
    warnings filter, which costs more than a DenseNet's whole cat node."""
    try:
        found = _TENSOR_METHOD.get(func)
    except TypeError:  # an unhashable callable
        return torch.overrides.is_tensor_method_or_property(func)
    if found is None:
        found = _TENSOR_METHOD[func] = torch.overrides.is_tensor_method_or_property(func)
    return found


def _find_tracers(value: Any, tracers: Dict[Any, None]) -> bool:
    """Add the tracer of every proxy in ``value`` to ``tracers``; False where a container other than a plain
    tuple, list or dict could hide one (fx's pytree walk then decides)."""
    kind = type(value)
    if kind in _PLAIN_CONSTANTS:
        return True
    if isinstance(value, fx.Proxy):
        tracers[value.tracer] = None
        return True
    if kind is tuple or kind is list:
        items = value
    elif kind is dict:
        items = value.values()
    else:
        return not (isinstance(value, (tuple, list, dict)) or kind in _PYTREE_NODES)
    for v in items:  # a loop, not all(generator): a DenseNet's cats pass up to 32 proxies
        if type(v) not in _PLAIN_CONSTANTS and not _find_tracers(v, tracers):
            return False
    return True


class LeafTracer(fx.Tracer):
    """fx's tracer that also treats the user's chosen modules (by qualified name or type) as leaves."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        """fx's ``Tracer.trace``; for a module root, its replay with cheaper walks of the module tree
        (`tracer_root.trace_module`) where this torch's method is the one replayed."""
        if isinstance(root, nn.Module) and replays_this_torch():
            return trace_module(self, root, concrete_args)
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Tuple[Any, ...],
                    kwargs: Dict[str, Any]) -> Any:
        """fx's ``Tracer.call_module`` (same scope, module stack and call counts), with the scope saved as its two
        fields instead of through fx's ScopeContextManager and its ``copy.copy``."""
        path = self.path_of_module(m)
        scope = self.scope
        prev_path, prev_type = scope.module_path, scope.module_type
        scope.module_path, scope.module_type = path, type(m)
        try:
            num_calls = self.num_calls.get(path, 0)
            key = f"{path}@{num_calls}" if num_calls > 0 else path
            self.module_stack[key] = (path, type(m))
            self.num_calls[path] = num_calls + 1
            if not self.is_leaf_module(m, path):
                out = forward(*args, **kwargs)
            else:
                out = self.create_proxy("call_module", path, args, kwargs)
            popped, _ = self.module_stack.popitem(last=True)
            if popped != key:
                raise AssertionError(f"Unexpected key {popped}, expected {key}")  # as fx says it
        finally:
            scope.module_path, scope.module_type = prev_path, prev_type
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        if self._plain_bookkeeping():
            node = _graph_node(self.graph, kind, target, args, kwargs, name, type_expr, self._target_names())
            self.node_name_to_scope[node.name] = (self.scope.module_path, self.scope.module_type)
            if self.module_stack:
                node.meta["nn_module_stack"] = self.module_stack.copy()  # what fx's copy.copy makes, faster
        else:
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        where = user_frame()
        if where is not None:
            node.meta[SOURCE_KEY] = where
        return node

    def _target_names(self) -> Dict[str, str]:
        """`tracer_root.module_target_names` of this trace's module paths, made at its first node."""
        paths = getattr(self, "submodule_paths", None)
        made = getattr(self, "_names_of", None)
        if made is None or made[0] is not paths:
            made = self._names_of = (paths, module_target_names(paths.values()) if paths else {})
        return made[1]

    def _plain_bookkeeping(self) -> bool:
        """Whether fx's ``TracerBase.create_node`` would do no more than `create_node`'s short path: no
        preserved node meta, no stack traces, no mutable-operation check, a plain OrderedDict module stack."""
        return (not fx_traceback.has_preserved_node_meta() and not self.record_stack_traces
                and not self.check_mutable_operations and type(self.module_stack) is OrderedDict
                and not _FX_LOG.isEnabledFor(logging.DEBUG))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        """fx's ``Tracer.getattr`` (every module attribute read while tracing): fx proxies only parameters and,
        when asked, buffers, so any other value (submodules, most reads) is returned before fx's Parameter check."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        # fx's create_arg runs a dozen type checks per value; plain constants, proxies and plain tuples, lists and
        # string-keyed dicts of them (most arguments) lower exactly as fx would lower them, so take them first.
        kind = type(a)
        if kind in _PLAIN_CONSTANTS:
            return a
        if kind is _Proxy or kind is fx.Proxy:
            return a.node
        if kind is tuple:
            return tuple([self._lowered(e) for e in a])
        if kind is list:
            return [self._lowered(e) for e in a]
        if kind is dict and all(type(k) is str for k in a):  # every call's kwargs: fx's _create_arg_dict
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def _lowered(self, e: Any) -> Any:
        """``self.create_arg(e)`` for an element of a tuple or list, with constants and proxies inline."""
        kind = type(e)
        if kind in _PLAIN_CONSTANTS:
            return e
        if kind is _Proxy:
            return e.node
        return self.create_arg(e)


def _graph_node(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: dict, name: Optional[str],
                type_expr: Any, target_names: Dict[str, str]) -> fx.Node:
    """``graph.create_node(...)`` for a node the tracer makes: the same name, node and insertion, without fx's
    scan of the arguments for raw SymInt/SymFloat/SymBool values through pytree (a warning about values a
    symbolic trace of a module does not make; 1-2 ms a trace of a model of hundreds of modules): where an
    argument holds one, or the graph has an owning module (create-node hooks), or this torch's
    ``Graph.create_node`` is not the one this replays, fx's own runs. ``target_names``: the name bases of string
    targets made before (`tracer_root.module_target_names`); any other target's is ``graph._target_to_str``'s."""
    if not _KNOWN_CREATE_NODE or graph.owning_module is not None or _symbolic((args, kwargs)):
        return graph.create_node(op, target, args, kwargs, name, type_expr)
    args = args if args else ()
    kwargs = kwargs if kwargs else immutable_dict()
    candidate = name if name is not None else target_names.get(target) if type(target) is str else None
    if candidate is None:
        candidate = graph._target_to_str(target)
    name = graph._graph_namespace.create_name(candidate, None)
    node = fx.Node(graph, name, op, target, args, kwargs, type_expr)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


def _symbolic(value: Any) -> bool:
    """Whether ``value`` may hold a SymInt/SymFloat/SymBool: one of them, or inside plain tuples, lists and
    dicts, or any other container (a namedtuple, torch.Size, a registered pytree node: fx's scan decides)."""
    kind = type(value)
    if kind in _LEAVES:
        return False
    if kind in _SEQUENCES:
        items = value
    elif kind in _MAPPINGS:
        items = value.values()
    else:
        return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, tuple, list, dict)) or \
            kind in _PYTREE_NODES
    for v in items:  # a loop with the leaves inline: this runs for every node's arguments
        if type(v) not in _LEAVES and _symbolic(v):
            return True
    return False


# The Graph.create_node that `_graph_node` replays (torch 2.14): its global and attribute names.
_CREATE_NODE_NAMES = (
    'isinstance', 'tuple', 'AssertionError', 'type', 'immutable_dict', 'dict', 'pytree', 'tree_iter', 'torch',
    'SymInt', 'SymFloat', 'SymBool', 'warnings', 'warn', '__name__', '_target_to_str', '_graph_namespace',
    'create_name', 'Node', 'owning_module', 'getattr', '_create_node_hooks', 'associate_name_with_obj', '_insert',
    '_find_nodes_lookup_table', 'insert', '_len')
_KNOWN_CREATE_NODE = fx.Graph.create_node.__code__.co_names == _CREATE_NODE_NAMES
_PYTREE_NODES = frozenset(pytree.SUPPORTED_NODES)
_FX_LOG = logging.getLogger(fx.proxy.__name__)  # fx's create_node logs every node at debug level
_PLAIN_CONSTANTS = frozenset((int, float, bool, str, type(None)))
_LEAVES = _PLAIN_CONSTANTS | {fx.Node}  # what `_symbolic` never opens
_SEQUENCES = frozenset((tuple, list, immutable_list))
_MAPPINGS = frozenset((dict, immutable_dict))
_TRACE_CODES = (inspect.unwrap(fx.Tracer.trace).__code__, TRACE_CODE)  # fx's trace and its replay
_NOT_USER_CODE = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def user_frame() -> Optional[Tuple[str, int, str]]:
    """(file, line, function) of the innermost frame of model code (not torch, not obafx's passes) between here
    and fx's ``Tracer.trace`` (or its replay, `tracer_root.trace_module`); None when no model code is on that
    stack (a bare nn.Sequential; inside a model, a Sequential's nodes get the line that calls it).
    Errors and reports name this line. A frame walk costs a few microseconds a node, where fx's
    ``record_stack_traces`` formats a whole traceback per node."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code not in _TRACE_CODES:
        code = frame.f_code
        user = _USER_FILES.get(code.co_filename)
        if user is None:  # a file seen for the first time: one prefix test, kept (a few files a model)
            user = _USER_FILES[code.co_filename] = not code.co_filename.startswith(_NOT_USER_CODE)
        if user:
            return code.co_filename, frame.f_lineno, code.co_name
        frame = frame.f_back
    return None


_USER_FILES: Dict[str, bool] = {}  # file name -> whether it is model code (not torch's, not obafx's passes)
