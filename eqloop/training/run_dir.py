"""The run directory of a training run: one policy for ``eqloop train`` and ``eqloop finetune``.

A run directory (``out_dir``) belongs to one run:

* a directory that already holds a run's files (``config.json``, ``metrics.jsonl``,
  ``checkpoints/`` and the recipe's final outputs, e.g. fine-tuning's ``model/``) is
  continued with ``resume``, replaced with ``overwrite``, or refused; nothing is changed
  before every check has passed (:func:`plan_run_dir`, then :meth:`RunPlan.start`);
* a run never writes into the model it starts from: an ``out_dir`` that is, contains or
  lies inside ``init_from`` is refused, ``overwrite`` or not;
* a resumed run keeps the metrics records up to its checkpoint, and one that trains
  further removes the final outputs of the earlier, shorter run (they describe its last
  step, not the new one);
* what a killed write left behind (hidden staging directories and files) is removed when
  a run starts.

A run ends cleanly on SIGINT (Ctrl-C) and SIGTERM (:func:`stop_signals`): the step in
progress finishes, a checkpoint is written and :class:`TrainingInterrupted` says where;
:func:`run_recipe` prints the command that resumes. A step whose loss or gradient
norm is not finite stops the run with :class:`NonFiniteLoss` (:func:`check_finite`, at the
next read of the step statistics) before anything after that step is saved, so the newest
checkpoint stays the last finite one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eqloop.config import config_section, field_types
from eqloop.files import write_json_atomic, write_text_atomic
from eqloop.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_staging,
    run_files,
)

__all__ = [
    "MetricsLog",
    "NonFiniteLoss",
    "PATH_FIELDS",
    "RESUME_MAY_CHANGE",
    "RunPlan",
    "TrainingInterrupted",
    "any_rank_signal",
    "changed_fields",
    "check_finite",
    "check_resumable",
    "plan_run_dir",
    "read_metrics",
    "resume_command",
    "run_recipe",
    "stop_signals",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINITE_STATS = ("loss", "grad_norm")  # a step with either non-finite has damaged the weights
PATH_FIELDS = frozenset({"init_from", "train_file", "eval_file"})
"""Config fields that name a file or directory: a resumed run compares them by the file
they name, not by how the path is written (see :func:`changed_fields`)."""

RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "checkpoint_every",
        "eval_loops",
        "out_dir",
        "resume",
        "overwrite",
        "device",
        "progress",
        "log_every",
        "compile",
    }
)
"""Config fields every recipe's resumed run may change: how long and where it runs, how
often it checkpoints, logs and evaluates, how it shows progress. Every other field must
match the checkpoint's config; a recipe adds its own (its ``plan_run_dir(may_change=...)``)."""


# ------------------------------------------------------------------------------ stopping


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended a run after a checkpoint of its last step was written.

    A ``KeyboardInterrupt``, so that code which stops on Ctrl-C stops here too.

    Attributes:
        step: steps completed.
        checkpoint: the checkpoint written (None on ranks other than 0).
        signum: the signal received.
    """

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "a checkpoint"
        super().__init__(f"{signal.Signals(signum).name} at step {step}; saved {where}")

    def __reduce__(self) -> tuple[type, tuple[int, Path | None, int]]:
        # Rebuilt from its fields, so it crosses process boundaries (a worker's result).
        return type(self), (self.step, self.checkpoint, self.signum)


class NonFiniteLoss(ValueError):
    """A training step produced a non-finite loss or gradient norm; the run stopped.

    Nothing of that step (weights, optimizer state, final model) was saved: the run's
    newest checkpoint is the last finite one.

    Attributes:
        step: the step (1-based, as in ``metrics.jsonl``) whose statistics are not finite.
        values: the statistics that were not finite, by name.
        checkpoint: the run's newest checkpoint, or None if none was written yet.
    """

    def __init__(self, step: int, values: Mapping[str, float], checkpoint: Path | None) -> None:
        self.step, self.values, self.checkpoint = step, dict(values), checkpoint
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        kept = (
            f"the last finite checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"training diverged at step {step} ({shown}); stopped without saving that step, "
            f"{kept}; lower lr or lam, or raise warmup_steps, and start again"
        )

    def __reduce__(self) -> tuple[type, tuple[int, dict[str, float], Path | None]]:
        return type(self), (self.step, self.values, self.checkpoint)


def check_finite(stats: Mapping[str, Any], step: int, out_dir: str | os.PathLike[str]) -> None:
    """Stop a run at a step that is not finite.

    Call it on each step's statistics in order as they are read from the device
    (:mod:`eqloop.training.step_stats`), before anything after that step is saved.

    Args:
        stats: the step's statistics; ``loss`` and ``grad_norm`` are checked.
        step: the step (1-based) of ``stats``.
        out_dir: the run directory (to name its newest checkpoint).

    Raises:
        NonFiniteLoss: ``loss`` or ``grad_norm`` is NaN or infinite.
    """
    bad = {
        k: stats[k]
        for k in FINITE_STATS
        if stats.get(k) is not None and not math.isfinite(stats[k])
    }
    if bad:
        raise NonFiniteLoss(step, bad, latest_checkpoint(out_dir))


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM instead of dying, so the loop can stop after a step.

    Yields a list holding the signal number received (0 until then). After the first
    signal the previous handlers are back, so a second Ctrl-C interrupts at once. Only
    the main thread can set handlers; elsewhere the signals act as before.
    """
    received = [0]
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():  # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def handler(signum: int, frame: Any) -> None:
        received[0] = signum
        restore()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        restore()


def any_rank_signal(signum: int, device: torch.device) -> int:
    """The largest signal number any rank has received (a collective under DDP/FSDP).

    Every rank must stop after the same step; alone, ``signum`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run ``argv`` (``eqloop``'s arguments) started.

    ``--overwrite`` is dropped and ``--resume`` added; under torchrun (``WORLD_SIZE > 1``)
    the same number of processes is started again.
    """
    args = [a for a in argv if a != "--overwrite"]
    args += [] if "--resume" in args else ["--resume"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return shlex.join(
            ["torchrun", "--standalone", f"--nproc_per_node={world}", "-m", "eqloop.cli", *args]
        )
    return shlex.join(["eqloop", *args])


def run_recipe(
    prefix: str,
    recipe: Callable[[Any], Mapping[str, Any]],
    config: Any,
    args: argparse.Namespace,
    *,
    rank0_key: str,
) -> int:
    """Run a training command's recipe as ``eqloop train`` and ``eqloop finetune`` do.

    ``--print-config`` prints the config as JSON instead of running. Otherwise the recipe
    runs; its result is printed as JSON by rank 0 (the process whose result holds
    ``rank0_key``). A run stopped by SIGINT or SIGTERM prints, on rank 0, where its
    checkpoint is and the command that resumes it.

    Args:
        prefix: the command, e.g. ``"eqloop finetune"``.
        recipe: the training function, e.g. :func:`eqloop.recipes.train.train`.
        config: its config (with ``to_dict()``).
        args: the parsed command line, with ``print_config`` and ``argv`` (the command's
            arguments without the program name).
        rank0_key: the result entry only rank 0's result holds (a non-empty value).

    Returns:
        The exit status: 0, or 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        result = recipe(config)
    except TrainingInterrupted as stop:
        if stop.checkpoint is not None:  # rank 0
            print(
                f"{prefix}: {signal.Signals(stop.signum).name} at step {stop.step}: saved "
                f"{stop.checkpoint}; resume with: {resume_command(args.argv)}",
                file=sys.stderr,
            )
        return 128 + stop.signum
    if result.get(rank0_key):
        print(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- metrics


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file.

    A last line without its newline that is not valid JSON is what a crash in the middle
    of a write leaves: it is dropped with a warning.

    Raises:
        ValueError: any other line that is not a JSON object (the message gives
            ``path:line``).
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: a torn write
                warnings.warn(
                    f"{path}:{number}: dropped the incomplete last line (a write was cut off)",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}:{number}: not a JSON record ({err.msg}); repair or delete that line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    return records


class MetricsLog:
    """Append-only JSONL log that starts with ``kept`` (a resumed run's earlier records)."""

    def __init__(self, path: Path, kept: list[dict[str, Any]]) -> None:
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------ the directory


def changed_fields(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: frozenset[str],
    schema: type | None = None,
) -> list[str]:
    """The config fields, outside ``may_change``, whose values differ (sorted).

    With ``schema`` (the config class), a field that ``saved`` lacks was added to the
    config after that run was saved: the run was trained with its default, so the field
    counts as changed only if ``current`` sets another value. The same holds inside every
    section (a field holding a config, such as ``model``, ``solve`` or ``lora``), at any
    depth; other dicts, such as ``depth``, are compared whole. The fields of
    :data:`PATH_FIELDS` compare by the file they name.
    """
    if schema is not None:
        saved = _with_defaults(saved, schema)
    keys = set(saved) | set(current)
    return sorted(k for k in keys - may_change if not _same_value(k, saved.get(k), current.get(k)))


def _same_value(name: str, saved: Any, current: Any) -> bool:
    """Whether a field kept its value; a field of :data:`PATH_FIELDS` compares by the file
    it names, so ``runs/a`` and ``/home/me/runs/a``, or a path through a symlink to the
    same file, are the same value (relative paths resolve against the working directory)."""
    named = name in PATH_FIELDS and isinstance(saved, str) and isinstance(current, str)
    if named and saved and current:
        return Path(saved).resolve() == Path(current).resolve()
    return saved == current


def _with_defaults(saved: Mapping[str, Any], schema: type) -> dict[str, Any]:
    """``saved`` with the fields of ``schema`` it lacks set to their defaults, in its
    sections too (an unset optional section stays None)."""
    out = {**schema().to_dict(), **saved}
    for name, kind in field_types(schema).items():
        section = config_section(kind)
        if section is not None and isinstance(out.get(name), Mapping):
            out[name] = _with_defaults(out[name], section)
    return out


def check_resumable(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: frozenset[str],
    source: Path,
    schema: type | None = None,
) -> None:
    """Raise ``ValueError`` if ``current`` changes fields a resumed run must keep.

    Args:
        saved: the config of the run's checkpoint (``Checkpoint.config``).
        current: the config (as a dict) that would continue (or reuse) that run.
        may_change: the fields a resumed run may change.
        source: the checkpoint or config file, named in the message.
        schema: the config class: a field added since the run was saved then compares
            as its default (see :func:`changed_fields`). None: every missing field
            counts as changed.
    """
    changed = changed_fields(saved, current, may_change, schema)
    if changed:
        raise ValueError(
            f"cannot resume the run in {current.get('out_dir')}: the config differs from "
            f"{source} in {changed}; only {sorted(may_change)} may change (or use a new "
            "out_dir, or overwrite=true to replace that run)"
        )


@dataclass(frozen=True)
class RunPlan:
    """What a run does with its directory: start fresh (clearing ``clear``) or resume.

    Attributes:
        out_dir: the run directory.
        checkpoint: the checkpoint to resume from (None: start from step 0).
        clear: files and directories removed when the run starts.
        metrics: the records of ``metrics.jsonl`` up to the checkpoint's step.
    """

    out_dir: Path
    checkpoint: Checkpoint | None
    clear: tuple[Path, ...] = ()
    metrics: tuple[dict[str, Any], ...] = ()

    def start(self, config: Mapping[str, Any]) -> MetricsLog:
        """Make the directory the run's (call on rank 0 only, once every check passed).

        Removes ``clear`` and stale staging, writes ``config.json`` and opens
        ``metrics.jsonl`` with the kept records.
        """
        for path in self.clear:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_staging(self.out_dir)
        write_json_atomic(self.out_dir / "config.json", dict(config))
        return MetricsLog(self.out_dir / "metrics.jsonl", list(self.metrics))


def _check_writable(out_dir: Path) -> None:
    """``out_dir`` is a directory, or can be made one, that this process may write into."""
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"out_dir {out_dir}: {parent} exists and is not a directory")
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"out_dir {out_dir}: cannot write into {parent}")
            break


def _check_apart(out_dir: Path, init_from: str | None) -> None:
    """Refuse an ``out_dir`` that is, contains or lies inside the model the run starts from."""
    if not init_from:
        return
    out, source = out_dir.resolve(), Path(init_from).resolve()
    if out == source:
        relation = "is"
    elif out in source.parents:
        relation = "contains"
    elif source in out.parents:
        relation = "lies inside"
    else:
        return
    raise ValueError(
        f"out_dir {out_dir} {relation} the model the run starts from (init_from "
        f"{init_from}); the run would write over it: choose an out_dir outside {init_from}"
    )


def plan_run_dir(
    config: Mapping[str, Any],
    *,
    may_change: frozenset[str],
    outputs: Sequence[str] = (),
    schema: type | None = None,
) -> RunPlan:
    """Decide, before any work, how the run uses its directory; nothing is changed yet.

    Args:
        config: the run's config as a dict (``config.to_dict()``); its ``out_dir``,
            ``resume``, ``overwrite``, ``steps`` and ``init_from`` decide.
        may_change: the config fields a resumed run may change.
        outputs: names of the final outputs the recipe writes into ``out_dir`` besides
            ``config.json``, ``metrics.jsonl`` and ``checkpoints/`` (e.g. ``model``).
        schema: the config class, for fields added since the run was saved (see
            :func:`changed_fields`).

    Raises:
        ValueError: ``out_dir`` is not a usable directory, it is, contains or lies inside
            ``init_from``, it holds another run and neither ``resume`` nor ``overwrite``
            is set, the run it holds differs from ``config`` in a field outside
            ``may_change``, or its ``metrics.jsonl`` is damaged other than in its last line.
        eqloop.training.checkpoint.CheckpointError: the checkpoint to resume from is damaged.
    """
    out_dir = Path(config["out_dir"])
    _check_writable(out_dir)
    _check_apart(out_dir, config.get("init_from"))
    present = run_files(out_dir) + [out_dir / n for n in outputs if (out_dir / n).exists()]
    if not present:
        return RunPlan(out_dir, None)
    if config.get("overwrite"):
        return RunPlan(out_dir, None, clear=tuple(present))
    latest = latest_checkpoint(out_dir)
    if not config.get("resume"):
        what = f"checkpoints up to {latest.name}" if latest else ", ".join(p.name for p in present)
        raise ValueError(
            f"{out_dir} already holds a training run ({what}); resume it with --resume "
            "(resume=true), train into a new --out-dir, or pass --overwrite "
            "(overwrite=true) to delete that run and start over"
        )
    if latest is not None:
        ckpt = load_checkpoint(latest)
        check_resumable(ckpt.config, config, may_change, ckpt.path, schema)
        log = out_dir / "metrics.jsonl"
        records = read_metrics(log) if log.is_file() else []
        kept = tuple(r for r in records if r.get("step", 0) <= ckpt.step)
        stale = [out_dir / n for n in outputs if (out_dir / n).exists()]
        return RunPlan(
            out_dir, ckpt, clear=tuple(stale) if ckpt.step < config["steps"] else (), metrics=kept
        )
    saved = out_dir / "config.json"  # killed before its first checkpoint: start it again
    if not saved.is_file():
        raise ValueError(
            f"cannot resume the run in {out_dir}: it has no checkpoint and no config.json; "
            "pass --overwrite (overwrite=true) to delete it and start over"
        )
    try:
        saved_config = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {saved}: {err}") from None
    check_resumable(saved_config, config, may_change, saved, schema)
    return RunPlan(out_dir, None, clear=tuple(present))
