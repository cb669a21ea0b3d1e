"""Step-numbered, atomic, verifiable training checkpoints.

Layout of a run directory::

    out_dir/
      config.json                 the TrainConfig of the run
      metrics.jsonl               one JSON record per training step and per evaluation
      checkpoints/
        latest                    text file naming the newest complete checkpoint
        step_00000500/
          model.safetensors       weights (LoopLM state dict)
          config.json             the TrainConfig (with the nested LoopLMConfig)
          metrics.json            metrics at this step
          training_state.pt       optimizer, scheduler, depth sampler and RNG states
          manifest.json           step and SHA-256 of every file above (written last)

A checkpoint is first written into a hidden temporary directory next to its final place
and then renamed with ``os.replace``, so a crash never leaves a half-written
``step_*`` directory; the ``latest`` pointer is replaced the same way after the rename.
Loading checks every file against the manifest, so truncated or corrupted files raise
:class:`CheckpointError` instead of silently resuming from garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from eqloop.model import LoopLM, LoopLMConfig

__all__ = [
    "CHECKPOINT_DIR",
    "Checkpoint",
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_dir_name",
    "write_json_atomic",
]

CHECKPOINT_DIR = "checkpoints"  # sub-directory of a run holding the step_* directories
_LATEST = "latest"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_METRICS = "metrics.json"
_STATE = "training_state.pt"
_MANIFEST = "manifest.json"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted (the message says which file)."""


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


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(cpu, str(staging / _WEIGHTS), metadata={"step": str(step)})
        write_json_atomic(staging / _CONFIG, config)
        write_json_atomic(staging / _METRICS, metrics)
        torch.save(training_state, staging / _STATE)
        files = {name: _sha256(staging / name) for name in (_WEIGHTS, _CONFIG, _METRICS, _STATE)}
        write_json_atomic(staging / _MANIFEST, {"format": _FORMAT, "step": step, "files": files})
        if final.exists():  # same step written again (e.g. after an interrupted save)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=root))
            os.replace(final, old / final.name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pointer = root / _LATEST
    fd, tmp = tempfile.mkstemp(prefix=f".{_LATEST}-", dir=root)
    with os.fdopen(fd, "w") as handle:
        handle.write(final.name + "\n")
    os.replace(tmp, pointer)
    return final


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` points at in ``run_dir``, or None if the run has none.

    Raises:
        CheckpointError: ``latest`` names a directory that does not exist.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points at {target.name}, which does not exist")
    return target


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The ``step_*`` directory meant by ``path``.

    Args:
        path: a ``step_*`` checkpoint directory, a run directory or its ``checkpoints``
            sub-directory (both resolve to the latest checkpoint).

    Raises:
        CheckpointError: nothing resembling a checkpoint is found at ``path``.
    """
    path = Path(path)
    if (path / _MANIFEST).is_file() or (path / _WEIGHTS).is_file():
        return path
    for run_dir in (path, path.parent if path.name == CHECKPOINT_DIR else None):
        if run_dir is not None and (found := latest_checkpoint(run_dir)) is not None:
            return found
    raise CheckpointError(
        f"no checkpoint at {path}: expected a step_* directory with {_MANIFEST}, or a run "
        f"directory with {CHECKPOINT_DIR}/{_LATEST}"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Load weights, config and metrics of a checkpoint (see :func:`resolve_checkpoint`).

    Args:
        path: checkpoint, ``checkpoints`` or run directory.
        verify: check every file against the SHA-256 sums of the manifest.

    Raises:
        CheckpointError: a file is missing, unreadable, or does not match the manifest.
    """
    ckpt = resolve_checkpoint(path)
    manifest_path = ckpt / _MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {_MANIFEST} is missing")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not a checkpoint manifest")
    for name, expected in manifest["files"].items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if verify and _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupted: {name} does not match its SHA-256 in {_MANIFEST}"
            )
    try:
        weights = load_file(str(ckpt / _WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {ckpt / _WEIGHTS}: {err}") from err
    return Checkpoint(
        path=ckpt,
        step=int(manifest["step"]),
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
    ckpt = load_checkpoint(path)
    model_config = ckpt.config.get("model") if isinstance(ckpt.config, dict) else None
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{ckpt.path / _CONFIG} has no 'model' section")
    try:
        model = LoopLM(LoopLMConfig.from_dict(model_config))
        model.load_state_dict(ckpt.weights)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit its model config: {err}"
        ) from err
    return model.to(device).eval(), ckpt
