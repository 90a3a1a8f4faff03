"""`obafx` command line: prune or inspect a torchvision model (random weights) or a model from a file, and run
the Fashion-MNIST demo.

    obafx inspect resnet18 --input 1,3,64,64 --out obafx_out/resnet18
    obafx prune resnet50 --macs 0.5 --input 1,3,224,224 --out obafx_out/resnet50
    obafx prune my_model.py:build --macs 0.5 --input 1,3,32,32
    obafx demo
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from obafx.passes.errors import ConfigError, ObafxError


def load_model(spec: str, trusted: bool = False) -> nn.Module:
    """A torchvision model name (weights=None: nothing is downloaded), ``file.py:factory`` (the factory is called
    with no arguments), or a pickled whole-module file (.pt/.pth), which is only unpickled with ``trusted``."""
    if ":" in spec and spec.split(":")[0].endswith(".py"):
        path, factory = spec.rsplit(":", 1)
        mod_spec = importlib.util.spec_from_file_location("obafx_user_model", path)
        if mod_spec is None or not Path(path).exists():
            raise ConfigError(f"no Python file at '{path}'. What to do: give file.py:factory_function.")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return getattr(module, factory)()
    if Path(spec).suffix in (".pt", ".pth", ".pkl"):
        if not trusted:
            raise ConfigError(f"'{spec}' is a pickle file; unpickling runs code from it. What to do: pass "
                              "--trusted if you trust this file, or give file.py:factory instead.")
        return torch.load(spec, weights_only=False)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        raise ConfigError(f"'{spec}' is not a torchvision classification model, a file.py:factory or a .pt file. "
                          f"What to do: use e.g. one of {names[:6]} ...")
    return torchvision.models.get_model(spec, weights=None)


def _shape(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--input '{text}' is not a comma-separated shape. What to do: e.g. --input 1,3,224,224") from exc


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_inspect(args) -> int:
    from obafx.dump import group_table, barrier_table, inspect_model, write_dumps

    model = load_model(args.model, args.trusted).eval()
    analysis = inspect_model(model, torch.randn(*_shape(args.input)))
    print(group_table(analysis.coupling))
    print(barrier_table(analysis.coupling))
    files = write_dumps(analysis, Path(args.out))
    print("wrote: " + ", ".join(files.values()))
    return 0


def cmd_prune(args) -> int:
    import obafx
    from obafx.dump import inspect_model, write_dumps

    model = load_model(args.model, args.trusted).eval()
    x = torch.randn(*_shape(args.input))
    budget = {"macs": args.macs} if args.channels is None else {"channels": args.channels}
    pruned = obafx.compile_prune(model, x, importance=args.importance, steps=args.steps, round_to=args.round_to,
                                 keep_narrow=args.keep_narrow, progress=True, **budget)
    rep = obafx.report(pruned)
    before, after, how = _latencies(model, pruned, x[:1], args.threads)
    print(_table([("", "before", "after", "ratio"),
                  ("params", f"{rep.params_before:,}", f"{rep.params_after:,}", f"{rep.params_after / rep.params_before:.3f}"),
                  ("MACs", f"{rep.macs_before:,.0f}", f"{rep.macs_after:,.0f}", f"{rep.macs_ratio:.3f}"),
                  ("CPU latency (ms)", _spread(before), _spread(after),
                   f"{statistics.median(after) / statistics.median(before):.3f}")]))
    print(f"latency: {how}")
    print(f"masking oracle: max relative error {rep.masked_error:.2e}; barriers: {len(rep.barriers)}")
    out = Path(args.out)
    write_dumps(inspect_model(model, x), out, rep)
    _save(pruned, out)
    print(f"wrote the pruned module and dumps to {out}/")
    return 0


def _latencies(model, pruned, x, threads: int, rounds: int = 7):
    """Per-round median latencies (seconds) of the model and the pruned module on ``threads`` CPU threads,
    alternating, and a line saying how they were measured. Threads are pinned: torch's default (one per core)
    spins on a busy machine, where 2 threads ran ResNet-18 at 64x64 in 400 ms instead of 10 ms."""
    from obafx.bench.timing import interleaved_rounds

    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per = interleaved_rounds({"before": model, "after": pruned}, x, rounds=rounds, reps=5)
    finally:
        torch.set_num_threads(was)
    how = (f"batch {x.shape[0]}, {threads} CPU thread(s), median of {rounds} alternating rounds of 5 runs each; "
           "[min-max] over the rounds")
    return per["before"], per["after"], how


def _spread(seconds: List[float]) -> str:
    """'median [min-max]' in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return f"{statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}]"


def _save(pruned, out: Path) -> None:
    try:
        from obafx.io import save
    except ImportError:  # save/load lands with the reliability work
        return
    save(pruned, out / "pruned")


def cmd_demo(args) -> int:
    from obafx.bench.demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="obafx", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("inspect", cmd_inspect), ("prune", cmd_prune)):
        s = sub.add_parser(name)
        s.add_argument("model", help="torchvision model name, file.py:factory, or a trusted .pt file")
        s.add_argument("--input", default="1,3,224,224", help="example input shape, e.g. 1,3,224,224")
        s.add_argument("--out", default=f"obafx_out/{name}", help="directory for dumps and the pruned module")
        s.add_argument("--trusted", action="store_true", help="allow unpickling a .pt model file")
        s.set_defaults(fn=fn)
        if name == "prune":
            s.add_argument("--macs", type=float, default=0.5, help="fraction of MACs to keep")
            s.add_argument("--channels", type=float, default=None, help="fraction of channels to remove instead")
            s.add_argument("--importance", default="magnitude", help="magnitude | random | oba (needs data: see demo)")
            s.add_argument("--steps", type=int, default=1)
            s.add_argument("--round-to", type=int, default=1)
            s.add_argument("--keep-narrow", action="store_true",
                           help="with --round-to N: groups at most N wide stay whole (CPU kernels pad them to N)")
            s.add_argument("--threads", type=int, default=1, help="CPU threads for the latency rows (pinned)")
    d = sub.add_parser("demo", help="train-or-load a Fashion-MNIST ResNet, prune it with OBA, fine-tune, compare")
    d.add_argument("--out", default="obafx_out/demo")
    d.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ObafxError as exc:
        print(f"obafx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
