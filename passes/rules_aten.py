"""Op rules for aten ops that have no torch-level twin with the same argument order (torch.export's graphs).

Most aten overloads share a rule with their torch-level twin (ops.py lists them as aliases); the ones here differ
in where their arguments sit (embedding's weight comes first, addmm carries its bias in front, slice/select spell
an index as (dim, start, end) or (dim, index)), or only exist at the aten level (metadata asserts).
"""
from __future__ import annotations

from .call import Call, out_planes
from .labels import only_on, pin_all
from .rules_index import index_tensor
from .rules_layers import couple_dim, matmul_planes
from .rules_shape import barrier, elementwise_planes, no_planes, value_shape


def embedding(call: Call):
    """aten.embedding(weight, indices, ...): the output's last dim is the weight's dim 1; indices carry no
    channels (the torch-level F.embedding takes the indices first)."""
    pin_all(call.store, call.larg(1, "indices") or ())
    return out_planes(call.param(0, "weight", "weight", 1, "out"), call.out.dim(), call.out.dim() - 1)


def batch_norm(call: Call):
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn): per-channel
    statistics and affine on dim 1 (F.batch_norm takes the running statistics before the affine)."""
    like = only_on(call.lx, 1)
    slots = [call.param(i, n, n, 0, "through", like)
             for i, n in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))]
    if any(s is not None for s in slots):  # without parameters or statistics it works on any width
        couple_dim(call, call.lx, 1, slots)
    return call.lx


def addmm(call: Call):
    """aten.addmm(bias, mat1, mat2, beta, alpha) = beta * bias + alpha * mat1 @ mat2: a matmul (a 2-D get_attr
    operand is a layer weight, e.g. GPT-2's Conv1D with its [in, out] layout) whose output meets the bias
    elementwise (the bias goes with the weight's output channels)."""
    a, b = call.args[1], call.args[2]
    for i, (in_dim, out_dim) in ((2, (0, 1)), (1, (1, 0))):
        if call.param(i, "", "", out_dim, "out") is not None:
            call.param(i, "", "", in_dim, "in")
    planes = matmul_planes(call.store, tuple(a.shape), call.larg(1, "mat1") or (), tuple(b.shape),
                           call.larg(2, "mat2") or ())
    bias = call.args[0]
    operands = [(value_shape(call.out), planes)]
    if hasattr(bias, "shape"):
        operands.append((value_shape(bias), tuple(call.larg(0, "self") or ())))
    return elementwise_planes(call.store, value_shape(call.out), operands)


def slice_(call: Call):
    """aten.slice(x, dim, start, end, step) = x[(:,) * dim + (start:end:step,)]."""
    dim, start, end, step = (call.arg(i, n, d) for i, n, d in ((1, "dim", 0), (2, "start", None),
                                                               (3, "end", None), (4, "step", 1)))
    nodes = [call.arg_node(i, n) for i, n in ((2, "start"), (3, "end"))]
    dim = dim % call.x.dim()
    lead = (slice(None),) * dim
    return index_tensor(call, lead + (slice(start, end, None if step == 1 else step),),
                        lead + (slice(nodes[0], nodes[1], None if step == 1 else step),))


def select(call: Call):
    """aten.select(x, dim, index) = x[(:,) * dim + (index,)]."""
    dim = call.arg(1, "dim") % call.x.dim()
    lead = (slice(None),) * dim
    return index_tensor(call, lead + (call.arg(2, "index"),), lead + (call.arg_node(2, "index"),))


def assert_metadata(call: Call):
    """aten._assert_tensor_metadata(x, size, stride, dtype, ...): export's check of a cast's result. A check of
    dtype, device or layout holds for any width; one of sizes or strides would not (a barrier)."""
    if call.arg(1, "size") is None and call.arg(2, "stride") is None:
        return no_planes(call)
    return barrier(call, "_assert_tensor_metadata checks sizes")
