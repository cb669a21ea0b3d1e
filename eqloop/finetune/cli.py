"""``eqloop finetune``: the subcommand's parser and handler (see ``eqloop.finetune.train``).

Building the parser imports neither torch nor peft, so ``eqloop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from eqloop.training.flags import add_run_arguments, flag_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add the ``finetune`` subcommand to the ``eqloop`` parser's subparsers."""
    from eqloop.config import add_config_arguments

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained looped LM (Ouro, Huginn, eqloop) with SFT or STARS",
        description=(
            "Fine-tune a pretrained looped LM on a local JSONL file (GSM8K question/answer "
            "with '#### N', or prompt/completion): SFT at fixed loops or STARS (random loop "
            "counts + Jacobian penalty), fully or with LoRA (--lora). Settings come from the "
            "defaults, then --config, then --set overrides, then the explicit flags. The "
            "result is saved in the model's own layout to OUT_DIR/model. Under torchrun "
            "(torchrun --standalone --nproc_per_node=N -m eqloop.cli finetune ...) it runs "
            "DDP, or FSDP with --set parallel=fsdp. A run directory that already holds a run is "
            "continued with --resume or replaced with --overwrite, never silently reused, and "
            "never the model it starts from. Ctrl-C or SIGTERM saves a checkpoint after the "
            "current step and prints the command that resumes."
        ),
    )
    add_config_arguments(
        p,
        file_help="JSON or TOML file with FinetuneConfig fields",
        example="--set lam=0.1 --set lora.r=16 --set depth.hi=16",
    )
    p.add_argument("--init-from", help="pretrained directory (HF layout) or eqloop run")
    p.add_argument("--train-file", help="training JSONL")
    p.add_argument("--eval-file", help="JSONL evaluated at eval_loops after training")
    p.add_argument("--mode", choices=("sft", "stars"), help="sft: fixed loops; stars (default)")
    p.add_argument(
        "--lora", action="store_true", help="LoRA (default options unless the config sets them)"
    )
    add_run_arguments(p, out_dir_help="config.json, metrics.jsonl, checkpoints/, model/")


def run(args: argparse.Namespace) -> int:
    """Handle ``eqloop finetune``; invalid settings raise ``ValueError`` (one-line error)."""
    from eqloop.finetune.config import load_finetune_config

    own = {
        "init_from": args.init_from,
        "train_file": args.train_file,
        "eval_file": args.eval_file,
        "mode": args.mode,
        "lora": {} if args.lora else None,  # a section: on with its defaults unless set
    }
    values = {**{k: v for k, v in own.items() if v is not None}, **flag_values(args)}
    try:  # --print-config shows a template: init_from and train_file may still be empty
        config = load_finetune_config(
            args.config, args.overrides, values=values, complete=not args.print_config
        )
    except TypeError as err:
        raise ValueError(str(err)) from None
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from eqloop.finetune.train import finetune
    from eqloop.training.run_dir import TrainingInterrupted, report_interrupt

    try:
        result = finetune(config)
    except TrainingInterrupted as stop:
        return report_interrupt("eqloop finetune", stop, args.argv)
    if "model" in result:  # rank 0
        print(json.dumps(result, indent=2))
    return 0
