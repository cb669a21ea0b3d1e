"""The commands: thin recipes over the reusable modules (nothing under ``eqloop/`` imports them).

* ``train``: ``eqloop train`` (a LoopLM on a synthetic task);
* ``finetune``: ``eqloop finetune`` (SFT or STARS fine-tuning of a LoopLM, Ouro or Huginn);
* ``tune``: ``eqloop tune`` (Optuna studies over training settings);
* ``pretrained``: ``eqloop eval --pretrained`` (diagnostics of a pretrained looped LM).
"""
