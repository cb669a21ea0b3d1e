"""Equilibrium LoopLMs: trained at the fixed point, found by any solver (``run.py``; README.md)."""
