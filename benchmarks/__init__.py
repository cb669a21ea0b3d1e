"""Benchmark scripts: each prints a table and writes JSON (and optionally a plot).

``common.py`` holds what they and the research experiments in ``experiments/`` share."""
