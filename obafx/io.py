"""Save and load pruned modules without pickle: one safetensors file holding the weights and a JSON header.

File layout (a single ``.safetensors`` file, readable by any safetensors reader):

- tensors: the pruned module's ``state_dict()`` (parameters and persistent buffers), contiguous copies;
- metadata key ``"obafx"``: JSON with the format version, obafx/torch versions, the plan (original parameter
  name -> {dim: kept indices}), the example-input spec (shape and dtype per positional input), the user's leaf
  modules, training flags, frozen parameters, a hash of the pruned graph's code, and the whole report.

``load`` rebuilds the pruned module from the ORIGINAL architecture (trace, analyse, couple, map the plan to
units, rewrite), then copies the saved tensors in with strict name and shape checks. A plan composed over several
steps that no union of the original units expresses is applied in rounds, like the steps that made it. Nothing in
the file is ever executed: safetensors and JSON only (no pickle, no torch.load).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import ConfigError, PathError, PlanError
from obafx.passes.facts import PrunePlan, Traced
from obafx.passes.plan import plan_from_removed, removed_from_plan
from obafx.passes.rewrite import rewrite
from obafx.passes.capture import capture
from obafx.passes.trace import as_inputs
from obafx.report import Report, attach, report
from obafx.report import input_spec as report_input_spec
from obafx.version import __version__

FORMAT = "obafx-pruned"
FORMAT_VERSION = 1
_KEY = "obafx"
_AGAIN = "What to do: load the file with the architecture (and constructor arguments) it was saved from."

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------------- save

def save(pruned: fx.GraphModule, path: PathLike, example_input: Any = None) -> str:
    """Write ``pruned`` (a module returned by obafx.compile_prune or obafx.load) to the single file ``path``.

    ``example_input``: the input compile_prune was given; needed only when the report does not record the
    input spec (its shapes and dtypes are stored, never its values). Returns the path written.
    Raises ConfigError when ``pruned`` carries no obafx report or the input spec is unknown.
    """
    rep = report(pruned)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "obafx_version": __version__, "torch_version": torch.__version__,
        "inputs": _input_spec(rep, example_input),
        "plan": rep.plan,
        "leaf_modules": user_leaves(pruned) if rep.capture == "fx" else [],
        "training": {name: m.training for name, m in pruned.named_modules()},
        "frozen": [name for name, p in pruned.named_parameters() if not p.requires_grad],
        "graph_sha256": graph_hash(pruned),
        "report": {k: v for k, v in rep.to_dict().items() if k != "macs_ratio"},
    }
    tensors = _contiguous_unshared(pruned.state_dict())
    path = os.fspath(path)
    tmp = path + ".partial"
    try:
        save_file(tensors, tmp, metadata={_KEY: json.dumps(header)})
    except Exception as exc:  # safetensors reports I/O failures as its own error type
        folder = os.path.dirname(os.path.abspath(path))
        raise PathError(f"cannot write '{path}' ({type(exc).__name__}: {exc}). What to do: pass a path in an "
                        f"existing, writable folder{'' if os.path.isdir(folder) else f' ({folder} does not exist)'}."
                        ) from exc
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
    return path


def _input_spec(rep: Report, example_input: Any) -> List[Dict[str, Any]]:
    """Shape/dtype of each positional example input, from ``example_input`` or the report."""
    if example_input is not None:
        return input_spec(example_input)
    recorded = getattr(rep, "inputs", None)
    if recorded:
        return [dict(s) for s in recorded]
    raise ConfigError("this module's report does not record the example input, so load() could not rebuild it. "
                      "What to do: call save(pruned, path, example_input=x) with the input given to compile_prune.")


def input_spec(example_input: Any) -> List[Dict[str, Any]]:
    """JSON-able spec of each positional example input (report.input_spec on the normalised input): shape and
    dtype for tensors, constants by value, {"kind": "opaque"} otherwise (load then needs example_input=)."""
    return report_input_spec(as_inputs(example_input))


def user_leaves(gm: fx.GraphModule) -> List[str]:
    """Names of the modules the graph calls but fx would have traced through: the user's leaf_modules."""
    default = fx.Tracer()
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in names:
            if not default.is_leaf_module(gm.get_submodule(node.target), node.target):
                names.append(node.target)
    return names


def graph_hash(gm: fx.GraphModule) -> str:
    """sha256 of the generated forward code: equal codes mean the same ops, in the same order, on the same sizes."""
    return hashlib.sha256(gm.code.encode()).hexdigest()


def _contiguous_unshared(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights) or are strided views: copy those."""
    owners: Dict[Tuple[int, int], int] = {}
    for t in state.values():
        key = (t.untyped_storage().data_ptr(), t.device.index or 0)
        owners[key] = owners.get(key, 0) + 1
    out = {}
    for name, t in state.items():
        t = t.detach()
        shared = owners[(t.untyped_storage().data_ptr(), t.device.index or 0)] > 1
        out[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
    return out


# ------------------------------------------------------------------------------------------------- load

def load(path: PathLike, model: Union[nn.Module, Callable[[], nn.Module]], example_input: Any = None, *,
         leaf_modules: Optional[Iterable[Any]] = None, weights: bool = True,
         check_graph: bool = True) -> fx.GraphModule:
    """Rebuild the pruned module saved at ``path`` from the original architecture.

    In: ``model``: a freshly built ORIGINAL (unpruned) model, or a zero-argument factory returning one; it is
    never modified. ``example_input``: defaults to the saved spec (random floats / zero integers of the saved
    shapes; only shapes matter to the analysis). ``leaf_modules``: defaults to the saved ones.
    ``weights=False`` keeps ``model``'s own weights, sliced by the plan (re-applying the plan to a fresh model).
    ``check_graph``: refuse when the rebuilt forward differs from the saved one (same torch version only).
    Out: the pruned GraphModule, outputs bit-identical to the saved one's; obafx.report() works on it.
    Raises PlanError when the file does not fit ``model`` (another architecture, other widths, corrupt file).
    """
    path = os.fspath(path)
    header = read_header(path)
    fresh = model if isinstance(model, nn.Module) else model()
    if not isinstance(fresh, nn.Module):
        raise ConfigError(f"load() needs an nn.Module or a factory returning one, got {type(fresh).__name__}.")
    inputs = _inputs(header, fresh, example_input)
    leaves = header.get("leaf_modules", []) if leaf_modules is None else list(leaf_modules)
    gm = _rebuild(fresh, inputs, leaves, header, example_input is None)
    if check_graph and header.get("torch_version") == torch.__version__ and \
            header.get("graph_sha256") not in (None, graph_hash(gm)):
        raise PlanError("the rebuilt module's forward differs from the saved one's (same parameter names, other "
                        f"code): the model's forward changed since saving. {_AGAIN} Or pass check_graph=False "
                        "if the change is deliberate and keeps the computation.")
    if weights:
        _load_tensors(gm, path)
    _restore_flags(gm, header)
    attach(gm, _report_from(header))
    return gm


def read_header(path: str) -> Dict[str, Any]:
    """The JSON header of an obafx file (PlanError for anything else). Parses JSON only."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except OSError as exc:  # missing file, a folder, no access (safetensors' own errors are not OSErrors)
        if os.path.isfile(path):
            raise PlanError(f"'{path}' is not a readable safetensors file ({type(exc).__name__}: {exc}). "
                            "What to do: pass a file written by obafx.save.") from exc
        raise PathError(f"cannot read '{path}': {exc.strerror or exc}. What to do: pass the path of a file written "
                        "by obafx.save (check the folder and the file name).") from exc
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise PlanError(f"'{path}' is not a readable safetensors file ({type(exc).__name__}: {exc}). "
                        "What to do: pass a file written by obafx.save.") from exc
    try:
        header = json.loads(meta[_KEY])
    except (KeyError, ValueError) as exc:
        raise PlanError(f"'{path}' holds no obafx header (metadata key '{_KEY}'). What to do: pass a file "
                        "written by obafx.save.") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PlanError(f"'{path}' is not an obafx pruned-model file. What to do: pass a file written by obafx.save.")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise PlanError(f"'{path}' has no valid format version. What to do: pass a file written by obafx.save.")
    if version > FORMAT_VERSION:
        raise PlanError(f"'{path}' uses format version {header['format_version']}, newer than this obafx reads "
                        f"({FORMAT_VERSION}). What to do: upgrade obafx (the file was written by "
                        f"{header.get('obafx_version')}).")
    return header


def _inputs(header: Dict[str, Any], model: nn.Module, example_input: Any) -> Tuple[Any, ...]:
    """The user's example input, or inputs rebuilt from the saved spec on the model's device."""
    if example_input is not None:
        return as_inputs(example_input)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    # Only shapes matter to the analysis; the model's own float dtype lets a float32 build trace a float64 file.
    model_float = first.dtype if first is not None else None
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in header.get("inputs", []):
        if spec.get("kind") == "constant":
            out.append(spec.get("value"))
        elif spec.get("kind") == "tensor":
            dtype = _dtype(spec.get("dtype"))
            dtype = model_float if dtype.is_floating_point and model_float is not None else dtype
            shape = tuple(int(s) for s in spec["shape"])
            if dtype.is_floating_point:
                x = torch.randn(shape, generator=gen, dtype=dtype)
            else:  # token ids and masks: zeros are always in range
                x = torch.zeros(shape, dtype=dtype)
            out.append(x.to(device))
        else:
            raise ConfigError(f"the saved example input holds a {spec.get('type', 'value')} that cannot be rebuilt. "
                              "What to do: pass example_input= to load().")
    if not out:
        raise ConfigError("the file records no example input. What to do: pass example_input= to load().")
    return tuple(out)


def _dtype(name: Any) -> torch.dtype:
    """A torch dtype from its saved name; only dtype attributes are looked up (nothing is called)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"the saved example input has an unknown dtype {name!r}. What to do: pass example_input=.")
    return dtype


def _rebuild(model: nn.Module, inputs, leaves, header: Dict[str, Any], spec_inputs: bool) -> fx.GraphModule:
    """Trace ``model`` and rewrite it with the saved plan (PlanError when the plan does not fit)."""
    try:
        traced = capture(model, inputs, leaves, header.get("report", {}).get("capture", "fx"))
    except ConfigError as exc:
        if not spec_inputs:
            raise
        shapes = [s.get("shape") for s in header["inputs"]]
        raise PlanError(f"the model does not run on the saved example input {shapes}: it is not the architecture "
                        f"this file was saved from ({exc}). {_AGAIN}") from exc
    facts = analyze(traced)
    coupling = couple(facts)
    try:
        plan = PrunePlan.from_dict(header["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"the saved plan is malformed ({exc}). What to do: save the module again.") from exc
    _check_size(traced.gm, header)
    try:
        removed = removed_from_plan(coupling, plan)
    except PlanError as first:
        # A plan composed over steps (compile_prune(steps>1)) can be valid yet not a union of the ORIGINAL units:
        # e.g. a grouped conv left with one input channel per group lets a later step drop a whole group.
        return _replay(traced, plan, first)
    return rewrite(traced, coupling, facts.shapes, removed)


def _replay(traced: Traced, plan: PrunePlan, first: PlanError, rounds: int = 16) -> fx.GraphModule:
    """Apply ``plan`` in rounds, like compile_prune's steps: each round re-analyses the current module and removes
    every unit all of whose parameter positions the plan drops. PlanError ``first`` unless the rounds end with
    exactly the plan applied."""
    current, remaining, done = traced, _normal(plan), PrunePlan()
    for _ in range(rounds):
        if not remaining:
            break
        facts = analyze(current)
        coupling = couple(facts)
        removed = _fully_dropped(coupling, remaining)
        if not removed:
            break
        step = plan_from_removed(coupling, removed)
        current = Traced(rewrite(current, coupling, facts.shapes, removed), current.inputs)
        done = done.compose(step)
        remaining = _rebase(remaining, step)
        if remaining is None:
            break
    if remaining or _normal(done) != _normal(plan):
        raise first
    return current.gm


def _normal(plan: PrunePlan) -> Dict[str, Dict[int, Tuple[int, ...]]]:
    return {n: {int(d): tuple(i) for d, i in dims.items()} for n, dims in plan.kept.items() if dims}


def _fully_dropped(coupling, remaining: Dict[str, Dict[int, Tuple[int, ...]]]) -> set:
    """Prunable units none of whose positions (in any parameter slot) ``remaining`` keeps."""
    prunable = {u for g in coupling.groups for u in g.units}
    kept_somewhere = set()
    for (name, dim), units in coupling.slot_units.items():
        keep = remaining.get(name, {}).get(dim)
        mask = np.ones(len(units), dtype=bool)
        if keep is not None:
            mask[:] = False
            mask[[i for i in keep if i < len(units)]] = True
        kept_somewhere.update(int(u) for u in np.unique(units[mask]))
    return prunable - kept_somewhere


def _rebase(remaining, step: PrunePlan) -> Optional[Dict[str, Dict[int, Tuple[int, ...]]]]:
    """``remaining`` (indices before ``step``) in the indices after it, dims now fully kept dropped; None when it
    keeps an index the step removed (the plan cannot be reached)."""
    out: Dict[str, Dict[int, Tuple[int, ...]]] = {}
    for name, dims in remaining.items():
        for d, idx in dims.items():
            survivors = step.kept.get(name, {}).get(d)
            if survivors is None:
                out.setdefault(name, {})[d] = idx
                continue
            where = {old: new for new, old in enumerate(survivors)}
            if any(i not in where for i in idx):
                return None
            if len(idx) < len(survivors):
                out.setdefault(name, {})[d] = tuple(where[i] for i in idx)
    return out


def _check_size(gm: fx.GraphModule, header: Dict[str, Any]) -> None:
    """The plan holds kept indices only, so a wider model of the same layout would take it silently: compare the
    original parameter count the report recorded with this model's."""
    before = header.get("report", {}).get("params_before")
    here = sum(p.numel() for p in gm.parameters())
    if before is not None and int(before) != here:
        raise PlanError(f"the file was saved from a model with {int(before):,} parameters; this model has {here:,}. "
                        f"{_AGAIN}")


def _load_tensors(gm: fx.GraphModule, path: str) -> None:
    """Copy every saved tensor into ``gm``: names must match exactly, shapes too; saved dtypes win."""
    expected = gm.state_dict(keep_vars=True)
    with safe_open(path, framework="pt", device="cpu") as f:
        found = set(f.keys())
        missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
        if missing or unexpected:
            raise PlanError(f"the saved tensors do not match the rebuilt module: missing {missing[:6]}"
                            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                            f"{' ...' if len(unexpected) > 6 else ''}. {_AGAIN}")
        for name, target in expected.items():
            saved = f.get_slice(name)
            shape = tuple(saved.get_shape())
            if shape != tuple(target.shape):
                raise PlanError(f"tensor '{name}': the rebuilt module expects shape {tuple(target.shape)}, the file "
                                f"holds {shape}. {_AGAIN}")
            _assign(target, f.get_tensor(name))


def _assign(target: torch.Tensor, saved: torch.Tensor) -> None:
    """Write ``saved`` into ``target`` in place (tied tensors stay tied); a different dtype is adopted."""
    with torch.no_grad():
        if target.dtype == saved.dtype:
            target.copy_(saved)
        else:
            target.data = saved.to(target.device)


def _restore_flags(gm: fx.GraphModule, header: Dict[str, Any]) -> None:
    """Training flags and requires_grad as they were on the saved module."""
    flags = header.get("training", {})
    for name, m in gm.named_modules():
        if name in flags:
            m.training = bool(flags[name])
    frozen = set(header.get("frozen", []))
    for name, p in gm.named_parameters():
        p.requires_grad_(name not in frozen)


def _report_from(header: Dict[str, Any]) -> Report:
    """The saved report (fields this version does not know are dropped, missing ones take defaults)."""
    data = header.get("report", {})
    known = {f.name for f in fields(Report)}
    try:
        return Report(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise PlanError(f"the saved report is incomplete ({exc}). What to do: save the module again.") from exc
