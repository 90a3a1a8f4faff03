"""The Hessian-block facet of the op table (ops.py): each op's second-order behaviour, keyed by bare name, for
ops whose entry in ops.py gives no ``hessian`` kind (and for ops with no channel rule at all: einsum, tril, ...).
Read by hessian_blocks.py through ``ops.hessian_kind``; the kinds are explained there.
"""
from __future__ import annotations

# Second-order behaviour of ops, keyed by bare name (functions, methods and operator dunders alike):
# copy: each output element copies one input element (or is piecewise linear in it, like ReLU);
# add: element-wise and linear in every input; ew_curv: element-wise and smooth; mix_linear: (piecewise) linear,
# mixes elements; mix_curv: nonlinear, mixes elements; product: bilinear in its operands (add_product: in all
# but the first); ew_product / div / sdpa / cat: see _transfer; cut: no derivative flows.
_OPS = {
    "copy": """view reshape flatten unflatten permute transpose t contiguous clone getitem split chunk unbind narrow
        select squeeze unsqueeze expand expand_as repeat tile to float double type type_as view_as reshape_as flip
        roll movedim moveaxis swapaxes getattr neg pos relu relu6 leaky_relu hardtanh threshold clamp clip abs
        dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout pad tril triu diagonal
        masked_fill gather index_select identity prelu leakyrelu alphadropout zeropad1d zeropad2d zeropad3d
        constantpad1d constantpad2d constantpad3d reflectionpad1d reflectionpad2d replicationpad1d replicationpad2d
        pixelshuffle pixelunshuffle channelshuffle""",
    "add": "add radd iadd sub rsub isub where maximum minimum",
    "ew_curv": """gelu silu mish softplus elu selu celu hardswish logsigmoid sigmoid tanh erf exp exp2 expm1 log log2
        log1p sqrt rsqrt reciprocal sin cos atan softsign tanhshrink pow square""",
    "mix_linear": """sum mean cumsum avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
        adaptive_avg_pool3d max_pool1d max_pool2d max_pool3d adaptive_max_pool1d adaptive_max_pool2d max min amax
        amin interpolate upsample embedding avgpool1d avgpool2d avgpool3d adaptiveavgpool1d adaptiveavgpool2d
        adaptiveavgpool3d maxpool1d maxpool2d maxpool3d adaptivemaxpool1d adaptivemaxpool2d adaptivemaxpool3d""",
    "mix_curv": """softmax log_softmax softmin layer_norm group_norm instance_norm rms_norm normalize norm var std
        logsumexp glu cosine_similarity logsoftmax layernorm groupnorm localresponsenorm instancenorm1d
        instancenorm2d instancenorm3d rmsnorm""",
    "product": "matmul rmatmul imatmul mm bmm einsum outer dot inner mv tensordot kron bilinear",
    "layer": "linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d",
    "add_product": "baddbmm addmm addbmm addmv addr",
    "ew_product": "mul rmul imul multiply", "div": "truediv div true_divide divide itruediv",
    "cat": "cat concat concatenate stack hstack vstack",
    "sdpa": "scaled_dot_product_attention", "cut": "detach",
}
HESSIAN_KINDS = {name: kind for kind, names in _OPS.items() for name in names.split()}  # modules: class name

def bare_name(target) -> str:
    """Bare op name of a call target: 'gelu', 'add' (from operator.add, '__add__', 'add_'), ''."""
    if isinstance(target, str):
        return target.strip("_")
    module = getattr(target, "__module__", None) or ""
    if module and not module.startswith(("torch", "_operator", "operator", "builtins")):
        return ""  # a user function: never matched by name
    return getattr(target, "__name__", "").strip("_")
