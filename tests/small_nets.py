"""Small hand-written models shared by tests (not a test module)."""
import torch
import torch.nn as nn


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(14, 10, 3, padding=1)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(self.c(y).mean((2, 3)))


class SmoothCNN(nn.Module):
    """A small residual CNN with BatchNorm and SiLU (smooth: Hessian oracles are valid)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = nn.functional.silu(self.bn(self.stem(x)))
        x = x + nn.functional.silu(self.c1(x))
        return self.fc(nn.functional.silu(self.c2(x)).mean((2, 3)))


class Wide(nn.Module):
    """Three Linear layers (6 -> 40 -> 32 -> 4) with ReLUs: two prunable groups of different widths and MACs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 40), nn.Linear(40, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))
