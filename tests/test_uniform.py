"""compile_prune(uniform=True): groups of one kind (the same role in repeated layers) lose the same number of
units (passes/uniform.py), on hand-made couplings, an fx-traced model and the tiny LLaMA, Qwen2 and BERT."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import obafx
from obafx.passes.facts import Coupling, Group
from obafx.passes.uniform import kind_of, uniform_coupling, without_kept

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _coupling():
    """Two layers' MLP groups of one kind (units 0-3 and 4-7) and a head group (units 8-9)."""
    groups = [Group(f"layers.{i}.fc:0", tuple(range(4 * i, 4 * i + 4)),
                    ((f"layers.{i}.fc.weight", 0), (f"layers.{i}.out.weight", 1))) for i in range(2)]
    groups.append(Group("head:0", (8, 9), (("head.weight", 0),)))
    slots = {m: np.asarray(g.units) for g in groups for m in g.members}
    return Coupling.frozen(groups, slots, {k: ("out", k[0]) for k in slots}, {}, -1, ())


def test_kind_erases_layer_indices_and_keeps_the_width():
    a, b, head = _coupling().groups
    assert kind_of(a) == kind_of(b) != kind_of(head)


def test_the_jth_weakest_units_of_each_layer_become_one_unit_at_their_mean_score():
    scores = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.3, 4: 0.2, 5: 0.8, 6: 0.4, 7: 0.6, 8: 1.0, 9: 2.0}
    coupling, tied = uniform_coupling(_coupling(), scores)
    assert sorted(g.width for g in coupling.groups) == [2, 4]
    layer1 = coupling.slot_units[("layers.1.fc.weight", 0)]
    assert list(layer1) == [1, 0, 3, 2]  # unit 4 (layer 1's weakest) is now unit 1 (layer 0's weakest)...
    assert tied[1] == pytest.approx(0.15) and tied[0] == pytest.approx(0.85)  # ...scored with their mean
    assert 4 not in tied and tied[8] == 1.0


def test_without_kept_drops_the_groups_holding_a_listed_dim():
    coupling = _coupling()
    assert [g.id for g in without_kept(coupling, ["head.*:0"]).groups] == ["layers.0.fc:0", "layers.1.fc:0"]
    assert [g.id for g in without_kept(coupling, "layers.1.out.weight:1").groups] == ["layers.0.fc:0", "head:0"]
    assert without_kept(coupling, ()) is coupling
    with pytest.raises(obafx.ConfigError, match="matches no parameter dim"):
        without_kept(coupling, ["head.weight:1"])


class Blocks(nn.Module):
    """Three equal MLP blocks on a residual stream (the kind of model uniform= is for)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8)) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_uniform_on_an_fx_model_meets_a_mac_budget_and_keep_widths_holds_a_group():
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(4, 8)
    for b, scale in zip(model.blocks, (0.1, 1.0, 10.0)):  # free selection would empty block 0 first
        b[0].weight.data *= scale

    def hidden(gm):
        return [gm.get_submodule(f"blocks.{i}.0").out_features for i in range(3)]

    assert len(set(hidden(obafx.compile_prune(model, x, macs=0.5)))) > 1  # the constraint below is not vacuous
    pruned = obafx.compile_prune(model, x, macs=0.5, uniform=True)
    rep = obafx.report(pruned)
    assert len(set(hidden(pruned))) == 1 and hidden(pruned)[0] < 24
    assert rep.masked_error < 1e-5 and 0.45 <= rep.macs_ratio <= 0.55
    kept = obafx.compile_prune(model, x, channels=0.3, keep_widths="blocks.1.0.weight:0")
    assert hidden(kept)[1] == 24 and min(hidden(kept)) < 24


transformers = pytest.importorskip("transformers")
from tests import hf_models as H  # noqa: E402

LAYER = {"bert": ("model.bert.encoder.layer.{}.", ("intermediate.dense.weight", "attention.self.query.weight",
                                                   "attention.self.value.weight")),
         "llama": ("model.model.layers.{}.", ("mlp.up_proj.weight", "self_attn.q_proj.weight",
                                              "self_attn.v_proj.weight"))}


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
def test_uniform_hf_models_keep_one_width_per_kind_and_the_masking_oracle(name):
    """macs=0.6 with uniform=True: every layer has the same intermediate size and attention layout (query and
    value rows), the pruned module equals the masked original (masked_error), and FlopCounterMode's ratio is
    within the budget's tolerance."""
    model, x = H.build(name), H.example(name)
    pruned = obafx.compile_prune(model, x, macs=0.6, uniform=True)
    prefix, keys = LAYER.get(name, LAYER["llama"])
    params = dict(pruned.named_parameters())
    widths = [tuple(params[prefix.format(i) + k].shape[0] for k in keys) for i in range(2)]
    assert widths[0] == widths[1] and widths[0][0] < 64, widths
    assert obafx.report(pruned).masked_error < 1e-5
    with torch.no_grad(), FlopCounterMode(display=False) as after:
        pruned(x)
    with torch.no_grad(), FlopCounterMode(display=False) as before:
        model(x)
    assert 0.55 <= after.get_total_flops() / before.get_total_flops() <= 0.63
