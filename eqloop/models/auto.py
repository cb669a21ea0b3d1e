"""Which models can be fine-tuned, and how they are loaded and saved in their own layout.

A fine-tunable model follows eqloop's looped-LM protocol:

* ``core_map(tokens) -> (f, z0)``: the loop's map ``f`` (B, S, d) -> (B, S, d), which
  closes over the batch's input, and the starting state ``z0``;
* ``readout(z) -> logits`` (B, S, V): decode a state;
* ``model(tokens, loops=T)`` and ``model(tokens, solver=..., tol=..., max_iter=...)``.

Two kinds of directory hold one:

* a pretrained directory in the Hugging Face layout (``config.json`` with ``model_type``
  ``"ouro"`` or ``"huginn_raven"``, safetensors, ``tokenizer.json``): loaded with
  :func:`eqloop.models.load`, saved back with ``model.save_pretrained`` plus the
  tokenizer files, so the result loads with ``eqloop.models.load`` (and upstream's
  tools);
* an eqloop run or checkpoint directory (``eqloop train``'s LoopLM): loaded with
  :func:`eqloop.training.checkpoint.load_model`, saved as an eqloop checkpoint; a LoopLM saved with
  ``model.save_pretrained`` (the layout above, ``model_type: "looplm"``) loads too.

Two safeguards of a fine-tuning run live here too: :func:`freeze_unreached` freezes the
parameters the training objective never uses (Ouro's exit gate: DDP needs a gradient for
every trainable parameter), and :func:`weights_fingerprint` identifies the base weights,
so that a LoRA checkpoint (adapters only) is never resumed on other base weights
(:func:`check_base_model`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eqloop.data.tokenizers import CharTokenizer, TextTokenizer, as_text_tokenizer
from eqloop.files import staged_directory
from eqloop.models.io import is_pretrained_dir  # raises on a malformed config.json
from eqloop.models.looplm.modeling import LoopLM
from eqloop.training.checkpoint import load_model, save_checkpoint

__all__ = [
    "LoadedModel",
    "TOKENIZER_FILES",
    "check_base_model",
    "freeze_unreached",
    "is_pretrained_dir",
    "load_for_finetuning",
    "save_model",
    "weights_fingerprint",
]

# Files of a pretrained directory that save_pretrained does not write: copied alongside.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


@dataclass
class LoadedModel:
    """A model ready to fine-tune.

    Attributes:
        model: the looped LM (in train mode, float32 unless asked otherwise).
        tokenizer: its tokenizer.
        arch: ``"ouro"``, ``"huginn_raven"`` or ``"looplm"`` (picks the LoRA targets).
        trained_loops: the loop count the model was trained with (SFT's default).
        source: the directory it came from.
        fingerprint: :func:`weights_fingerprint` of the model's base weights, taken when
            this object is made (LoRA adapters, if any, excluded).
    """

    model: nn.Module
    tokenizer: TextTokenizer
    arch: str
    trained_loops: int
    source: Path
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = weights_fingerprint(self.model)


def _looplm_tokenizer(model: LoopLM) -> TextTokenizer:
    """The character tokenizer an eqloop LoopLM reads: printable ASCII if it fits, else digits.

    ``eqloop train`` trains on arithmetic with ``CharTokenizer()``; its ids are a prefix of
    ``CharTokenizer.printable()``'s, so a model with a large enough vocabulary reads both.
    """
    printable = CharTokenizer.printable()
    if model.config.vocab_size >= printable.vocab_size:
        return as_text_tokenizer(printable)
    return as_text_tokenizer(CharTokenizer())


def load_for_finetuning(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a pretrained or eqloop model directory with its tokenizer.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a model directory of either kind (or a corrupted one).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no such model directory: {source}")
    from eqloop import pretrained

    if is_pretrained_dir(source):  # Ouro, Huginn, or a LoopLM's save_pretrained
        model = pretrained.load(source, dtype=dtype, device=device)
    else:  # an eqloop run or step checkpoint
        model = load_model(source, device=device)[0].to(dtype)
    arch = model.config.model_type
    if isinstance(model, LoopLM):
        tokenizer, trained = _looplm_tokenizer(model), int(model.config.default_loops)
    else:
        tokenizer = as_text_tokenizer(pretrained.load_tokenizer(source))
        trained = int(model.trained_loops)
    if tokenizer.vocab_size > _vocab_size(model):
        raise ValueError(
            f"the tokenizer of {source} has {tokenizer.vocab_size} ids but the model only "
            f"{_vocab_size(model)}"
        )
    return LoadedModel(model.train(), tokenizer, arch, trained, source)


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    return int(config.vocab_size if hasattr(config, "vocab_size") else config["vocab_size"])


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save a fine-tuned model in its own layout (adapters must be merged first).

    Pretrained models: ``model.save_pretrained(path)`` and the tokenizer files of
    ``source``. LoopLMs: an eqloop checkpoint under ``path`` (load it with
    ``eqloop.training.checkpoint.load_model(path)``).

    The directory appears whole or not at all (written beside it, then renamed).

    Raises:
        ValueError: ``path`` exists and is not empty (nothing is overwritten).
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not empty; choose another output directory")
    with staged_directory(target) as staging:  # a crash never leaves a partial model
        if isinstance(model, LoopLM):
            save_checkpoint(
                staging,
                0,
                weights=model.state_dict(),
                config={"model": model.config.to_dict()},
                metrics=metrics or {},
                training_state={},
            )
        else:
            model.save_pretrained(staging)
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file() and not (staging / name).exists():
                    shutil.copy2(Path(source) / name, staging / name)
    return target


# ------------------------------------------------------------------- the base weights

# A tensor of at most _WHOLE elements is hashed whole, a larger one in _WINDOWS windows of
# _WINDOW contiguous elements spread evenly over it (first and last elements included).
_WHOLE, _WINDOWS, _WINDOW = 4096, 16, 256


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic fingerprint of a model's weights (LoRA adapters excluded).

    A blake2b hash over every entry of ``model.state_dict()`` in order: its name, its
    shape and a sample of its values. Tensors of up to 4096 elements (norms, biases,
    Ouro's exit gate) are hashed whole; larger ones through 16 evenly spaced windows of
    256 contiguous elements (first and last element included), so a model costs about
    4096 values per tensor, milliseconds for a multi-GB model, where hashing every byte
    would read all of them. Any retraining, another checkpoint of the same architecture
    or another architecture changes it; an edit confined to elements outside the
    windows of a large tensor would not (the price of not reading several GB).

    The values are hashed as float64 on the CPU, so the fingerprint does not depend on
    the device, and not on the dtype when the values are exactly representable (a bf16
    checkpoint loaded in float32 or float64). LoRA adapters (peft's ``lora_*`` tensors)
    are skipped and peft's ``.base_layer`` is removed from the names, so a model has the
    same fingerprint before and after :func:`eqloop.training.lora.attach_lora`.

    Args:
        model: any module.

    Returns:
        32 hexadecimal digits.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _WHOLE:
            last = flat.numel() - _WINDOW
            starts = [round(k * last / (_WINDOWS - 1)) for k in range(_WINDOWS)]
            flat = torch.cat([flat[s : s + _WINDOW] for s in starts])
        values = flat.to(device="cpu", dtype=torch.float64).numpy().tobytes()
        header = f"{name.replace('.base_layer.', '.')}:{tuple(tensor.shape)};"
        digest.update(header.encode())
        digest.update(values)
    return digest.hexdigest()


def check_base_model(
    saved: dict[str, Any], loaded: LoadedModel, checkpoint: Path, *, adapters_only: bool
) -> None:
    """Refuse to resume adapters on base weights other than those they were trained on.

    A LoRA checkpoint holds only the adapters; the base weights are read again from
    ``init_from`` on resume. If they changed in between, the run would continue a
    different model, silently.

    Args:
        saved: the checkpoint's training state (``base_fingerprint``: the fingerprint of
            the base weights the run started from).
        loaded: the model about to be resumed, with its fingerprint.
        checkpoint: the checkpoint directory, named in the message.
        adapters_only: whether the checkpoint holds only the adapters (LoRA); a full
            checkpoint restores every weight, so the base does not matter.

    Raises:
        ValueError: the base weights differ from the recorded ones (the message names the
            checkpoint and the base model's directory).
    """
    if not adapters_only:
        return
    recorded = saved.get("base_fingerprint")
    if recorded is None:  # written before fingerprints were recorded
        warnings.warn(
            f"{checkpoint} records no fingerprint of its base model; cannot check that "
            f"{loaded.source} still holds the weights its LoRA adapters were trained on",
            stacklevel=2,
        )
    elif recorded != loaded.fingerprint:
        raise ValueError(
            f"cannot resume from {checkpoint}: its LoRA adapters were trained on base weights "
            f"with fingerprint {recorded}, but the base model in {loaded.source} now has "
            f"{loaded.fingerprint} (its weights changed since the run started). Put the "
            f"original weights back in {loaded.source}, or start a new run in another out_dir"
        )


def freeze_unreached(model: nn.Module, loss: Callable[[], Tensor]) -> list[str]:
    """Freeze the trainable parameters of ``model`` that ``loss()`` does not depend on.

    The training objective decides what trains: a parameter it never reaches (Ouro's
    ``early_exit_gate``, which only the gated exits use, not the loss after a fixed loop
    count) would get no gradient, which DDP rejects and which would leave it in the
    optimizer for nothing. ``loss()`` is computed once (a forward with its graph, no
    backward; the random state is restored afterwards) and the parameters found as
    leaves of its autograd graph keep ``requires_grad``; the others are frozen. The
    objective must reach the same parameters at every step (true of the looped LMs:
    every loop applies the same map).

    Args:
        model: the model about to be trained (LoRA adapters already attached).
        loss: computes a scalar loss of the objective on a small probe batch.

    Returns:
        The names of the parameters frozen, in ``named_parameters`` order.

    Raises:
        ValueError: the loss reaches none of the trainable parameters.
    """
    device = next(model.parameters()).device
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type), torch.enable_grad():
        value = loss()
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [value.grad_fn]
    while stack:  # the graph's leaves are the AccumulateGrad nodes' variables
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            reached.add(id(node.variable))
        stack.extend(child for child, _ in node.next_functions)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if trainable and not any(id(p) in reached for _, p in trainable):
        raise ValueError(
            f"the training objective uses none of the {len(trainable)} trainable parameters "
            f"of {type(model).__name__}"
        )
    frozen = [(name, p) for name, p in trainable if id(p) not in reached]
    for _, p in frozen:
        p.requires_grad_(False)
    return [name for name, _ in frozen]
