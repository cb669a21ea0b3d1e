"""eqloop.training.config.ConfigBase: the one to/from dict, unknown-key check and section rule of
every config dataclass (issue 19)."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from eqloop.config import ConfigBase
from eqloop.finetune.config import FinetuneConfig, LoraOptions
from eqloop.model import LoopLMConfig
from eqloop.training.config import SolveConfig, TrainConfig
from eqloop.tune.config import TuneConfig

# One valid instance of each config (FinetuneConfig needs its two paths to validate).
CONFIGS: list[ConfigBase] = [
    LoopLMConfig(d_model=16, n_heads=2),
    SolveConfig(tol=1e-3, solver_options={"m": 3}),
    TrainConfig(lam=0.2, betas=(0.8, 0.9), solve=SolveConfig(), backward="ift"),
    LoraOptions(r=4, targets=["q_proj"]),
    FinetuneConfig(init_from="x", train_file="y", lora=LoraOptions(r=2), betas=(0.8, 0.9)),
    TuneConfig(loops=[2, 4], space={"lam": {"low": 0.01, "high": 0.5}}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json_by_the_one_base(config: ConfigBase) -> None:
    assert isinstance(config, ConfigBase)
    data = json.loads(json.dumps(config.to_dict()))  # JSON-serialisable, tuples as lists
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_names_an_unknown_key_and_the_valid_ones(config: ConfigBase) -> None:
    cls = type(config)
    valid = sorted(f.name for f in fields(config))  # type: ignore[arg-type]
    name = cls.config_name or cls.__name__
    message = f"unknown {name} keys: ['bogus']; valid keys are {valid}"
    with pytest.raises(ValueError, match=re.escape(message)):
        cls.from_dict({**config.to_dict(), "bogus": 1})


def test_a_section_given_as_a_dict_is_checked_by_its_own_config() -> None:
    # Before, a LoRA section was checked by its own copy of the check with another message.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown LoraOptions keys: ['rank']; valid keys are ['alpha', 'dropout', 'r', "
            "'targets']"
        ),
    ):
        FinetuneConfig(init_from="x", train_file="y", lora={"rank": 4})
    # and validated when it is made, naming the field as the section's messages do
    with pytest.raises(ValueError, match=r"lora\.r must be"):
        FinetuneConfig(lora={"r": 0})


def test_sequence_fields_take_their_declared_type() -> None:
    # A tuple field read from JSON/TOML (a list) is a tuple, a list field given a tuple a
    # list: the same rule for every config (TuneConfig.loops was left a tuple before).
    assert TuneConfig(loops=(2, 4)).loops == [2, 4]
    assert FinetuneConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert TrainConfig(eval_loops=(1, 2)).eval_loops == [1, 2]
