"""Benchmarks that print one JSON line per measurement (see docs/BENCHMARKS.md)."""
