"""The benchmark and demo harness: Fashion-MNIST loading, the small CIFAR-style models, training, timing.

Not part of the library's face: ``obafx`` and ``obafx.passes`` never import this package (the ``obafx demo``
command loads it lazily). Benchmarks, tests and examples import it as ``obafx.bench.data`` etc.
"""
