"""Benchmarks of stage one and stage two, each measured as a ratio within one run.

Every module runs alone (`python -m benchmarks.loader [--quick]`) and prints one JSON line per
measurement: `benchmark`, `case`, `ratio`, `goal`, `passed`, the `raw` figures the ratio came
from and the `setup` (models, batch, threads, device, torch version). `benchmarks.run_all`
runs them all and rewrites docs/benchmarks.md. `--quick` shrinks every benchmark to tiny
models and inputs, so it checks the code path in seconds but measures nothing meaningful.
"""
