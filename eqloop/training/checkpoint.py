"""Step-numbered, atomic, verifiable training checkpoints, and the run directory around them.

Layout of a run directory::

    out_dir/
      config.json                 the TrainConfig of the run
      metrics.jsonl               one JSON record per training step and per evaluation
      checkpoints/
        latest                    text file naming the newest complete checkpoint
        step_00000500/
          model.safetensors       weights (LoopLM state dict); its metadata holds the step
          config.json             the TrainConfig (with the nested LoopLMConfig)
          metrics.json            metrics at this step
          training_state.pt       optimizer, scheduler, depth sampler and RNG states
          manifest.json           step and SHA-256 of every file above (written last)

A checkpoint is first written into a hidden staging directory (``.step_*-XXXX``) next to
its final place and then renamed with ``os.replace``, so a crash never leaves a
half-written ``step_*`` directory; a staging directory left by a killed process is removed
by :func:`remove_staging` when the next run starts. Loading checks every file against the
manifest and the manifest's step against the directory name and the step stored in the
(checksummed) weights, so a truncated, corrupted or edited checkpoint raises
:class:`CheckpointError` instead of silently resuming from garbage.

The newest checkpoint of a run is the highest-numbered complete ``step_*`` directory;
``latest`` names it for people and scripts. Files and directories get the permissions of
the user's umask, like those of any other tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from eqloop.files import (
    STAGING_PREFIX,
    atomic_path,
    staged_directory,
    write_json_atomic,
    write_text_atomic,
)
from solvers import checks

if TYPE_CHECKING:
    from eqloop.models.looplm.modeling import LoopLM

__all__ = [
    "CHECKPOINT_DIR",
    "RUN_FILES",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_steps",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "remove_staging",
    "resolve_checkpoint",
    "run_files",
    "save_checkpoint",
    "step_dir_name",
]

CHECKPOINT_DIR = "checkpoints"  # sub-directory of a run holding the step_* directories
RUN_FILES: tuple[str, ...] = ("config.json", "metrics.jsonl", CHECKPOINT_DIR)
"""What a training run writes into its directory (anything else there is left alone)."""

_LATEST = "latest"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_METRICS = "metrics.json"
_STATE = "training_state.pt"
_MANIFEST = "manifest.json"
_FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d+)")
# Temporary siblings of the run's own files (eqloop.files names them .<stem>-XXXX<suffix>):
# config.json, metrics.jsonl and a recipe's model/ directory.
_RUN_STAGING = tuple(
    re.compile(p) for p in (r"\.config-.+\.json", r"\.metrics-.+\.jsonl", r"\.model-.+")
)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, inconsistent or corrupted (the message says which)."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the ``step_*`` directory.
        step: number of optimisation steps completed when it was written.
        config: the training configuration as a dict (``TrainConfig.to_dict()``).
        metrics: metrics recorded at this step.
        weights: the model state dict (CPU tensors).
    """

    path: Path
    step: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    weights: dict[str, Tensor]

    def training_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Optimizer, scheduler, sampler and RNG states saved with the weights."""
        try:
            return torch.load(self.path / _STATE, map_location=map_location, weights_only=True)
        except Exception as err:  # pickle/zip errors have many types
            raise CheckpointError(f"cannot read {self.path / _STATE}: {err}") from err


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimisation steps."""
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    weights: dict[str, Tensor],
    config: dict[str, Any],
    metrics: dict[str, Any],
    training_state: dict[str, Any],
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically and point ``latest`` at it.

    An existing checkpoint of the same step is replaced.

    Args:
        run_dir: the run's output directory.
        step: optimisation steps completed.
        weights: model state dict; tensors are copied to CPU and made contiguous.
        config: JSON-serialisable training configuration.
        metrics: JSON-serialisable metrics at this step.
        training_state: anything ``torch.save`` can store with ``weights_only`` loading
            (tensors, numbers, strings, lists, dicts).

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / step_dir_name(step)
    with staged_directory(final) as staging:  # the same step written again is replaced
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        with atomic_path(staging / _WEIGHTS) as tmp:
            save_file(cpu, str(tmp), metadata={"step": str(step)})
        write_json_atomic(staging / _CONFIG, config)
        write_json_atomic(staging / _METRICS, metrics)
        with atomic_path(staging / _STATE) as tmp:
            torch.save(training_state, tmp)
        files = {name: _sha256(staging / name) for name in (_WEIGHTS, _CONFIG, _METRICS, _STATE)}
        write_json_atomic(staging / _MANIFEST, {"format": _FORMAT, "step": step, "files": files})
    write_text_atomic(root / _LATEST, final.name + "\n")
    return final


def checkpoint_steps(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The complete checkpoints of a run (``step_*`` directories with a manifest), by step."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / _MANIFEST).is_file():
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None if the run has none.

    The highest step wins, whatever ``latest`` says: a process killed between renaming a
    checkpoint into place and updating ``latest`` leaves the pointer one checkpoint
    behind, and a run resumed from an older step would later overwrite the newer ones.
    """
    steps = checkpoint_steps(run_dir)
    return steps[max(steps)] if steps else None


def run_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The files of :data:`RUN_FILES` present in ``run_dir`` (they belong to some run)."""
    return [Path(run_dir) / name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def remove_staging(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what interrupted writes left in a run directory; returns the removed paths.

    These are the hidden staging directories and temporary files inside ``checkpoints/``
    and the temporary siblings of ``config.json``, ``metrics.jsonl`` and ``model/``
    (``eqloop finetune``'s final model). Call it only when no other process writes into
    the run (i.e. when a run starts).
    """
    run = Path(run_dir)
    root = run / CHECKPOINT_DIR
    stale = (
        [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)] if root.is_dir() else []
    )
    if run.is_dir():
        stale += [p for p in run.iterdir() if any(r.fullmatch(p.name) for r in _RUN_STAGING)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The ``step_*`` directory meant by ``path``.

    Args:
        path: a ``step_*`` checkpoint directory, a run directory or its ``checkpoints``
            sub-directory (both resolve to the newest checkpoint).

    Raises:
        CheckpointError: nothing resembling a checkpoint is found at ``path``, or ``path``
            is a pretrained model directory (Hugging Face layout) instead.
    """
    from eqloop.models.io import is_pretrained_dir

    path = Path(path)
    if not (path / _MANIFEST).is_file() and is_pretrained_dir(path):
        raise CheckpointError(
            f"{path} is a pretrained model directory (Hugging Face layout: config.json with "
            "model_type), not an eqloop checkpoint: evaluate it with eqloop eval --pretrained "
            "DIR, load it with eqloop.models.load"
        )
    if (path / _MANIFEST).is_file() or (path / _WEIGHTS).is_file():
        return path
    for run_dir in (path, path.parent if path.name == CHECKPOINT_DIR else None):
        if run_dir is not None and (found := latest_checkpoint(run_dir)) is not None:
            return found
    raise CheckpointError(
        f"no checkpoint at {path}: expected a step_* directory with {_MANIFEST}, or a run "
        f"directory with {CHECKPOINT_DIR}/step_*"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _saved_step(weights: Path) -> int | None:
    """The step stored in the weights file's metadata (None if it has none)."""
    try:
        with safe_open(str(weights), "pt") as handle:
            text = (handle.metadata() or {}).get("step")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from err
    return int(text) if text is not None and text.isdigit() else None


def _check_step(ckpt: Path, manifest: dict[str, Any]) -> int:
    """The checkpoint's step, once the manifest, directory name and weights agree on it."""
    try:
        step = checks.integer("step", manifest.get("step"), low=0)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt / _MANIFEST}: {err}") from None
    claims = {"the weights' step": _saved_step(ckpt / _WEIGHTS)}
    if (match := _STEP_DIR.fullmatch(ckpt.name)) is not None:
        claims["the directory name's step"] = int(match.group(1))
    differ = [f"{who} is {value}" for who, value in claims.items() if value not in (None, step)]
    if differ:
        raise CheckpointError(
            f"checkpoint {ckpt} is inconsistent: {_MANIFEST} says step {step}, but "
            f"{' and '.join(differ)}"
        )
    return step


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Load weights, config and metrics of a checkpoint (see :func:`resolve_checkpoint`).

    Args:
        path: checkpoint, ``checkpoints`` or run directory.
        verify: check every file against the SHA-256 sums of the manifest.

    Raises:
        CheckpointError: a file is missing, unreadable, or does not match the manifest, or
            the manifest's step differs from the directory name or the weights' step.
    """
    ckpt = resolve_checkpoint(path)
    manifest_path = ckpt / _MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {_MANIFEST} is missing")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not a checkpoint manifest")
    missing = sorted({_WEIGHTS, _CONFIG, _METRICS} - set(manifest["files"]))
    if missing:
        raise CheckpointError(f"{manifest_path} does not list {missing}")
    for name, expected in manifest["files"].items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if verify and _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupted: {name} does not match its SHA-256 in {_MANIFEST}"
            )
    step = _check_step(ckpt, manifest)
    try:
        weights = load_file(str(ckpt / _WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {ckpt / _WEIGHTS}: {err}") from err
    return Checkpoint(
        path=ckpt,
        step=step,
        config=_read_json(ckpt / _CONFIG),
        metrics=_read_json(ckpt / _METRICS),
        weights=weights,
    )


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[LoopLM, Checkpoint]:
    """Rebuild the LoopLM of a checkpoint, in eval mode on ``device``.

    Args:
        path: checkpoint, ``checkpoints`` or run directory (see :func:`resolve_checkpoint`).
        device: where to put the model.

    Raises:
        CheckpointError: missing or corrupted files, or weights that do not fit the config.
    """
    from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

    ckpt = load_checkpoint(path)
    model_config = ckpt.config.get("model") if isinstance(ckpt.config, dict) else None
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{ckpt.path / _CONFIG} has no 'model' section")
    try:
        model = LoopLM(LoopLMConfig.from_dict(model_config))
        model.load_state_dict(ckpt.weights)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit its model config: {err}"
        ) from err
    return model.to(device).eval(), ckpt
