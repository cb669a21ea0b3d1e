"""Research experiments: one folder each, holding ``run.py`` (run it as
``python experiments/<name>/run.py``), a README.md and the ``results/`` it produced."""
