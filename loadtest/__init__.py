"""Benchmarks: ``python -m loadtest.bench`` (``make bench``). See docs/benchmarks.md."""
