"""Small hand-written float64 models for ops that move, pair or pin channels: channel shuffle, pixel
(un)shuffle, sizes measured at run time, GLU, parameterless norms, nn.Unflatten, roll, tensor_split, and unknown
ops that must be barriers (imported by tests; not collected). See small_models.CASES.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.small_attention import Case, randn


def custom_op(x):
    """An op obafx cannot know (wrapped, so fx records one opaque call): must be a barrier."""
    return x.flip(1) * 2.0


torch.fx.wrap("custom_op")


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.c2(x)


class LiteralShuffle(nn.Module):
    """Channel shuffle with literal sizes (nothing measured at run time, rewrite writes the new literals)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        return self.c2(x.view(-1, 4, 4, 8, 8).transpose(1, 2).reshape(-1, 16, 8, 8))


class PixelShuffleNet(nn.Module):
    """PixelUnshuffle (channel c -> c*4 .. c*4+3) then PixelShuffle (c*4 .. c*4+3 -> c)."""

    def __init__(self):
        super().__init__()
        self.c0, self.down = nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2)
        self.c1, self.ps, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        x = F.relu(self.down(F.relu(self.c0(x))))
        return self.c2(F.relu(self.ps(self.c1(x))))


class DynamicHalves(nn.Module):
    """Slices at ``x.shape[1] // 2`` follow the pruned width at run time: both halves must keep the same
    indices, else the split point moves."""

    def __init__(self):
        super().__init__()
        self.c1, self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 5, 1)
        self.c2 = nn.Conv2d(11, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        h = x.shape[1] // 2
        return self.c2(torch.cat([self.a(x[:, :h]), self.b(x[:, h:])], dim=1))


class BarrierWrapped(nn.Module):
    """An unknown (wrapped) op between prunable layers: c1's outputs and c2's inputs must keep their width."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(custom_op(F.relu(self.c1(F.relu(self.c0(x))))))


class BarrierFft(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.fft.fft(F.relu(self.c1(F.relu(self.c0(x)))), dim=1).real
        return self.c2(y)


class NormsGlu(nn.Module):
    """nn.Unflatten after a Linear, InstanceNorm2d and LayerNorm without parameters, nn.GLU and F.glu (the two
    halves pair up), F.prelu with a per-channel slope."""

    def __init__(self):
        super().__init__()
        self.fc, self.un, self.inorm = nn.Linear(6, 8 * 16), nn.Unflatten(1, (8, 4, 4)), nn.InstanceNorm2d(8)
        self.c1, self.glu, self.slope = nn.Conv2d(8, 12, 1), nn.GLU(1), nn.Parameter(torch.rand(6))
        self.c2, self.ln, self.c3 = nn.Conv2d(6, 10, 1), nn.LayerNorm(5, elementwise_affine=False), nn.Conv2d(5, 3, 1)

    def forward(self, x):
        y = F.relu(self.inorm(self.un(self.fc(x))))
        y = F.prelu(self.glu(self.c1(y)), self.slope)
        y = F.instance_norm(F.glu(self.c2(y), dim=1))
        return self.c3(self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class RollSplit(nn.Module):
    """torch.roll over space (channels pass) and over channels (pinned), tensor_split on channels (pinned: rewrite
    cannot re-split it), torch.norm(x, 2, dims) and std over space."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 1)
        self.a, self.b, self.c2, self.out = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = F.relu(torch.roll(self.c0(x), (1, 2), dims=(2, 3)))
        a, b = torch.tensor_split(F.relu(self.c1(y)), 2, dim=1)
        z = self.a(a) + self.b(b)
        z = z * torch.sigmoid(torch.norm(z, 2, (2, 3), True) - z.std(dim=(2, 3), keepdim=True))
        return self.out(torch.roll(F.relu(self.c2(z)), 1, dims=1))


class ForeignSize(nn.Module):
    """A view size measured on channels (a.shape[1]) but used to view an unlabelled tensor (the input's rows):
    a's channels must keep their width, or the view would use a's pruned width on the input."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.out, self.out2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, padding=1), nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, x):
        a = F.relu(self.c1(x))
        rows = self.out(x[:, :, 0, :].reshape(-1, a.shape[1])).view(x.shape[0], -1).mean(1, keepdim=True)
        return self.out2(F.relu(self.c2(a)).amax((2, 3))) + rows


def _img(c=3, s=8):
    return lambda b: randn(b, c, s, s)


OPS_CASES = {
    "channel_shuffle": Case(ChannelShuffle, _img()),
    "channel_shuffle_literal": Case(LiteralShuffle, _img()),
    "pixel_shuffle": Case(PixelShuffleNet, _img()),
    "dynamic_halves": Case(DynamicHalves, _img()),
    "norms_glu_unflatten": Case(NormsGlu, lambda b: randn(b, 6), exact=False),
    "roll_tensor_split": Case(RollSplit, _img()),
    "foreign_size": Case(ForeignSize, _img()),
    "barrier_wrapped": Case(BarrierWrapped, _img()),
    "barrier_fft": Case(BarrierFft, _img()),
}
