"""Small hand-written float64 models, one per channel-coupling pattern (imported by tests; not collected).

``CASES`` maps a name to a `Case`: how to build the model (norm parameters and statistics randomised, eval
mode, float64), how to make an input for a batch size, whether masking equivalence is exact (no normalisation
mixes pruned channels) and whether the model has prunable channels.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from tests.small_attention import ATTENTION_CASES, Case, randn
from tests.small_ops import OPS_CASES
from tests.small_table_ops import TABLE_CASES


class ConvNet1d(nn.Module):
    """Conv1d, BatchNorm1d, grouped Conv1d (groups=4), mean over length, Linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(3, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.c2, self.c3, self.fc = nn.Conv1d(16, 16, 3, padding=1, groups=4), nn.Conv1d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c3(F.relu(self.c2(x))))
        return self.fc(x.mean(-1))


class ConvNet2d(nn.Module):
    """Conv2d, grouped (4), depthwise, depthwise with channel multiplier 2, 1x1, pool, flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g4, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.pw, self.fc = nn.Conv2d(32, 12, 1), nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.g4(x)))
        x = F.relu(self.dw2(F.relu(self.dw(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.pw(x)), 1)
        return self.fc(torch.flatten(x, 1))


class TransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.up, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.ConvTranspose2d(12, 10, 2, stride=2), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.up(F.relu(self.c1(x)))))


class Mlp3d(nn.Module):
    """Linear on 3-D inputs (tokens)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(F.gelu(self.a(x)))))


class MlpBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.relu(self.bn(self.a(x))))


class MlpLn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b, self.c = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(self.ln(self.a(x)))))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x))))


class EmbedNet(nn.Module):
    """nn.Embedding plus F.embedding with a get_attr table (the two tables' columns go together)."""

    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(50, 16), nn.Linear(16, 8), nn.Linear(8, 4)
        self.table = nn.Parameter(torch.randn(50, 16))

    def forward(self, idx):
        return self.b(F.relu(self.a(self.emb(idx) + F.embedding(idx, self.table))))


class PreluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


class FreeParams(nn.Module):
    """Free parameters through get_attr: a per-channel scale (C,) on channels-last, a shift (C,1,1)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.shift = nn.Parameter(torch.randn(16, 1, 1))
        self.scale = nn.Parameter(torch.randn(16))

    def forward(self, x):
        x = F.relu(self.c1(x)) + self.shift
        x = (x.permute(0, 2, 3, 1) * self.scale).permute(0, 3, 1, 2)
        return self.c2(x)


class TinyVit(nn.Module):
    """Patch conv, flatten+transpose to tokens, class token cat on the token dim, position embedding added,
    residual MLP with a layer-scale vector, class-token head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.fc1, self.fc2, self.gamma = nn.Linear(16, 32), nn.Linear(32, 16), nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                              nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = x + F.relu(self.c2(x))
        x = x * torch.sigmoid(self.c3(x))
        return self.c4(x)


class SqueezeExcite(nn.Module):
    """SE with 1x1 convs (x * sigmoid(fc(pool(x)))) and with Linear layers through a view."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1, self.e1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.r2, self.e2, self.c2 = nn.Linear(16, 6), nn.Linear(6, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = x * torch.sigmoid(self.e1(F.relu(self.r1(F.adaptive_avg_pool2d(x, 1)))))
        s = torch.sigmoid(self.e2(F.relu(self.r2(x.mean((2, 3))))))
        x = x * s.view(x.shape[0], -1, 1, 1)
        return self.c2(x)


class SpatialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.att, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        return self.c2(x * torch.sigmoid(self.att(x)))


class CatSplit(nn.Module):
    """cat along channels, chunk (GLU), split with a sizes list, slicing x[:, :c1] / x[:, c1:]."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.g = nn.Conv2d(14, 20, 1)
        self.s1, self.s2 = nn.Conv2d(4, 8, 1), nn.Conv2d(6, 8, 1)
        self.t1, self.t2 = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 5, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        p, q = self.g(y).chunk(2, dim=1)
        y = p * torch.sigmoid(q)
        u, v = torch.split(y, [4, 6], dim=1)
        y = F.relu(self.s1(u) + self.s2(v))
        z = torch.cat([self.t1(y[:, :3]), self.t2(y[:, 3:])], dim=1)
        return self.out(z[:, :8] + y)


class FlattenLinear(nn.Module):
    """Channels folded with spatial dims into a Linear: flatten, view(B, -1), reshape with a literal size."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.f1, self.f2, self.f3 = nn.Linear(8 * 16, 10), nn.Linear(6 * 16, 10), nn.Linear(4 * 16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = F.max_pool2d(x, 2)
        a = self.f1(torch.flatten(F.relu(self.c1(x)), 1))
        b = self.f2(F.relu(self.c2(x)).view(x.shape[0], -1))
        c = self.f3(F.relu(self.c3(x)).reshape(-1, 64))
        return self.head(F.relu(a + b + c))


class ChannelsLast(nn.Module):
    """conv -> permute to channels-last -> Linear MLP -> permute back -> residual; and a transpose on 1-D."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2, self.c2 = (nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 24),
                                                nn.Linear(24, 16), nn.Conv1d(16, 4, 1))

    def forward(self, x):
        x = F.relu(self.c1(x))
        y = self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        x = (x + y).flatten(2)
        z = x.transpose(1, 2).relu().transpose(1, 2)
        return self.c2(z)


class IndexAndWhere(nn.Module):
    """x[:, 5] (an int index on channels: that channel stays, the index moves), a comparison inside
    torch.where, and a weight used through ``.mT`` in a matmul."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 8, 1)
        self.w = nn.Parameter(torch.randn(6, 8) * 0.3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.c1(x)
        y = torch.where(y > 0, y, 0.1 * y)
        z = self.c2(y) * y[:, 5].unsqueeze(1)
        z = z.mean((2, 3)) @ self.w.mT
        return self.head(torch.relu(z))


class Shared(nn.Module):
    """One conv and one Linear each called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.c1, self.sh, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.lin, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.sh(F.relu(self.sh(F.relu(self.c1(x))))))
        x = F.relu(self.c2(x)).mean((2, 3))
        return self.head(F.relu(self.lin(F.relu(self.lin(x)))))


class Functional(nn.Module):
    """F.conv2d / F.linear with get_attr weights, torch.matmul with a weight matrix."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(12, 16) * 0.3)
        self.w3 = nn.Parameter(torch.randn(12, 10) * 0.3)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)).mean((2, 3))
        x = F.relu(F.linear(x, self.w2))
        return self.head(F.relu(torch.matmul(x, self.w3)))


def _img(c=3, s=8):
    return lambda b: randn(b, c, s, s)


CASES: Dict[str, Case] = {
    "conv1d_grouped": Case(ConvNet1d, lambda b: randn(b, 3, 10)),
    "conv2d_grouped_depthwise": Case(ConvNet2d, _img()),
    "conv_transpose": Case(TransposeNet, _img()),
    "linear_3d": Case(Mlp3d, lambda b: randn(b, 7, 6)),
    "batchnorm1d": Case(MlpBn, lambda b: randn(b, 8)),
    "layernorm": Case(MlpLn, lambda b: randn(b, 5, 8), exact=False),
    "groupnorm": Case(GroupNormNet, _img(), exact=False),
    "embedding": Case(EmbedNet, lambda b: torch.randint(0, 50, (b, 7))),
    "prelu": Case(PreluNet, _img()),
    "free_params": Case(FreeParams, _img()),
    "tiny_vit": Case(TinyVit, _img(3, 8)),
    "residual_add_mul": Case(Residual, _img()),
    "squeeze_excite": Case(SqueezeExcite, _img()),
    "spatial_attention": Case(SpatialAttention, _img()),
    "cat_chunk_split_slice": Case(CatSplit, _img()),
    "flatten_view_reshape": Case(FlattenLinear, _img()),
    "channels_last": Case(ChannelsLast, _img()),
    "shared_modules": Case(Shared, _img()),
    "index_where_mT": Case(IndexAndWhere, _img()),
    "functional": Case(Functional, _img()),
    **OPS_CASES,
    **TABLE_CASES,
    **ATTENTION_CASES,
}
