"""TWIST settings, declared once (``TWIST_SETTINGS``): the config, the training flags and the README agree."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from llava_twist.model.config import TWIST_SETTINGS, USER_SETTINGS, TwistConfig
from llava_twist.model.loss import StepWeights
from llava_twist.train.arguments import TwistArguments

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING_ONLY = ["twist_router_lr", "twist_save_full", "twist_skip_bad_records", "twist_lora_r"]


def test_readme_table_lists_exactly_the_user_settings() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `twist_")]
    named = [name for row in rows for name in re.findall(r"`(twist_\w+)`", row.split("|")[1])]
    assert sorted(named) == sorted(s.name for s in USER_SETTINGS)


def test_flags_are_the_user_settings_and_the_training_ones() -> None:
    flags = {f.name: f for f in fields(TwistArguments)}
    assert list(flags) == [s.name for s in USER_SETTINGS] + TRAINING_ONLY
    for setting in USER_SETTINGS:
        assert flags[setting.name].default is None  # unset: the config's default, or a TWIST checkpoint's own
        assert flags[setting.name].metadata["help"].startswith(setting.help)


def test_config_defaults_are_the_declared_ones() -> None:
    config = TwistConfig()
    assert {s.name: getattr(config, s.name) for s in TWIST_SETTINGS} == {s.name: s.default for s in TWIST_SETTINGS}


def test_flags_reach_the_config() -> None:
    (args,) = HfArgumentParser(TwistArguments).parse_args_into_dataclasses(args=[
        "--twist_layers", "0, 2", "--twist_expert", "layer", "--twist_mix", "fixed", "--twist_mix_init", "0",
        "--twist_router_hidden", "8", "--twist_router_layer", "0", "--twist_router_loss_weight", "0.5",
        "--twist_router_balance", "false", "--twist_step_weights", "answer:2", "--twist_head", "True",
    ])
    kwargs = args.config_kwargs()
    assert set(kwargs) == {s.name for s in USER_SETTINGS} - {"twist_router"}
    config = TwistConfig(num_hidden_layers=4, **kwargs)
    assert config.twist_layers == [0, 2] and config.twist_mix_init == 0.0 and config.twist_router_balance is False
    assert config.twist_router_hidden == 8 and config.twist_head is True and config.twist_router == "prompt"


def test_step_weights_are_parsed_where_set() -> None:
    config = TwistConfig(num_hidden_layers=4, twist_step_weights="answer:2")
    assert config.step_weights == StepWeights.parse("answer:2")
    config.twist_step_weights = "1,1,2"  # as the builder sets a TWIST checkpoint's flags
    assert config.step_weights == StepWeights.parse("1,1,2")
    assert config.to_dict()["twist_step_weights"] == "1,1,2" and "_step_weights" not in config.to_dict()
    with pytest.raises(ValueError, match="--twist_step_weights 'foo:1'"):
        config.twist_step_weights = "foo:1"
