"""Optional: transformers' Auto classes for Ouro and Huginn, without remote code.

After :func:`register_auto_classes`, ``AutoModelForCausalLM.from_pretrained(path)`` opens
an Ouro or Huginn directory with eqloop's implementation (no ``trust_remote_code``, so the
``auto_map`` code upstream ships, which breaks on transformers 5, never runs). The result
is a thin ``PreTrainedModel`` around the eqloop model: ``forward`` returns a
``CausalLMOutput`` (loss with the usual shift when ``labels`` are given), ``generate``
is eqloop's cached generation, and ``.eqloop`` is the eqloop model itself for every other
tool (loops, solvers, diagnostics). ``from_pretrained`` opens local directories only and
first runs :func:`eqloop.models.io.check_checkpoint`, the same check as
:func:`eqloop.models.load`: a missing tensor, an unknown config key (unless
``strict_config=False``), a shard outside the directory or a non-float weight is refused
before transformers reads anything. Importing this module imports transformers; nothing
else in eqloop does.

Example:
    >>> from transformers import AutoModelForCausalLM            # doctest: +SKIP
    >>> from eqloop.models.hf import register_auto_classes
    >>> register_auto_classes()
    >>> model = AutoModelForCausalLM.from_pretrained("Ouro-1.4B")
    >>> model(input_ids).logits, model.eqloop(input_ids, loops=8)
"""

from __future__ import annotations

import os
from dataclasses import fields
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eqloop.models.config import ARCHITECTURES, config_from_dict
from eqloop.models.io import check_checkpoint, model_class

__all__ = ["register_auto_classes"]

# Keys transformers adds to a config when it reads one; not upstream keys.
_TRANSFORMERS_KEYS = ("rope_parameters",)


def _eqloop_config(hf_config: Any) -> Any:
    data = dict(hf_config.to_diff_dict())
    rope = data.pop("rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_parameters={rope!r} is not implemented by eqloop (only default rotary)"
        )
    for key in _TRANSFORMERS_KEYS:
        data.pop(key, None)
    # transformers' config class adds rope_scaling=None: drop it for an architecture
    # without that key (Huginn), so strict reading does not see an unknown key.
    cls = ARCHITECTURES.get(data.get("model_type"))
    keys = set() if cls is None else {f.name for f in fields(cls)}
    if cls is not None and data.get("rope_scaling", 0) is None and "rope_scaling" not in keys:
        data.pop("rope_scaling")
    return config_from_dict(data, strict=False)


@cache
def register_auto_classes() -> dict[str, type]:
    """Register eqloop's Ouro and Huginn with ``AutoConfig``/``AutoModelForCausalLM``.

    Idempotent. Returns ``{model_type: model class}``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    classes: dict[str, type] = {}
    for model_type, arch in ARCHITECTURES.items():
        prefix = arch.__name__.removesuffix("Config")  # EqloopOuroConfig, ...
        config_cls = _config_class(model_type, prefix)
        model_cls = _model_class(arch, config_cls, prefix)
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        classes[model_type] = model_cls
    return classes


def _config_class(model_type: str, prefix: str) -> type:
    """The transformers config class of one architecture (e.g. ``EqloopOuroConfig``).

    Args:
        model_type: the architecture's ``model_type`` (``"ouro"``, ``"huginn_raven"``).
        prefix: the class name's stem (``"Ouro"``, ...).
    """
    from transformers import PretrainedConfig

    def config_init(self: Any, rope_scaling: Any = None, **kwargs: Any) -> None:
        PretrainedConfig.__init__(self, **kwargs)
        # Kept out of transformers' rope handling (it would warn and rewrite the key).
        self.__dict__["rope_scaling"] = rope_scaling

    return type(
        f"Eqloop{prefix}Config",
        (PretrainedConfig,),
        {"model_type": model_type, "__init__": config_init},
    )


def _model_class(arch: type, config_cls: type, prefix: str) -> type:
    """The ``PreTrainedModel`` around the eqloop model of one architecture.

    Args:
        arch: the architecture's eqloop config class (from ``ARCHITECTURES``).
        config_cls: its transformers config class (from :func:`_config_class`).
        prefix: the class name's stem (``"Ouro"``, ...).

    Returns:
        The class (e.g. ``EqloopOuroForCausalLM``): ``forward`` takes (B, S) token ids
        and returns a ``CausalLMOutput`` with (B, S, V) logits.
    """
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    def __init__(self: Any, config: Any) -> None:
        PreTrainedModel.__init__(self, config)
        eqloop_config = _eqloop_config(config)
        inner = model_class(eqloop_config)(eqloop_config)
        for name, module in inner.named_children():
            setattr(self, name, module)  # the same modules: upstream key names
        object.__setattr__(self, "_eqloop", inner)  # not a child: no duplicate keys
        self.post_init()

    def forward(
        self: Any,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **options: Any,
    ) -> Any:
        logits = self._eqloop(input_ids, attention_mask=attention_mask, **options)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def generate(self: Any, input_ids: Tensor, **options: Any) -> Any:
        return self._eqloop.generate(input_ids, **options)

    def from_pretrained(
        cls: type[Any],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *args: Any,
        strict_config: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Check the directory as :func:`eqloop.models.load` does, then load it.

        Args:
            pretrained_model_name_or_path: a local checkpoint directory.
            strict_config: reject config.json keys eqloop does not know.
            *args, **kwargs: passed on to ``PreTrainedModel.from_pretrained``.
        """
        check_checkpoint(pretrained_model_name_or_path, strict_config=strict_config)
        return PreTrainedModel.from_pretrained.__func__(
            cls, pretrained_model_name_or_path, *args, **kwargs
        )

    body = {
        "config_class": config_cls,
        "base_model_prefix": arch.BASE_MODEL_PREFIX,
        # Tensors upstream files carry that eqloop recomputes (Huginn's freqs_cis).
        "_keys_to_ignore_on_load_unexpected": [f"^{key}$" for key in arch.RECOMPUTED_KEYS],
        "__init__": __init__,
        "forward": forward,
        "generate": torch.no_grad()(generate),
        "from_pretrained": classmethod(from_pretrained),
        "_init_weights": lambda self, module: None,  # weights come from the files
        "eqloop": property(lambda self: self._eqloop, doc="The eqloop model (same modules)."),
        "get_input_embeddings": lambda self: self._eqloop.get_input_embeddings(),
    }
    return type(f"Eqloop{prefix}ForCausalLM", (PreTrainedModel,), body)
