"""Small float64 models for op-table entries no other test model uses (issue 14: every entry runs in a test):
stack, repeat/tile, repeat_interleave, the three unflatten forms with a pruned dim, F.layer_norm with a literal
normalized_shape, number-only calls (dim, _assert), torchvision's Permute module. Imported by small_models.CASES,
so tests/test_rules_models.py runs every oracle on them; tests/test_ops_table.py checks that every entry ran."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Permute

from tests.small_attention import Case, randn


class StackTile(nn.Module):
    """stack of two coupled branches, spatial repeat / tile / repeat_interleave (channels never repeated)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        torch._assert(x.dim() == 4, "an image batch")
        s = torch.stack([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=2).sum(2)  # (N, 8, H, W)
        t = s.repeat(1, 1, 2, 1).tile((1, 1, 1, 2)).repeat_interleave(2, dim=3)  # (N, 8, 2H, 4W)
        return self.head(t[:, :, : x.shape[2], : x.shape[3]])


class Unflattens(nn.Module):
    """A 16-wide hidden layer unflattened to (4, 4) three ways, then flattened back: the literal sizes of the
    method and torch.unflatten forms are rewritten, nn.Unflatten's are the module's own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.unflat, self.out = nn.Unflatten(1, (4, 4)), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x)).unflatten(1, (4, 4)).flatten(1)
        h = torch.unflatten(F.relu(self.fc2(h)), 1, (4, 4)).flatten(1)
        return self.out(self.unflat(F.relu(self.fc3(h))).flatten(1))


class LiteralLayerNorm(nn.Module):
    """F.layer_norm with its normalized_shape written as a literal, on tokens (N, T, 12)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 12), nn.Linear(12, 3)
        self.w, self.b = nn.Parameter(torch.rand(12) + 0.5), nn.Parameter(torch.rand(12) - 0.5)

    def forward(self, x):
        return self.fc2(F.layer_norm(self.fc1(x), (12,), self.w, self.b)).mean(1)


class TorchvisionPermute(nn.Module):
    """torchvision's Permute module around a channels-last Linear (as in ConvNeXt)."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)
        self.to_last, self.to_first = Permute([0, 2, 3, 1]), Permute([0, 3, 1, 2])

    def forward(self, x):
        return self.c2(self.to_first(self.fc(self.to_last(F.relu(self.c1(x))))))


TABLE_CASES = {
    "stack_tile_repeat": Case(StackTile, lambda b: randn(b, 3, 6, 6)),
    "unflatten_forms": Case(Unflattens, lambda b: randn(b, 6)),
    "literal_layer_norm": Case(LiteralLayerNorm, lambda b: randn(b, 4, 5), exact=False),
    "torchvision_permute": Case(TorchvisionPermute, lambda b: randn(b, 3, 6, 6)),
}


class AtenForms(nn.Module):
    """torch.addmm and a dtype cast: under torch.export they become aten.addmm and an aten metadata assert (the
    aten-only entries of the table); under torch.fx torch.addmm has its own entry (the same rule)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 8)
        self.w, self.b = nn.Parameter(torch.randn(3, 8) / 3), nn.Parameter(torch.randn(3) / 3)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x.to(torch.float64)))))
        return torch.addmm(self.b, h, self.w.t())


TABLE_CASES["aten_forms"] = Case(AtenForms, lambda b: randn(b, 6))
