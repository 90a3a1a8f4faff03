"""The vocabulary of channel labels: planes, the union store and the helpers every op rule uses.

Every prunable channel (a row of a conv weight, an element of a free parameter's dim, ...) gets an integer label.
A tensor value in the graph carries *planes*: a plane says which labels sit at which positions of the tensor along
the dims it covers (``dims``); ``arr`` has the tensor's rank, the tensor's size on ``dims`` and size 1 elsewhere.
Running the graph on planes (flatten = numpy reshape, permute = numpy transpose, cat = numpy concatenate) gives
every index map for free. Op rules record *unions* (these labels must be removed together); label 0 is PIN
(never removable). Connected components of the unions are the prunable units (see coupling.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .facts import Slot, Unions, frozen_map, read_only  # noqa: F401 (Slot re-exported: it used to live here)

PIN = 0


@dataclass(frozen=True, eq=False)
class Plane:
    """Labels of a tensor along ``dims``: ``arr.ndim`` equals the tensor rank, size 1 outside ``dims``."""

    dims: Tuple[int, ...]
    arr: np.ndarray

    def moved(self, dims: Tuple[int, ...], arr: np.ndarray) -> "Plane":
        return Plane(tuple(sorted(dims)), arr)


@dataclass(frozen=True, eq=False)
class Width:
    """A Python number that depends on the width of a labelled tensor dim (``x.size(d)``, ``x.shape[d]`` and
    arithmetic on them): pruning that dim changes the number. The number is exactly width * mul // div
    (div None: some other function of the width)."""

    planes: Tuple[Plane, ...]  # the planes covering the measured dim of the measured tensor
    dim: int
    div: Optional[int] = 1
    mul: int = 1


@dataclass
class Store:
    """Mutable collector used during one analysis: fresh labels, unions, parameter slots, barriers."""

    next_label: int = 1
    pairs: List[np.ndarray] = field(default_factory=list)
    slots: Dict[Tuple[str, int], Tuple[Slot, np.ndarray]] = field(default_factory=dict)
    barriers: List[Tuple[str, str]] = field(default_factory=list)
    log: List[Tuple[str, int]] = field(default_factory=list)  # slot keys in the order rules touched them
    widths: Dict[str, object] = field(default_factory=dict)  # node name -> Width (or a tuple of Width/None)
    aliases: Dict[str, str] = field(default_factory=dict)  # tensor name -> canonical name (tied weights)

    def fresh(self, n: int) -> np.ndarray:
        """``n`` new labels."""
        out = np.arange(self.next_label, self.next_label + n, dtype=np.int64)
        self.next_label += n
        return out

    def union(self, a: np.ndarray, b) -> None:
        """Record that the labels at matching (broadcast) positions of ``a`` and ``b`` go together."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if a.shape == b.shape and _same_values(a, b):  # the same labels (a slot made like its input): nothing
            return
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        pair = np.empty((2, a.size), dtype=np.int64)
        pair[0], pair[1] = a.reshape(-1), b.reshape(-1)
        differ = pair[0] != pair[1]
        if not differ.all():
            pair = pair[:, differ]
        if pair.shape[1] > 4096:  # broadcast planes repeat pairs: dedupe big ones (small ones cost more to dedupe)
            pair = np.unique(pair, axis=1)
        if pair.size:
            self.pairs.append(pair)

    def pin(self, a: np.ndarray) -> None:
        self.union(a, PIN)

    def merge(self, a: np.ndarray) -> None:
        """All labels in ``a`` go together."""
        flat = np.asarray(a).ravel()
        if flat.size > 1:
            self.union(flat[1:], flat[0])

    def slot(self, name: str, dim: int, size: int, role: str, owner: str,
             like: Optional[np.ndarray] = None) -> np.ndarray:
        """Labels of one parameter dim; the same parameter used twice (shared weights) gets the same labels.
        A layer that uses a free parameter (a get_attr weight passed to F.conv2d / F.linear / matmul) claims
        its role, so the parameter's rows count as produced channels. ``like``: 1-D labels the caller is about
        to union the new slot with (a norm's input channels); a new slot of that width takes them instead of
        fresh ones, which saves the labels and the unions (most of a model's labels are norm parameters)."""
        key = (self.aliases.get(name, name), dim)  # a tied tensor is one slot under all of its names
        entry = self.slots.get(key)
        if entry is None:
            labels = like.copy() if like is not None and like.shape == (size,) else self.fresh(size)
            entry = self.slots[key] = (Slot(name, dim, role, owner), labels)
        elif entry[0].role == "free" and role != "free":
            entry = self.slots[key] = (Slot(name, dim, role, owner), entry[1])
        self.log.append(key)
        return entry[1]

    def mark(self) -> Tuple[int, int]:
        """A point to roll back to if an op rule fails half-way."""
        return len(self.pairs), len(self.log)

    def rollback(self, mark: Tuple[int, int]) -> None:
        """Forget the unions recorded since ``mark`` and pin every slot touched since then: a layer used in a
        way its rule cannot model must keep all its widths."""
        pairs, log = mark
        touched = self.log[log:]
        del self.pairs[pairs:]
        for key in touched:
            self.pin(self.slots[key][1])

    def barrier(self, node_name: str, why: str) -> None:
        self.barriers.append((node_name, why))

    def freeze(self) -> "Unions":
        """The unions, slots and barriers recorded so far as a frozen fact (read-only views, no copies)."""
        slots = {k: (slot, read_only(labels)) for k, (slot, labels) in self.slots.items()}
        return Unions(self.next_label, tuple(read_only(p) for p in self.pairs), frozen_map(slots),
                      tuple(self.barriers))

    def pin_width(self, width: "Width") -> None:
        """The measured dim keeps its width (so the number stays what the model was written for)."""
        for p in width.planes:
            self.pin(p.arr)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two int64 arrays of one shape hold the same labels. Small ones compare as bytes (C order: equal
    bytes, equal values for integers), a tenth of ``(a == b).all()``'s time (a ufunc call and a reduction, most
    of a norm's rule, whose four slots are made like its input); big ones elementwise, without two copies."""
    if a.size <= 4096:
        return a.tobytes() == b.tobytes()
    return bool((a == b).all())


def iter_planes(value: Any):
    """Every Plane in a node's planes (nested tuples and lists of planes)."""
    if isinstance(value, Plane):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_planes(v)


def plane_for(labels: np.ndarray, ndim: int, dim: int) -> Plane:
    """A plane of rank ``ndim`` carrying 1-D ``labels`` along ``dim``."""
    shape = [1] * ndim
    shape[dim] = labels.shape[0]
    return Plane((dim,), labels.reshape(shape))


def shifted(p: Plane, ndim: int) -> Plane:
    """``p`` left-padded to rank ``ndim`` (numpy broadcasting alignment)."""
    extra = ndim - p.arr.ndim
    if extra == 0:
        return p
    return Plane(tuple(d + extra for d in p.dims), p.arr.reshape((1,) * extra + p.arr.shape))


def full(p: Plane, shape: Sequence[int]) -> np.ndarray:
    """The plane broadcast to the tensor's full shape."""
    return np.broadcast_to(p.arr, tuple(shape))


def squeeze_to_dims(arr: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """Reduce ``arr`` to size 1 on every dim outside ``dims`` (labels there are constant by construction)."""
    index = tuple(slice(None) if d in dims else slice(0, 1) for d in range(arr.ndim))
    return np.ascontiguousarray(arr[index])


def constant_outside(arr: np.ndarray, dims: Sequence[int]) -> bool:
    """Whether ``arr`` is constant along every dim outside ``dims``."""
    return bool(np.all(arr == squeeze_to_dims(arr, dims)))


def along(planes: Sequence[Plane], dim: int) -> List[Plane]:
    """The planes that cover ``dim``."""
    return [p for p in planes if dim in p.dims]


def only_on(planes: Sequence[Plane], dim: int) -> Optional[np.ndarray]:
    """1-D labels along ``dim`` for planes covering exactly ``dim``; the first one wins (others are unioned)."""
    hits = [p for p in planes if p.dims == (dim,)]
    return hits[0].arr.reshape(-1) if hits else None


def pin_all(store: Store, planes: Sequence[Plane]) -> None:
    for p in planes:
        store.pin(p.arr)


def merge_along(store: Store, p: Plane, dims) -> Plane:
    """Make ``p``'s labels independent of ``dims`` (its coordinates there can never be removed one by one):
    every position goes with the position at index 0 of ``dims``. Returns the plane reduced to the other dims
    (size 1 on ``dims``); an empty-dims plane when nothing is left."""
    rest = tuple(d for d in p.dims if d not in set(dims))
    reduced = squeeze_to_dims(p.arr, rest)
    store.union(p.arr, reduced)
    return Plane(rest, reduced)


def couple_facing(store: Store, p: Plane, facing, partners: Sequence[Plane]) -> None:
    """``p`` meets another operand elementwise on dims ``facing`` (where that operand has real extent):
    union with the partner planes covering any of them (broadcasting), and for facing dims no partner covers
    (fixed width there) merge ``p`` along them, or pin ``p`` when it has no other dim left."""
    covered = set()
    for q in partners:
        store.union(p.arr, q.arr)
        covered |= set(q.dims)
    loose = set(facing) - covered
    if not loose:
        return
    if set(p.dims) <= loose:
        store.pin(p.arr)
    else:
        merge_along(store, p, loose)


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pair up dims of a reshape: each (src dims, dst dims) group holds the same number of elements."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi <= pj and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                break
            if pi == pj and (i == len(src) or src[i] != 1) and (j == len(dst) or dst[j] != 1):
                break
        groups.append((gi, gj))
    return groups


def reshape_plane(p: Plane, src: Sequence[int], dst: Sequence[int]) -> Plane:
    """``p`` carried through a reshape from shape ``src`` to ``dst``."""
    arr = full(p, src).reshape(tuple(dst))
    dims = set()
    for gi, gj in reshape_groups(src, dst):
        if set(gi) & set(p.dims):
            dims.update(d for d in gj if dst[d] > 1)
    return Plane(tuple(sorted(dims)), squeeze_to_dims(arr, dims))


def index_plane(p: Plane, index: tuple, shape: Sequence[int], store: Optional["Store"] = None) -> Optional[Plane]:
    """``p`` through basic indexing ``x[index]`` (ints, slices, None, Ellipsis); None if unsupported or if every
    labelled dim is sliced to width 1 (a plane never carries width 1). In that case the selected labels are
    pinned in ``store``: nothing downstream tracks them, so they must not be removed."""
    idx = list(index) if isinstance(index, tuple) else [index]
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx):
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        fill = len(shape) - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + [slice(None)] * fill + idx[k + 1 :]
    idx = idx + [slice(None)] * (len(shape) - sum(1 for i in idx if i is not None))
    new_idx, dims, src, out = [], [], 0, 0
    for i in idx:
        if i is None:
            new_idx.append(None)
            out += 1
            continue
        if src in p.dims:
            new_idx.append(i)
            if isinstance(i, slice):
                dims.append(out)
        else:
            new_idx.append(0 if isinstance(i, int) else slice(None))
        if isinstance(i, slice):
            out += 1
        src += 1
    arr = p.arr[tuple(new_idx)]
    keep = [d for d in dims if arr.shape[d] > 1]
    if not keep and dims and store is not None:
        store.pin(arr)
    return Plane(tuple(keep), squeeze_to_dims(arr, keep)) if keep else None
