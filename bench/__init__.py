"""The benchmarks: one module per figure, run from the repository root as ``python -m bench.<name>``,
each ending with one JSON line (docs/benchmarks.md). What they share is in ``bench.common``."""
