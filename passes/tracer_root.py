"""fx's ``Tracer.trace`` for a module root, replayed with two cheaper walks of the module tree.

Before it runs the model, fx's ``Tracer.trace`` walks the tree twice: ``{module: name}`` through
``named_modules()`` (nested generators) and every attribute of every module through ``isinstance`` against fx's
constant types (tensors, script objects, tree specs), to find tensor attributes that are not parameters
(``tracer.tensor_attrs``). On a model of hundreds of modules the two walks are a sixth of a trace. `trace_module`
is fx's method step by step (the same flag, recompile, graph, patches, wrappers, output node and error handling),
with the two walks done as plain loops: attribute values of builtin types that cannot be constants are skipped by
their exact type, and every other value meets fx's own ``isinstance`` test. The tables come out the same, in the
same order (tests/test_tracer.py compares them with fx's on a zoo of models).

`replays_this_torch` says whether this torch's ``Tracer.trace`` is the one replayed here (names and constants of
its code and nested functions, fingerprinted); where it is not, or the root is not a module, fx's own runs.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import types
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace as _st
from torch.fx import graph as _fx_graph


def replays_this_torch() -> bool:
    """Whether this torch's ``fx.Tracer.trace`` has the code `trace_module` replays."""
    return _KNOWN_TRACE


def trace_module(tracer: fx.Tracer, root: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
    """``fx.Tracer.trace(tracer, root, concrete_args)`` for a module ``root`` (see the module docstring)."""
    old_is_fx_tracing_flag = _st._get_is_fx_tracing()
    _st._set_is_fx_tracing(True)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule

        _LazyGraphModule.force_recompile(root)
        tracer.root = root
        if not hasattr(type(root), tracer.traced_func_name):
            raise AssertionError(f"traced_func_name={tracer.traced_func_name} doesn't exist in "
                                 f"{type(root).__name__}")
        fn = getattr(type(root), tracer.traced_func_name)
        tracer.root_module_name = root._get_name()
        tracer.submodule_paths = _submodule_paths(root)
        tracer.graph = fx.Graph(tracer_cls=getattr(tracer, "__class__", None))
        if hasattr(fn, "__code__"):
            code = fn.__code__
            tracer.graph._co_fields = {"co_name": code.co_name, "co_filename": code.co_filename,
                                       "co_firstlineno": code.co_firstlineno}
        tracer.tensor_attrs = {}
        _collect_tensor_attrs(root, [], tracer.tensor_attrs)
        if not isinstance(fn, types.FunctionType):
            raise AssertionError(f"Expected FunctionType, got {type(fn)}")
        fn_globals = fn.__globals__  # run before it gets patched
        fn, args = tracer.create_args_for_root(fn, True, concrete_args)
        parameter_proxy_cache: Dict[str, Any] = {}  # Reduce number of get_attr calls

        @functools.wraps(_st._orig_module_getattr)
        def module_getattr_wrapper(mod: nn.Module, attr: str) -> Any:
            attr_val = _st._orig_module_getattr(mod, attr)
            return tracer.getattr(attr, attr_val, parameter_proxy_cache)

        @functools.wraps(_st._orig_module_call)
        def module_call_wrapper(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                return _st._orig_module_call(mod, *args, **kwargs)

            _st._autowrap_check(patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}),
                                tracer._autowrap_function_ids)
            return tracer.call_module(mod, forward, args, kwargs)

        with _st._new_patcher() as patcher:
            # allow duplicate patches to support the case of nested calls
            patcher.patch_method(nn.Module, "__getattr__", module_getattr_wrapper, deduplicate=False)
            patcher.patch_method(nn.Module, "__call__", module_call_wrapper, deduplicate=False)
            _st._patch_wrapped_functions(patcher)
            _st._autowrap_check(patcher, fn_globals, tracer._autowrap_function_ids)
            for module in tracer._autowrap_search:
                _st._autowrap_check(patcher, module.__dict__, tracer._autowrap_function_ids)
            ann = inspect.get_annotations(inspect.unwrap(fn))
            tracer.create_node("output", "output", (tracer.create_arg(fn(*args)),), {},
                               type_expr=ann.get("return", None))
        tracer.submodule_paths = None
    except RuntimeError as e:
        if e.args and isinstance(e.args[0], str) and "data-dependent" in e.args[0]:
            e.partial_fx_graph = tracer.graph.python_code(root_module="self", verbose=True).src  # type: ignore
        raise
    finally:
        _st._set_is_fx_tracing(old_is_fx_tracing_flag)
    return tracer.graph


def _submodule_paths(root: nn.Module) -> Dict[nn.Module, str]:
    """``{mod: name for name, mod in root.named_modules()}``: every module once, under the first name of a
    pre-order walk (plain recursion where no class walks its children its own way)."""
    paths: Dict[nn.Module, str] = {}
    if not _walk_modules(root, "", paths):
        return {mod: name for name, mod in root.named_modules()}
    return paths


def _walk_modules(module: nn.Module, prefix: str, paths: Dict[nn.Module, str]) -> bool:
    """Add ``module`` and its tree to ``paths`` as ``named_modules()`` does (a module met again is skipped with
    its subtree); False where a class overrides ``named_modules`` (the caller then asks torch)."""
    if type(module).named_modules is not _NAMED_MODULES:
        return False
    if module in paths:
        return True
    paths[module] = prefix
    for name, child in module._modules.items():
        if child is not None and not _walk_modules(child, f"{prefix}.{name}" if prefix else name, paths):
            return False
    return True


def _collect_tensor_attrs(m: nn.Module, prefix_atoms: List[str], out: Dict[Any, str]) -> None:
    """fx's nested ``collect_tensor_attrs``: every attribute of every module in the tree that is one of fx's
    constant types, by qualified name (a later name of the same value wins), walking ``named_children()``."""
    for k, v in m.__dict__.items():
        if type(v) not in _NEVER_CONSTANT and isinstance(v, _st._constant_attribute_types):
            out[v] = ".".join(prefix_atoms + [k])
    if type(m).named_children is not _NAMED_CHILDREN:
        children = m.named_children()
    else:  # named_children's loop: each child once, None skipped
        seen: set = set()
        children = []
        for name, child in m._modules.items():
            if child is not None and child not in seen:
                seen.add(child)
                children.append((name, child))
    for k, child in children:
        _collect_tensor_attrs(child, prefix_atoms + [k], out)


def module_target_names(paths: Iterable[str]) -> Dict[str, str]:
    """``{path: graph._target_to_str(path)}`` for module paths (the base of a call_module node's name), all in
    one regex pass over the joined paths instead of one ``_target_to_str`` call a node (a tenth of a trace).
    fx's snake-casing looks at one character and the one before it, so a newline between paths changes nothing;
    paths with a newline or a dunder name, and every path on a torch whose naming code differs, are left out
    (the caller asks fx for those)."""
    if not _KNOWN_NAMING:
        return {}
    plain = [p for p in paths if "\n" not in p and not (p.startswith("__") and p.endswith("__"))]
    return dict(zip(plain, _fx_graph._snake_case("\n".join(plain)).split("\n"))) if plain else {}


def _code_fingerprint(code: types.CodeType) -> List[Any]:
    """The names, free variables and non-code constants of ``code`` and of the functions nested in it."""
    out: List[Any] = [code.co_name, code.co_names, code.co_freevars]
    for const in code.co_consts:
        out.append(_code_fingerprint(const) if isinstance(const, types.CodeType) else repr(const))
    return out


def _digest(fn: Any) -> str:
    return hashlib.sha256(repr(_code_fingerprint(inspect.unwrap(fn).__code__)).encode()).hexdigest()[:24]


# Exact types of module attributes that are never one of fx's constant types (a subclass meets isinstance).
_NEVER_CONSTANT = frozenset((type(None), bool, int, float, str, dict, OrderedDict, set, list, tuple))
_NAMED_MODULES = nn.Module.named_modules
_NAMED_CHILDREN = nn.Module.named_children
# fx.Tracer.trace of torch 2.14 (`_digest` of it): the code `trace_module` replays.
_TRACE_DIGEST = "8a246139066c5dd1e2277b44"
_KNOWN_TRACE = _digest(fx.Tracer.trace) == _TRACE_DIGEST
# fx's node naming of torch 2.14: _target_to_str snake-cases a string target (dunder names stripped), and
# _snake_case is one regex substitution (an underscore before a capital after a lower-case letter), lower-cased.
_KNOWN_NAMING = (
    fx.Graph._target_to_str.__code__.co_names == ('callable', '__name__', 'isinstance', 'str', 'AssertionError',
                                                  'type', '_is_magic', '_snake_case')
    and _fx_graph._snake_case.__code__.co_names == ('_snake_case_sub', 'lower')
    and isinstance(_fx_graph._snake_case_sub, functools.partial)
    and getattr(_fx_graph._snake_case_sub.func, "__self__", None) is not None
    and _fx_graph._snake_case_sub.func.__self__.pattern == r"(?<=[a-z])([A-Z])"
    and _fx_graph._snake_case_sub.args == (r"_\1",) and not _fx_graph._snake_case_sub.keywords)
TRACE_CODE = trace_module.__code__  # the frame `tracer.user_frame` stops at, as at fx's own
