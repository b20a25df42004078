"""Benchmarks: each script prints a table comparing our pipeline with the reference tool, in one run."""
