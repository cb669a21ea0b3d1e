"""LoRA adapters through peft on modules named by their upstream parameter names.

``attach_lora`` injects LoRA layers (peft's ``inject_adapter_in_model`` with a
``LoraConfig``) into the ``nn.Linear`` modules whose qualified names end with one of the
given names, and freezes every other parameter; ``merge_lora`` folds each adapter into
its base weight (``W + (alpha / r) B A``) and puts the plain ``nn.Linear`` back, so the
merged model has exactly the parameter names and shapes it had before, and saves in its
own layout.

Default targets per architecture (``DEFAULT_TARGETS``) are the attention and MLP
projections: Ouro's ``q_proj ... down_proj`` (in every layer, as every layer is looped),
Huginn's ``attn.Wqkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``, and eqloop's own
LoopLM's ``qkv``, ``proj``, ``fc_in``, ``fc_out``. A name given with dots (``core.0.attn``
or ``transformer.core_block``) restricts the adapters to modules under that path.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from solvers import checks

__all__ = ["DEFAULT_TARGETS", "attach_lora", "lora_module_names", "merge_lora"]

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "ouro": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "huginn_raven": ("attn.Wqkv", "attn.proj", "mlp.fc", "mlp.proj"),
    "looplm": ("qkv", "proj", "fc_in", "fc_out"),
}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def attach_lora(
    model: nn.Module,
    targets: Sequence[str],
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Inject LoRA adapters into the named linear modules, in place; freeze the rest.

    Args:
        model: any ``nn.Module``.
        targets: module names matched as suffixes of qualified names at a dot boundary
            (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``).
        r: adapter rank.
        alpha: LoRA scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the adapter's input.

    Returns:
        The qualified names of the adapted modules, sorted.

    Raises:
        ValueError: no targets, a target that matches no ``nn.Linear`` (the linear
            modules' names are listed), bad ``r``/``alpha``/``dropout``, or a model that
            already has adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    r = checks.integer("lora r", r, low=1)
    alpha = checks.number("lora alpha", alpha, low=0.0, low_open=True)
    dropout = checks.number("lora dropout", dropout, low=0.0, high=1.0, high_open=True)
    if not targets or isinstance(targets, str):
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    if lora_module_names(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    linear = _linear_names(model)
    chosen = sorted({name for name in linear for t in targets if _matches(name, t)})
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linear)]
    if unmatched:
        shown = ", ".join(linear[:12]) + (", ..." if len(linear) > 12 else "")
        raise ValueError(
            f"LoRA targets {unmatched} match no nn.Linear module of {type(model).__name__}; "
            f"its linear modules are: {shown}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=chosen, bias="none"
    )
    inject_adapter_in_model(config, model)
    return lora_module_names(model)


def lora_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules that carry LoRA adapters, sorted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and restore the plain modules.

    Afterwards every parameter requires grad again, as in a model that never had
    adapters.

    Returns:
        The number of modules merged (0 for a model without adapters).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = lora_module_names(model)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        assert isinstance(layer, BaseTunerLayer)
        layer.merge(safe_merge=True)
        setattr(parent, child_name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return len(names)
