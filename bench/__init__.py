"""Benchmarks: each script prints one JSON line per run (not timed tests)."""
