"""Inputs and outputs people have (issue 14): any output structure fx can express prunes and verifies; unusual
devices, dtypes and paths get obafx errors; the report says what OBA scored with.

The masking check here is the tests' own: the original model with the removed hidden units' weight rows zeroed
(read off the report's plan), compared with the pruned output (nothing imported from obafx.passes.verify)."""
from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
from torch import nn

import obafx
from obafx.passes.errors import ConfigError, ObafxError, PathError, PlanError

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

Pair = collections.namedtuple("Pair", "logits extra")


class Net(nn.Module):
    """Two prunable hidden layers; ``kind`` picks the output structure."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        y = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        if self.kind == "tensor":
            return y
        if self.kind == "tuple":
            return y, y * 2
        if self.kind == "namedtuple":
            return Pair(y, y + 1)
        if self.kind == "dict":
            return {"logits": y, "scaled": 3 * y}
        return {"out": (y, [y - 1, {"deep": y * y}]), "n": Pair(y, (y,))}  # nested


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    return [t for v in value for t in _leaves(v)]


def _zeroed_original(model: Net, plan) -> Net:
    """The original with every removed hidden unit's weight row and bias zeroed (what pruning must equal)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("a", "b"):
            kept = plan.get(f"{name}.weight", {}).get("0")
            if kept is None:
                continue
            gone = sorted(set(range(getattr(masked, name).out_features)) - set(kept))
            getattr(masked, name).weight[gone] = 0
            getattr(masked, name).bias[gone] = 0
    return masked


@pytest.mark.parametrize("kind", ["tensor", "tuple", "namedtuple", "dict", "nested"])
def test_any_output_structure_prunes_and_verifies(kind):
    model, x = Net(kind).double().eval(), torch.randn(5, 6, dtype=torch.float64)
    pruned = obafx.compile_prune(model, x, channels=0.4)
    rep = obafx.report(pruned)
    assert rep.params_after < rep.params_before
    assert rep.masked_error is not None and rep.masked_error < 1e-9
    with torch.no_grad():
        got, want = pruned(x), _zeroed_original(model, rep.plan)(x)
    assert type(got) is type(want)
    assert [tuple(t.shape) for t in _leaves(got)] == [tuple(t.shape) for t in _leaves(want)]
    for g, w in zip(_leaves(got), _leaves(want)):
        assert torch.allclose(g, w, rtol=0, atol=1e-10)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


BAD_INPUTS = {
    "meta model": lambda: (_mlp().to("meta"), torch.randn(2, 4)),
    "meta model and input": lambda: (_mlp().to("meta"), torch.randn(2, 4, device="meta")),
    "meta input": lambda: (_mlp(), torch.randn(2, 4, device="meta")),
    "float16": lambda: (_mlp().half(), torch.randn(2, 4).half()),
    "bfloat16": lambda: (_mlp().bfloat16(), torch.randn(2, 4).bfloat16()),
    "complex64": lambda: (_mlp().to(torch.complex64), torch.randn(2, 4, dtype=torch.complex64)),
    "float8": lambda: (_mlp().to(torch.float8_e4m3fn), torch.randn(2, 4).to(torch.float8_e4m3fn)),
    "integer input to a float model": lambda: (_mlp(), torch.ones(2, 4, dtype=torch.long)),
    "float64 model, float32 input": lambda: (_mlp().double(), torch.randn(2, 4)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_unusual_devices_and_dtypes_get_obafx_errors(case):
    model, x = BAD_INPUTS[case]()
    with pytest.raises(ConfigError, match="What to do"):
        obafx.compile_prune(model, x, channels=0.5)


def test_load_and_save_paths_get_obafx_errors(tmp_path):
    with pytest.raises(PathError, match="What to do"):
        obafx.load(tmp_path / "missing.safetensors", _mlp())
    with pytest.raises(PathError, match="What to do"):
        obafx.load(tmp_path, _mlp())  # a folder
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a safetensors file")
    with pytest.raises(PlanError, match="What to do"):
        obafx.load(junk, _mlp())
    pruned = obafx.compile_prune(_mlp(), torch.randn(2, 4), channels=0.5)
    with pytest.raises(PathError, match="does not exist"):
        obafx.save(pruned, tmp_path / "no" / "such" / "folder" / "m.safetensors")
    assert issubclass(PathError, ObafxError) and issubclass(PathError, OSError)


SCORED = {
    "magnitude": (dict(importance="magnitude"), "no data: magnitude"),
    "oba, no data": (dict(importance="oba"), "no data: the example input, loss cross_entropy (default), targets = "
                                              "the model's own argmax predictions"),
    "oba, inputs only": (dict(importance="oba", data=[torch.randn(4, 4)] * 2),
                         "data= batches, loss cross_entropy (default), targets = the model's own argmax predictions "
                         "(the batches carry none)"),
    "oba, labels": (dict(importance="oba", data=[(torch.randn(4, 4), torch.randint(0, 3, (4,)))] * 2),
                    "data= batches, loss cross_entropy (default), targets = the labels in the batches"),
    "oba, own loss": (dict(importance="oba", loss_fn=nn.functional.mse_loss,
                           data=[(torch.randn(4, 4), torch.randn(4, 3))]), "loss mse_loss, targets = the labels"),
}


@pytest.mark.parametrize("kwargs, expected", [
    (dict(importance="oba"), "; train mode (BatchNorm on each batch's statistics), mode=residual, unit_sum=member, "
                             "rank=per_mac"),
    (dict(importance="oba", train=False, mode="full", rank="score", unit_sum="abs"),
     "; eval mode (running statistics), mode=full, unit_sum=abs, rank=score, normalizer=max"),
    (dict(importance="taylor"), "; eval mode (running statistics), unit_sum=signed, rank=score, normalizer=max"),
])
def test_report_says_how_the_scores_were_computed_and_ranked(kwargs, expected):
    """The settings each default resolved to are in the report: the defaults differ per criterion."""
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = obafx.report(obafx.compile_prune(_mlp(), torch.randn(2, 4), channels=0.5, data=data, **kwargs))
    assert rep.scored_with.endswith(expected)


@pytest.mark.parametrize("case", sorted(SCORED))
def test_report_says_what_the_scores_came_from(case):
    kwargs, expected = SCORED[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(_mlp(), torch.randn(2, 4), channels=0.5, **kwargs)
    rep = obafx.report(pruned)
    assert expected in rep.scored_with
    assert f"scored with: {rep.scored_with}" in rep.summary()
