"""Development benchmarks: ``python -m benchmarks.NAME --help`` from the repository root.

Each prints a table against a baseline measured in the same run, on the harness of
``kvbridge.bench.harness``. The user-facing link checks stay in ``kvbridge bench``.
"""
