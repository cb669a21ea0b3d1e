"""Benchmark scripts: each prints a table and writes JSON (and optionally a plot)."""
