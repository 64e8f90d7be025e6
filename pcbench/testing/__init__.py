"""Fixtures of the tests and the benchmarks: point-cloud builders and real-sample loaders (``clouds``).

They live here, not in ``tests/``, because ``benchmarks/`` (an installed package) time exactly the inputs the
tests check and may not import ``tests/``. The library itself never imports this package: tests/test_layering.py
fails if any other module under ``pcbench/`` does.
"""
