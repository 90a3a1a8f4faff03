"""Unstructured mode: OBA.md's per-weight score under one global threshold."""
import pytest
import torch

import obafx
from obafx.passes.hvp import parameter_scores, prunable_parameter_names
from obafx.passes.unstructured import global_masks, unstructured_scores
from tests.small_nets import SmoothCNN


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("importance", ["magnitude", "oba"])
def test_sparsity_is_reached_and_weights_are_zeroed(importance):
    torch.manual_seed(0)
    m = SmoothCNN().double().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pruned = obafx.compile_prune(m, data()[0][0], structure="unstructured", sparsity=0.6,
                                 importance=importance, data=data())
    rep = obafx.report(pruned)
    assert abs(rep.overall_sparsity - 0.6) < 1e-3
    weights = [p for n, p in pruned.named_parameters() if n in rep.sparsity]
    zeros = sum((w == 0).sum().item() for w in weights)
    assert zeros >= 0.6 * sum(w.numel() for w in weights) - 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # user's model untouched


def test_oba_unstructured_score_formula():
    torch.manual_seed(1)
    m = SmoothCNN().double().eval()
    names = [n for n in prunable_parameter_names(m) if n.endswith("weight")]
    s = parameter_scores(m, data(), params=names)
    params = dict(m.named_parameters())
    scores = unstructured_scores(s, {n: params[n] for n in names})
    for n in names:
        expect = s[n].abs() / s[n].abs().max() + params[n].detach().abs()
        assert torch.allclose(scores[n], expect.double())
    masks = global_masks(scores, 0.5)
    kept = torch.cat([scores[n][masks[n]] for n in names])
    gone = torch.cat([scores[n][~masks[n]] for n in names])
    assert gone.max() <= kept.min()  # one global threshold


def test_unstructured_needs_sparsity():
    with pytest.raises(obafx.ConfigError, match="sparsity"):
        obafx.compile_prune(SmoothCNN(), torch.randn(1, 3, 8, 8), structure="unstructured")
