"""Pieces shared by every training recipe of eqloop (``eqloop train`` and ``eqloop finetune``).

The recipes (:mod:`eqloop.recipes.train`, :mod:`eqloop.recipes.finetune.train`) build the
model, data and objective; everything a run does the same way lives here:

* ``loop``: the step loop (:class:`~eqloop.training.loop.TrainingLoop`): reading the step
  statistics, evaluation and checkpoint cadence, callbacks, SIGINT/SIGTERM;
* ``env``: where a process runs (rank, world, device, the process group, the DDP wrapper)
  and how a step is seeded (``mix_seed``, ``batch_rows``, ``RunEnv.seed_step``);
* ``optim``: the optimiser builder (AdamW) and the learning-rate schedule;
* ``run_dir``: the run-directory policy (resume / overwrite / refuse, never write into the
  model a run starts from, stale staging, what a resumed run may change), SIGINT/SIGTERM
  checkpointing with the command that resumes, the metrics log, and the stop on a
  non-finite loss;
* ``step_stats``: step statistics kept on the device and read at intervals;
* ``solve``: training at the fixed point (a config's ``solve``): the solving forward, the
  solves' statistics of a step and the once-per-run warning when a solve did not converge;
* ``timing``: the step time with and without the STARS penalty;
* ``whole_step``: the training loss at a fixed loop count compiled as one graph per count
  (what ``--compile`` uses at a fixed depth);
* ``flags``: the command-line flags every training command shares (no torch import, so
  ``eqloop --help`` stays fast).

This package imports nothing at import time; import the modules themselves.
"""
