"""Fine-tuning of pretrained looped LMs with SFT or STARS (``eqloop finetune``).

Modules, each small:

* ``config``: :class:`FinetuneConfig` (one dataclass, JSON/TOML, ``--set`` overrides);
* ``data``: GSM8K and prompt/completion JSONL, the prompt template, answer extraction;
* ``problems``: offline grade-school word problems with known answers;
* ``models``: loading a pretrained or eqloop directory, saving in its own layout;
* ``lora``: peft adapters on named modules, merged back exactly;
* ``train``: the fine-tuning loop (SFT / STARS, DDP / FSDP, resumable);
* ``harness``: the ``eqloop`` model class for lm-evaluation-harness, ``eqloop-lm-eval``;
* ``cli``: the ``eqloop finetune`` subcommand.

Names are imported lazily so that ``import eqloop.recipes.finetune`` does not load torch or peft.
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "FinetuneConfig": "eqloop.recipes.finetune.config",
    "LoraOptions": "eqloop.recipes.finetune.config",
    "load_finetune_config": "eqloop.recipes.finetune.config",
    "Example": "eqloop.data.qa",
    "PromptTemplate": "eqloop.data.qa",
    "extract_answer": "eqloop.data.qa",
    "load_jsonl": "eqloop.data.qa",
    "write_jsonl": "eqloop.data.qa",
    "make_problems": "eqloop.data.problems",
    "make_splits": "eqloop.data.problems",
    "as_text_tokenizer": "eqloop.data.tokenizers",
    "load_for_finetuning": "eqloop.models.auto",
    "save_model": "eqloop.models.auto",
    "attach_lora": "eqloop.training.lora",
    "merge_lora": "eqloop.training.lora",
    "finetune": "eqloop.recipes.finetune.train",
    "accuracy_vs_loops": "eqloop.evaluation.accuracy",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
