"""Data-parallel OBA pruning with torchrun: every rank scores its shard, all ranks end with the same model.

Run (two CPU processes, gloo; on a GPU machine each rank takes cuda:LOCAL_RANK and NCCL)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_prune.py --out DIR

Options: --data fashion|synthetic|auto (auto: Fashion-MNIST if installed, else random images), --batches N
(calibration batches in total, shared round-robin by the ranks), --batch-size, --macs (fraction of MACs to
keep), --steps, --criterion (oba, taylor, obd, fisher, magnitude, random), --width (channels of the first conv).

Each rank writes DIR/rank<R>.json: its plan, the SHA-256 of the plan and of the pruned state_dict, MACs before
and after. Rank 0 prints whether all ranks agree (they must: they apply the same all-reduced scores).
Without torchrun it runs as a single process (world size 1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import obafx
from obafx.distributed import distributed_importance, init_distributed, rank_and_world, shard


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 with two 2x2 max pools, global average pool, linear classifier (1x32x32 inputs)."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def calibration_data(kind: str, n_batches: int, batch_size: int, seed: int = 0):
    """The global list of (images, labels) batches, identical on every rank (sharded afterwards)."""
    if kind in ("fashion", "auto"):
        try:
            from obafx.bench.data import calibration_batches, fashion_mnist
            return calibration_batches(fashion_mnist("train", limit=max(4096, n_batches * batch_size)),
                                       n_batches, batch_size, seed=seed)
        except (ImportError, obafx.ConfigError):
            if kind == "fashion":
                raise
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 1, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(n_batches)]


def state_digest(module: nn.Module) -> str:
    """SHA-256 over the state_dict: names, shapes, dtypes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for rank<R>.json")
    p.add_argument("--data", default="auto", choices=["auto", "fashion", "synthetic"])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--criterion", default="oba")
    p.add_argument("--width", type=int, default=8)
    args = p.parse_args(argv)

    if "RANK" in os.environ:
        rank, world, device = init_distributed()
    else:
        (rank, world), device = rank_and_world(), torch.device("cpu")
    torch.manual_seed(0)  # the same initial model on every rank
    model = SmallCNN(args.width).to(device).eval()
    data = [(x.to(device), y.to(device)) for x, y in calibration_data(args.data, args.batches, args.batch_size)]
    pruned = obafx.compile_prune(model, data[0][0][:1], macs=args.macs, steps=args.steps,
                                 importance=distributed_importance(args.criterion), data=shard(data))
    rep = obafx.report(pruned)
    plan_json = json.dumps(rep.plan, sort_keys=True)
    result = {"rank": rank, "world_size": world, "device": str(device), "criterion": args.criterion,
              "plan_sha256": hashlib.sha256(plan_json.encode()).hexdigest(), "state_sha256": state_digest(pruned),
              "macs_before": rep.macs_before, "macs_after": rep.macs_after, "plan": rep.plan}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    _print_agreement(result, rank, world)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _print_agreement(result: dict, rank: int, world: int) -> None:
    """Rank 0 prints the MACs and whether every rank's plan and weights hash the same."""
    keys = (result["plan_sha256"], result["state_sha256"])
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, keys)
    else:
        everyone = [keys]
    if rank == 0:
        same = all(k == keys for k in everyone)
        print(f"world size {world}: MACs {result['macs_before']:,.0f} -> {result['macs_after']:,.0f}; "
              f"all ranks identical: {same}")


if __name__ == "__main__":
    main()
