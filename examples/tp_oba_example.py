"""Torch-Pruning's MetaPruner scoring channels with OBA (obafx.tp_interop.OBAImportance), on random data.

Run::

    python3 examples/tp_oba_example.py                 # a small CNN, 32x32 inputs, a few seconds on a CPU
    python3 examples/tp_oba_example.py --model resnet18  # torchvision resnet18 (weights=None), 64x64 inputs

It prints MACs and parameters before and after, and the number of times OBA scores were computed (once per
pruning step, on the model as pruned so far).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch_pruning as tp

from obafx.tp_interop import OBAImportance


def small_cnn(num_classes: int = 10) -> nn.Module:
    """conv-BN-ReLU blocks with pooling, then flatten -> linear -> ReLU -> linear (3x32x32 inputs)."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))


def build(name: str):
    """(model, image side, classifier module) for ``name``."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        model = torchvision.models.resnet18(weights=None, num_classes=10)
        return model, 64, model.fc
    model = small_cnn()
    return model, 32, model[-1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Torch-Pruning MetaPruner with OBA importance")
    p.add_argument("--model", default="small", choices=["small", "resnet18"])
    p.add_argument("--ratio", type=float, default=0.5, help="channel pruning ratio")
    p.add_argument("--steps", type=int, default=2, help="iterative pruning steps")
    p.add_argument("--batches", type=int, default=2, help="calibration batches per step")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    model, side, classifier = build(args.model)
    model.eval()
    g = torch.Generator().manual_seed(0)

    def fresh_batches():  # new random batches at every pruning step
        return [(torch.randn(args.batch_size, 3, side, side, generator=g), torch.randint(0, 10, (args.batch_size,),
                                                                                       generator=g))
                for _ in range(args.batches)]

    x = torch.randn(1, 3, side, side)
    imp = OBAImportance(fresh_batches)  # the one line a Torch-Pruning user adds
    macs0, params0 = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=args.ratio,
                                  iterative_steps=args.steps, ignored_layers=[classifier])
    for _ in range(args.steps):
        pruner.step()
    macs1, params1 = tp.utils.count_ops_and_params(model, x)
    print(f"MACs   {macs0:,.0f} -> {macs1:,.0f} ({macs1 / macs0:.3f})")
    print(f"params {params0:,.0f} -> {params1:,.0f} ({params1 / params0:.3f})")
    print(f"OBA score computations: {imp.computations} (one per step)")
    return {"macs": (macs0, macs1), "params": (params0, params1), "computations": imp.computations,
            "output": model(x)}


if __name__ == "__main__":
    main()
