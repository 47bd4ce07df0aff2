"""Benchmarks that print one JSON line per measurement (see /work/shared/BENCH.md)."""
