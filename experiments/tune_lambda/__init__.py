"""An Optuna study of the STARS penalty weight lam (``run.py``; README.md)."""
