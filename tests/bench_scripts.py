"""Load a benchmark script (benchmarks/<name>.py) as a module, so smoke tests can call its main(argv)."""
import importlib.util
import os

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load_benchmark(name: str):
    """The module of benchmarks/<name>.py, freshly executed (registered under '<name>_bench')."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
