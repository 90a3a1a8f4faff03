"""The HVP kernels behind `hvp.parameter_scores`: (g, Mv) on one batch, M = H or H − G (see hvp.py).

Two ways to differentiate twice: forward-over-reverse (``torch.func.jvp`` of a ``torch.func.vjp``) and double
backward. `grad_and_hvp` tries them in order, with and without the math attention kernel, until one works on the model,
and remembers the winner per model.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves

from .errors import ObafxError, ScoreError

from .scoring import Scores

if TYPE_CHECKING:
    from .scoring import Setup

# Differentiation backends, tried in this order until one works: (method, force the math SDPA kernel).
# The CPU flash-attention kernel has neither forward-mode AD nor a double backward; its math kernel has both.
_BACKENDS = (("forward_over_reverse", False), ("forward_over_reverse", True),
             ("double_backward", False), ("double_backward", True))
# model -> {train flag: backend that worked}, so the fallback decision is made once per model.
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _sdpa_context(math: bool):
    """Force the math scaled-dot-product-attention kernel (differentiable twice, forward-mode capable)."""
    return sdpa_kernel([SDPBackend.MATH]) if math else contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_probe():
    """Around a try of a differentiation backend. fx prints a traceback to stderr when a GraphModule's generated
    code raises (here: a kernel without forward-mode AD, a backend that is then skipped), and torch's first
    forward-mode AD call warns that its own decompositions use the deprecated torch.jit.script. Neither concerns
    the user: stderr is held back and written out only if the backend works, and that one warning is dropped."""
    held = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(held):
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        yield
    sys.stderr.write(held.getvalue())


def _rng_rewinder(enabled: bool) -> Callable[[], None]:
    """A function putting the RNG back to its current state (when ``enabled``, i.e. in train mode)."""
    cpu = torch.get_rng_state() if enabled else None
    cuda = torch.cuda.get_rng_state_all() if enabled and torch.cuda.is_initialized() else None

    def rewind():
        if cpu is not None:
            torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    return rewind


def detached_leaves(theta: Scores) -> Scores:
    """Fresh autograd leaves sharing storage with ``theta`` (the user's tensors are never touched)."""
    return {n: t.detach().requires_grad_() for n, t in theta.items()}


def _grad_dot(outs: list[Tensor], leaves: Scores, vec: list[Tensor]) -> Scores:
    """∂(Σ outs_i · vec_i)/∂leaves; outputs that carry no graph contribute zero."""
    live = [(o, v) for o, v in zip(outs, vec) if o.requires_grad]
    if not live:
        return {n: torch.zeros_like(t) for n, t in leaves.items()}
    got = torch.autograd.grad([o for o, _ in live], list(leaves.values()), [v for _, v in live],
                              allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, got))


def _forward_over_reverse(setup: Setup, args, targets, vec: Scores, residual: bool):
    """(g, Mv) as the jvp along v of a vjp: of θ ↦ ∂ℓ/∂θ for M = H, of θ ↦ J(θ)ᵀ r with r = ∂ℓ/∂f held fixed
    for M = H − G. (jvp of ``torch.func.grad`` gives the same numbers but measured ~1.8x the peak memory.)"""
    if not residual:
        def gradient(theta):
            loss, pull = vjp(lambda t: setup.loss(setup.forward(t, args), targets), theta)
            return pull(torch.ones_like(loss))[0]
        return jvp(gradient, (setup.theta,), (vec,))
    rewind = _rng_rewinder(setup.train)
    with torch.no_grad():
        out = setup.forward(setup.theta, args)
    r = grad(lambda o: setup.loss(o, targets))(out)
    rewind()  # the second forward must draw the same dropout masks

    def pull_back(theta):
        return vjp(lambda t: setup.forward(t, args), theta)[1](r)[0]
    return jvp(pull_back, (setup.theta,), (vec,))


def _double_backward(setup: Setup, args, targets, vec: Scores, residual: bool):
    """The same by double backward: differentiate g·v (g = Jᵀ r with r detached for the residual)."""
    leaves = detached_leaves(setup.theta)
    kw = dict(allow_unused=True, materialize_grads=True)
    with torch.enable_grad():
        out = setup.forward(leaves, args)
        loss = setup.loss(out, targets)
        if residual:
            outs = [o for o in tree_leaves(out) if isinstance(o, Tensor) and o.requires_grad]
            r = torch.autograd.grad(loss, outs, retain_graph=True, **kw)
            g = torch.autograd.grad(outs, list(leaves.values()), [t.detach() for t in r], create_graph=True, **kw)
        else:
            g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, **kw)
        mv = _grad_dot(list(g), leaves, [vec[n] for n in leaves])
    return dict(zip(leaves, (t.detach() for t in g))), mv


_KERNELS = {"forward_over_reverse": _forward_over_reverse, "double_backward": _double_backward}


def grad_and_hvp(setup: Setup, args, targets, vec: Scores, mode: str = "full", force: Optional[str] = None):
    """(g, Mv) on one batch: the loss gradient and M·vec with M = H (``full``) or H − G (``residual``).

    Tries the differentiation backends in order until one works and remembers the winner per model.
    ``force`` ("forward_over_reverse" / "double_backward") restricts the methods tried (tests use it).
    """
    memory = _CHOSEN.setdefault(setup.model, {})
    order = [setup.backend or memory.get(setup.train)] + list(_BACKENDS)
    order = [b for i, b in enumerate(order) if b is not None and b not in order[:i]
             and (force is None or b[0] == force)]
    errors = []
    for backend in order:
        try:
            probing = setup.backend is None
            with _sdpa_context(backend[1]), (_quiet_probe() if probing else contextlib.nullcontext()):
                result = _KERNELS[backend[0]](setup, args, targets, vec, mode == "residual")
        except (RuntimeError, NotImplementedError) as err:  # missing forward-mode AD / double backward
            errors.append(err)
            if setup.backend is not None:
                raise
            continue
        except ObafxError:
            raise
        except Exception as err:  # raised by loss_fn or the model itself: no other backend would fare better
            first_line = (str(err).splitlines() or [""])[0]
            raise ScoreError(f"scoring one batch raised {type(err).__name__}: {first_line}. What to do: check "
                             f"that loss_fn(model(inputs), targets) runs on one of your batches outside obafx "
                             f"(targets of the batch's length, labels within the output's classes)") from err
        setup.backend = backend
        if force is None:  # a forced choice is a test's, not a finding about the model
            memory[setup.train] = backend
        return result
    detail = "; ".join(f"{m}{' (math attention)' if k else ''}: {str(e).splitlines()[0]}"
                       for (m, k), e in zip(order, errors))
    raise ScoreError(f"every differentiation method failed on this model: {detail}. What to do: fix the "
                     f"error above (a shape or dtype mismatch shows here too) or report the op") from errors[-1]
