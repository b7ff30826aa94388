"""Every training setting declared once: the CLI options, the validation of recipes and
recipe.json, and docs/options.md all come from core/settings.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_no_escaped_exception
from deeppose_cli.cli import main
from deeppose_cli.core.config import TrainConfig
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.manifests import load_stage_recipe
from deeppose_cli.core.settings import (BY_NAME, SETTINGS, check_recipe, options_markdown,
                                        stage_recipes)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def test_docs_options_page_is_what_the_declaration_generates():
    assert DOCS.read_text() == options_markdown(stage_recipes())


def test_every_recipe_key_is_a_declared_setting():
    for stage in (1, 2, 3):
        recipe = load_stage_recipe(stage)
        assert set(recipe) - {"stage"} <= set(BY_NAME), stage
        check_recipe(recipe)  # every value in range


def test_config_fields_are_the_declared_settings_plus_the_run_identity():
    import dataclasses

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names[:7] == ["stage", "framework", "dataset", "train_index", "out", "val_index",
                         "previous"]
    assert names[7:] == [s.name for s in SETTINGS]


@pytest.mark.parametrize("option, value", [
    ("--colour-noise", "nan"), ("--rotation", "nan"), ("--jitter-scale", "inf"),
    ("--jitter-translation", "inf"), ("--weight-decay", "nan"), ("--image-cache", "inf"),
    ("--lr", "inf"), ("--lr", "-1"), ("--dropout", "1"), ("--seed", "-3"),
    ("--input-size", "66"), ("--batch-size", "2.5"), ("--epochs", "x")])
def test_non_finite_and_out_of_range_options_are_refused_in_one_line(option, value, tmp_path):
    result = CliRunner().invoke(main, ["train-stage", "1", option, value, "--train",
                                       str(tmp_path / "train.jsonl"), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert_no_escaped_exception(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("rotation", math.nan, "must be a finite number"),
    ("lr", math.inf, "must be a finite number"),
    ("lr", 0.0, "must be 0 < x"),
    ("batch_size", 3.5, "whole number"),
    ("flip", "yes", "true or false"),
    ("loss", "huber", "must be one of l2, l1, laplace"),
    ("epochs", True, "must be a number"),
    ("colour_noise", 10 ** 400, "finite"),
])
def test_recipes_and_saved_recipes_are_checked_against_the_declaration(key, value, message):
    recipe = {**load_stage_recipe(1), key: value}
    with pytest.raises(DeepPoseError, match=message):
        TrainConfig.from_recipe(recipe, stage=1, framework="pytorch", dataset="lsp",
                                train_index="t", out="o")
    with pytest.raises(DeepPoseError, match="unknown recipe keys: lr_decay"):
        check_recipe({**load_stage_recipe(1), "lr_decay": 0.5})


def test_every_train_stage_option_has_help_with_its_recipe_value():
    from deeppose_cli.cli import main as group

    command = group.commands["train-stage"]
    import click

    helps = {opt: p.help for p in command.params if isinstance(p, click.Option)
             for opt in p.opts}
    for opt, text in helps.items():
        assert text, opt
    for setting in SETTINGS:
        text = helps[setting.option.split("/")[0]]
        assert "(recipe: " in text or "(default: " in text, (setting.name, text)
    assert "recipe: stage 1 0.001, stage 2 0.0003, stage 3 0.0003" in helps["--lr"]
    assert "default: unset" in helps["--max-iterations"]


def test_recipe_json_is_valid_json(tmp_path):
    from deeppose_cli.core.files import write_json

    write_json(tmp_path / "r.json", {"a": math.inf, "b": -math.inf, "c": math.nan, "d": [1.5]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: 1 / 0) == \
        {"a": None, "b": None, "c": None, "d": [1.5]}
