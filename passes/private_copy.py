"""The private copy every public call works on, so that the user's model is never modified.

Semantically ``copy.deepcopy(model)``, built faster for module trees: each module gets its own attribute dict
and its own copies of the containers in it (parameter, buffer, submodule and hook dicts, lists, sets), while
immutable values are shared; any other object goes through ``copy.deepcopy`` with the same memo, so ties between
objects survive exactly as under deepcopy. Plain CPU parameters and buffers are copied lazily
(``torch._lazy_clone``: storage shared until either side writes, then the writer gets its own copy): values behave
exactly as after a deep copy, at no cost for the bytes. One visible difference: the side that writes first moves
to a new allocation, so a numpy array made from the user's tensor before pruning stops aliasing it after the
user's next in-place write. Shared-memory and non-CPU tensors are copied eagerly. COPY_ON_WRITE = False and
FAST_MODULE_COPY = False restore a plain deep copy.
"""
from __future__ import annotations

import copy
import functools
import types
from collections import OrderedDict
from typing import Any, Dict

import torch
from torch import nn

from .tensors import module_list

COPY_ON_WRITE = True
FAST_MODULE_COPY = True
_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, type(Ellipsis),
           type, range, slice)
_SHARED_CALLABLES = (types.FunctionType, types.BuiltinFunctionType)
_SHARED_TYPES = frozenset(_ATOMIC + _SHARED_CALLABLES)  # exact-type lookup first: most values are one of these


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (see the module docstring)."""
    memo: Dict[int, Any] = {}
    modules = module_list(model)  # one walk for the tensors and the plain-tree check
    if _copy_on_write():
        # parameters() then buffers(), as model.parameters() and model.buffers() list them (a tensor registered
        # as both is first met as the parameter), from the one walk
        tensors = [t for m in modules for t in m._parameters.values()] + \
            [t for m in modules for t in m._buffers.values()]
        with torch.no_grad():  # a clone without autograd history, as of t.detach(), without making the detached view
            for t in tensors:
                if t is not None and id(t) not in memo and _lazy_ok(t):
                    lazy = torch._lazy_clone(t)
                    memo[id(t)] = nn.Parameter(lazy, requires_grad=t.requires_grad) if type(t) is nn.Parameter else lazy
    if not FAST_MODULE_COPY:
        return copy.deepcopy(model, memo)
    if all(_plain_class(type(m)) for m in modules):  # `_plain_module_tree` on the walk above
        return _copy_value(model, memo)
    _copy_plain_subtrees(model, memo)  # e.g. a GraphModule root: its own __deepcopy__ finds its children in memo
    return copy.deepcopy(model, memo)


def _copy_plain_subtrees(module: nn.Module, memo: Dict[int, Any]) -> None:
    """Copy every maximal plain subtree below ``module`` into ``memo`` (see `_plain_module_tree`)."""
    for child in module.children():
        if _plain_module_tree(child):
            _copy_value(child, memo)
        else:
            _copy_plain_subtrees(child, memo)


def copies_lazily(model: nn.Module) -> bool:
    """Whether `private_copy` shares every parameter and buffer of ``model`` copy-on-write (so a copy costs no
    memory until something writes)."""
    return _copy_on_write() and all(_lazy_ok(t) for t in (*model.parameters(), *model.buffers()))


def _copy_on_write() -> bool:
    """Copy-on-write tensors are switched on and this torch has them."""
    return COPY_ON_WRITE and hasattr(torch, "_lazy_clone")


def _plain_module_tree(model: nn.Module) -> bool:
    """Whether every registered module under ``model`` is `_plain_class` (only those trees take the fast path;
    an unregistered module attribute is checked where `_copy_value` meets it)."""
    return all(_plain_class(type(m)) for m in module_list(model))


@functools.lru_cache(maxsize=None)
def _plain_class(cls: type) -> bool:
    """Module classes that deepcopy the default way: no __deepcopy__/__reduce_ex__/__reduce__/__getstate__ of
    their own, no __slots__ (a __setstate__ is fine: the copy calls it with the attribute dict, as deepcopy
    does). A class that customises any of them decides its own copy (transformers 5's kernel wrappers define
    __deepcopy__ and __reduce__, and their __setstate__ takes a (state, forward) pair): it gets copy.deepcopy."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is nn.Module.__reduce_ex__
            and cls.__reduce__ is nn.Module.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and not any("__slots__" in vars(k) for k in cls.__mro__ if k is not object))


def _copy_value(value: Any, memo: Dict[int, Any]) -> Any:
    """A deep copy of one attribute value, recursing into modules and plain containers."""
    kind = type(value)
    if kind in _SHARED_TYPES:  # what deepcopy shares too
        return value
    found = memo.get(id(value))  # before the isinstance check below: tensors (most values here) are in memo
    if found is not None:
        return found
    if isinstance(value, _ATOMIC):  # subclasses of the shared types (deepcopy never memoises these)
        return value
    if isinstance(value, nn.Module):
        # A module held as a plain attribute (not registered, so not seen by `_plain_module_tree`) may copy
        # itself its own way: then deepcopy decides.
        return _copy_module(value, memo) if _plain_class(kind) else copy.deepcopy(value, memo)
    if kind is OrderedDict or kind is dict:
        return _copy_dict(value, kind, memo)
    if kind is list:
        new = []
        memo[id(value)] = new
        new.extend(_copy_value(v, memo) for v in value)
        return new
    if kind is set or kind is frozenset:
        return kind(_copy_value(v, memo) for v in value) if value else kind()
    if kind is tuple:  # deepcopy's rule: the tuple itself when every item copies to itself
        items = [_copy_value(v, memo) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else tuple(items)
    return copy.deepcopy(value, memo)


def _copy_dict(value: dict, kind: type, memo: Dict[int, Any]) -> dict:
    """A copy of a dict or OrderedDict (``kind``) not in ``memo`` yet, its values copied."""
    new = kind()
    memo[id(value)] = new
    for k, v in value.items():  # parameter and buffer dicts: their tensors are in memo already
        found = memo.get(id(v))
        new[k] = found if found is not None else _copy_value(v, memo)
    return new


def _copy_module(module: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """A module's copy: a new instance whose attribute dict holds copies of the old one's values, set with
    ``__setstate__`` as deepcopy does. Shared values and empty dicts (most of a module's dozen hook dicts) are
    handled inline: a call per attribute is most of the cost on a model of hundreds of modules."""
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = {}
    for key, v in module.__dict__.items():
        kind = type(v)
        if kind in _SHARED_TYPES:
            state[key] = v
        elif (kind is OrderedDict or kind is dict or kind is set) and not v:
            state[key] = kind()  # hook dicts, _non_persistent_buffers_set
        elif kind is tuple and all(type(e) in _SHARED_TYPES for e in v):  # kernel sizes, strides, paddings:
            state[key] = v  # deepcopy returns a tuple of shared values itself
        elif kind is dict or kind is OrderedDict:  # parameters, buffers, children: `_copy_value`'s dict case
            found = memo.get(id(v))
            state[key] = found if found is not None else _copy_dict(v, kind, memo)
        else:
            state[key] = _copy_value(v, memo)
    if _PLAIN_SETSTATE and type(new).__setstate__ is _MODULE_SETSTATE and _SETSTATE_KEYS <= state.keys():
        new.__dict__.update(state)  # all Module.__setstate__ does when no attribute it fills in is missing
    else:
        new.__setstate__(state)
    return new


def _lazy_ok(t: torch.Tensor) -> bool:
    """Plain strided CPU tensors in storage of torch's own allocator only (no subclasses, shared memory,
    quantised data or Python attributes).

    Why resizable: a storage torch did not allocate itself (torch.load's records, torch.from_numpy,
    torch.frombuffer, safetensors, mmap) is not resizable, and torch 2.14's lazy clone of it either raises
    ("Expected storage != nullptr") or, for torch.load's, returns a clone whose first write on EITHER side (the
    user's own optimizer step included) is a segmentation fault. Those are copied eagerly."""
    plain = type(t) is nn.Parameter or (type(t) is torch.Tensor and not t.__dict__ and not t.requires_grad)
    if not (plain and t.is_cpu and t.layout == torch.strided and not t.is_quantized):
        return False
    storage = t.untyped_storage()
    return storage.resizable() and not storage.is_shared()  # Tensor.is_shared() goes through slow TypedStorage


# nn.Module.__setstate__ of torch 2.14: it updates the instance dict, then fills in each of the attributes named by
# its string constants that the state lacks (old checkpoints). Another torch's method runs as it is.
_MODULE_SETSTATE = nn.Module.__setstate__
_PLAIN_SETSTATE = _MODULE_SETSTATE.__code__.co_names == (
    '__dict__', 'update', 'OrderedDict', '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs',
    '_forward_hooks_with_kwargs', '_forward_hooks_always_called', '_state_dict_hooks', '_state_dict_pre_hooks',
    '_load_state_dict_pre_hooks', '_load_state_dict_post_hooks', 'set', '_non_persistent_buffers_set',
    '_is_full_backward_hook', '_backward_pre_hooks')
_SETSTATE_KEYS = frozenset(c for c in _MODULE_SETSTATE.__code__.co_consts if isinstance(c, str))
