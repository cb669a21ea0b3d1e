"""STARS fine-tuning in miniature on an Ouro-architecture model (``run.py``; README.md)."""
