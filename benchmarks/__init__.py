"""Benchmarks that measure ratios side by side in one run (see docs/benchmarks/)."""
