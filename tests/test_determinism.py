"""Determinism on the CPU: the same model, seed and data give bit-identical pruned models (state_dict and plan).

Checked twice in one process and across two fresh interpreters with different PYTHONHASHSEED values (set and
dict iteration orders of strings change between them, so an order leak would show).
"""
import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obafx


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.bn2 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 4, 20), nn.Linear(20, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.relu(self.bn2(self.c2(h)) + h)
        h = F.adaptive_avg_pool2d(F.relu(self.c3(h)), 2)
        return self.fc2(F.gelu(self.fc1(torch.flatten(h, 1))))


CASES = {
    "magnitude": dict(channels=0.5),
    "random": dict(channels=0.5, importance="random", seed=7),
    "oba": dict(macs=0.5, importance="oba", steps=2),  # two steps: re-analysis and plan composition too
}


def pruned_digest(case: str) -> str:
    """sha256 over the pruned model's state_dict (names, dtypes, shapes, bytes) and its plan."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    data = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(2)]
    kw = dict(CASES[case])
    if kw.get("importance") == "oba":
        kw["data"] = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(model, x, **kw)
    h = hashlib.sha256()
    for name, t in pruned.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    h.update(json.dumps(obafx.report(pruned).plan, sort_keys=True).encode())
    h.update(pruned.code.encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def digests():
    return {c: pruned_digest(c) for c in sorted(CASES)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_data_same_model_in_process(case, digests):
    assert pruned_digest(case) == digests[case]


def test_the_seed_drives_random_importance(digests):
    a = digests["random"]
    CASES["random_other"] = dict(CASES["random"], seed=8)
    try:
        assert pruned_digest("random_other") != a
    finally:
        del CASES["random_other"]


def _digests_in_fresh_interpreter(hash_seed: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    code = ("import json, test_determinism as t; "
            "print(json.dumps({c: t.pruned_digest(c) for c in sorted(t.CASES)}))")
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_result_in_a_fresh_interpreter_with_another_hash_seed(digests):
    mine = os.environ.get("PYTHONHASHSEED")
    assert _digests_in_fresh_interpreter("2" if mine == "1" else "1") == digests


@pytest.mark.slow
def test_same_result_across_several_hash_seeds(digests):
    for seed in ("0", "3", "12345"):
        assert _digests_in_fresh_interpreter(seed) == digests
