"""Pieces shared by every training loop of eqloop (``eqloop train`` and ``eqloop finetune``).

Modules:

* ``run_dir``: the run-directory policy (resume / overwrite / refuse, never write into the
  model a run starts from, stale staging), SIGINT/SIGTERM checkpointing with the command
  that resumes, the metrics log, and the stop on a non-finite loss;
* ``flags``: the command-line flags every training command shares (no torch import, so
  ``eqloop --help`` stays fast).
* ``solve``: training at the fixed point (a config's ``solve``): the solving forward, the
  solves' statistics of a step and the once-per-run warning when a solve did not converge.

This package imports nothing at import time; import the modules themselves.
"""
