"""Which layer's choice costs accuracy? Swap one layer's kept channels between two pruned VGG-BN models.

    python3 benchmarks/width_swap.py --snapshots /tmp/g7/snap --a oba_residual_permac_abs --b taylor \
        --factors 3,4 --seeds 0 --out benchmarks/results/width_swap.json

Both pruned models come from the same committed dense model (benchmarks/accuracy.py snapshots, recalibrated,
not fine-tuned), so each is a set of kept output units per layer of the dense model. Those sets are recovered
exactly: a conv's kept channels by matching the BatchNorm weights that follow it, a Linear's by its bias.
A hybrid is the dense model with every unit outside the chosen sets zeroed (conv rows, BatchNorm weight and
bias, Linear rows and bias): a zeroed channel outputs exactly 0, which is what removing it does (the masking
oracle). Each hybrid gets the protocol's BatchNorm recalibration (the same 20 batches of 128 per seed) and is
evaluated on the whole test set. Rows per (factor, seed):
- ``a`` and ``b``: the masked copies of A and B (sanity: equal to their acc_pruned up to recalibration order),
- ``a_with_b[layer]``: A's sets with B's set at one layer (and the MACs that hybrid keeps),
- ``b_with_a[layer]``: the converse,
- ``overlap[layer]``: |A ∩ B| / min(|A|, |B|), how far the two criteria agree on which units to keep.
A layer whose swap moves A's accuracy most toward B's is where A's allocation or selection costs accuracy.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import acc_protocol as proto  # noqa: E402
from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense as dense_models  # noqa: E402
from obafx.bench import train as training  # noqa: E402

MODEL = "vgg_bn"


def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The Conv2d/Linear layers whose outputs a pruning may remove (all but the classifier's last Linear)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return dict(list(layers.items())[:-1])


def norm_after(modules: Dict[str, nn.Module], name: str):
    """The BatchNorm right after layer ``name`` in its Sequential (VGG-BN's conv -> BN), else None."""
    parent, _, index = name.rpartition(".")
    follower = modules.get(f"{parent}.{int(index) + 1}")
    return follower if isinstance(follower, nn.BatchNorm2d) else None


def unit_signature(model: nn.Module, name: str) -> torch.Tensor:
    """Per-output-unit values that pruning copies unchanged: the next BatchNorm's weight, else the layer's bias."""
    modules = dict(model.named_modules())
    norm = norm_after(modules, name)
    return (norm.weight if norm is not None else modules[name].bias).detach()


def kept_units(dense: nn.Module, pruned: nn.Module) -> Dict[str, torch.Tensor]:
    """Indices (into the dense layer) of the output units ``pruned`` kept, per prunable layer, matched exactly."""
    kept = {}
    for name in prunable_layers(dense):
        full, part = unit_signature(dense, name), unit_signature(pruned, name)
        match = (part[:, None] == full[None, :])
        if not bool((match.sum(1) == 1).all()):
            raise RuntimeError(f"{name}: kept units of the pruned model do not match the dense model's one to one")
        kept[name] = match.float().argmax(1).sort().values
    return kept


def masked(dense: nn.Module, kept: Dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``dense`` whose units outside ``kept`` output exactly zero (rows, norm affine and bias zeroed)."""
    model = copy.deepcopy(dense)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in kept.items():
            layer = modules[name]
            drop = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            drop[keep] = False
            layer.weight[drop] = 0
            if layer.bias is not None:
                layer.bias[drop] = 0
            norm = norm_after(modules, name)
            if norm is not None:
                norm.weight[drop] = 0
                norm.bias[drop] = 0
    return model


def layer_macs(dense: nn.Module, kept: Dict[str, torch.Tensor]) -> float:
    """MACs of the convs and Linears when each keeps only its kept outputs and its kept inputs (one 1x32x32 image)."""
    sizes, hooks = {}, []
    for name, m in dense.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: sizes.__setitem__(n, out.shape)))
    with torch.no_grad():
        dense.eval()(proto.EXAMPLE)
    for h in hooks:
        h.remove()
    modules, total, prev_keep = dict(dense.named_modules()), 0.0, 1.0
    for name in sizes:
        m = modules[name]
        out_keep = len(kept[name]) / m.weight.shape[0] if name in kept else 1.0
        spatial = sizes[name][2] * sizes[name][3] if m.weight.dim() == 4 else 1
        total += m.weight.numel() * spatial * out_keep * prev_keep
        prev_keep = out_keep
    return total


def accuracy(dense, kept, recal, test_loader) -> float:
    model = masked(dense, kept)
    training.recalibrate_bn(model, recal, n_batches=len(recal))
    return training.evaluate(model, test_loader)


def compare(dense, a, b, recal, test_loader) -> Dict[str, object]:
    """The swap table of two pruned models' kept sets (see the module docstring)."""
    ka, kb = kept_units(dense, a), kept_units(dense, b)
    macs0 = layer_macs(dense, {})
    row = {"a": accuracy(dense, ka, recal, test_loader), "b": accuracy(dense, kb, recal, test_loader),
           "macs_a": layer_macs(dense, ka) / macs0, "macs_b": layer_macs(dense, kb) / macs0,
           "widths_a": {n: len(k) for n, k in ka.items()}, "widths_b": {n: len(k) for n, k in kb.items()},
           "overlap": {}, "a_with_b": {}, "b_with_a": {}}
    for name in ka:
        common = len(set(ka[name].tolist()) & set(kb[name].tolist()))
        row["overlap"][name] = common / min(len(ka[name]), len(kb[name]))
        for key, base, other in (("a_with_b", ka, kb), ("b_with_a", kb, ka)):
            hybrid = {**base, name: other[name]}
            row[key][name] = {"acc": accuracy(dense, hybrid, recal, test_loader),
                              "macs": layer_macs(dense, hybrid) / macs0}
        print(name, row["overlap"][name], row["a_with_b"][name], row["b_with_a"][name], flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", required=True, help="folder of benchmarks/accuracy.py --snapshots")
    p.add_argument("--a", default="oba_residual_permac_abs")
    p.add_argument("--b", default="taylor")
    p.add_argument("--factors", default="3,4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/width_swap.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = dense_models.load(MODEL).eval()
    train_loader, test_loader = fmnist.loaders(batch_size=128)
    cfg = {"recal_batches": 20, "recal_size": 128}
    rows: List[Dict[str, object]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        recal = proto.recal_batches(train_loader.dataset, cfg, seed)
        for factor in (float(f) for f in args.factors.split(",")):
            pair = [torch.load(proto.snapshot_path(Path(args.snapshots), {"model": MODEL, "method": m,
                               "factor": factor, "seed": seed}), weights_only=False) for m in (args.a, args.b)]
            rows.append({"factor": factor, "seed": seed, **compare(dense, *pair, recal, test_loader)})
            write_json(args.out, {"command": "python3 benchmarks/width_swap.py " + " ".join(sys.argv[1:]),
                                  "data_set": "Fashion-MNIST test set (10k)",
                                  "model": f"{MODEL} (benchmarks/models/{MODEL}.safetensors)", "a": args.a,
                                  "b": args.b, "protocol": __doc__.split("\n\n", 2)[2].strip(),
                                  "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
