"""Why an arithmetic run is stuck on its loss plateau (``run.py``; README.md)."""
