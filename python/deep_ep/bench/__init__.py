"""Benchmarks of deep_ep (run with `python -m deep_ep.bench`)."""
