"""Small helpers shared by benchmark scripts: machine description, median timing, JSON output.

Kept generic on purpose (no obafx imports), so any script in benchmarks/ can use it without pulling in the
pipeline. Import it from a script as ``from common import ...`` after putting this folder on ``sys.path``
(see ``load_common`` in the scripts), or load the file with importlib.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Sequence, Tuple


def obafx_commit() -> str:
    """The obafx commit a run used: $OBAFX_COMMIT (runs from a frozen copy of the tree), else git's HEAD."""
    if os.environ.get("OBAFX_COMMIT"):
        return os.environ["OBAFX_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        return "unknown"


def machine_info() -> Dict[str, Any]:
    """Python, torch, torchvision and Torch-Pruning versions, CPU count and threads, platform and device."""
    import torch

    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torchvision", "torch_pruning", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:  # optional peers: record absence, not fail
            info[mod] = None
    return info


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 0) -> Tuple[float, List[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed; returns (median seconds, all times)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, int(reps))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def error_entry(exc: BaseException) -> Dict[str, Any]:
    """An exception as a result row: status 'error', why (type and message) and where (last frames)."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return {"status": "error", "why": f"{type(exc).__name__}: {str(exc)[:600]}",
            "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames]}


def run_isolated(cmd: Sequence[str], timeout: float) -> Dict[str, Any]:
    """Run ``cmd`` + ``["--result", PATH]`` in a subprocess and return the JSON it wrote to PATH; a timeout, a
    crash or a missing result becomes {"status": "error", "why": ...}. Adds "wall_s" when the child did not."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        start = time.perf_counter()
        try:
            proc = subprocess.run(list(cmd) + ["--result", path], timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:  # subprocess.run killed the child
            return {"status": "error", "why": f"timeout after {timeout:g}s", "wall_s": time.perf_counter() - start}
        if os.path.exists(path):
            with open(path) as fh:
                return json.load(fh)
        return {"status": "error", "why": f"exited with {proc.returncode}: {proc.stderr[-600:]}",
                "wall_s": time.perf_counter() - start}


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating folders), atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=False, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """Fallback for values json cannot write (numpy scalars, paths, exceptions): a plain number or a string."""
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):  # arrays with more than one element
            pass
    return str(value)
