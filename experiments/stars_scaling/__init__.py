"""The STARS paper's arithmetic experiment at CPU scale (``run.py``; README.md)."""
