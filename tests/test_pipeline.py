"""Pipeline text and recipe files: one list of (pass, options), strict validation."""

from __future__ import annotations

import pytest
from pydantic import Field

from slimc.errors import UsageError
from slimc.passmanager import PassOptions, PreservedAnalyses, TransformPass
from slimc.pipeline import load_recipe, parse_pipeline_text, recipe_items, validate


class Toy(TransformPass):
    """A pass with typed, bounded options."""

    name = "toy"

    class Options(PassOptions):
        ratio: float = Field(0.5, ge=0.0, le=1.0)
        mode: str = "a"
        steps: int = 1

    def run(self, ir, ctx, options):
        return PreservedAnalyses.all()


PASSES = {"toy": Toy, "other": Toy}


def test_text_syntax_parses_options_and_nesting():
    items = parse_pipeline_text("toy{ratio=0.3,mode=b}, other ,toy")
    assert items == [("toy", {"ratio": "0.3", "mode": "b"}), ("other", {}), ("toy", {})]
    invocations = validate(items, PASSES)
    assert invocations[0].options.ratio == pytest.approx(0.3)
    assert str(invocations[0]) == "toy{ratio=0.3,mode=b,steps=1}"


def test_yaml_and_toml_recipes_equal_the_text(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "pipeline:\n  - pass: toy\n    options: {ratio: 0.3, mode: b}\n  - other\n")
    (tmp_path / "r.toml").write_text(
        '[[pipeline]]\npass = "toy"\noptions = { ratio = 0.3, mode = "b" }\n'
        '[[pipeline]]\npass = "other"\n')
    text = validate(parse_pipeline_text("toy{ratio=0.3,mode=b},other"), PASSES)
    for name in ("r.yaml", "r.toml"):
        recipe = validate(recipe_items(load_recipe(tmp_path / name)), PASSES)
        assert [inv.to_json() for inv in recipe] == [inv.to_json() for inv in text]


@pytest.mark.parametrize("text, fragments", [
    ("tooy", ["Unknown pass 'tooy'", "Did you mean toy", "Registered passes: other, toy"]),
    ("toy{speed=3}", ["unknown option 'speed'", "valid options of toy", "ratio (float"]),
    ("toy{ratio=fast}", ["option ratio='fast'", "valid number"]),
    ("toy{ratio=1.5}", ["option ratio='1.5'", "less than or equal to 1", "le 1.0"]),
    ("toy{steps=2.5}", ["option steps='2.5'"]),
    ("toy{ratio}", ["is not KEY=VALUE"]),
    ("toy{ratio=1", ["never closed"]),
    (",,", ["names no pass", "-O0: no passes"]),
    ("toy,,other", ["has an empty pass", "two commas in a row"]),
    ("toy,", ["has an empty pass"]),
    ("toy{ratio=0.5,}", ["empty option in 'toy'"]),
])
def test_mistakes_name_the_problem_and_what_is_valid(text, fragments):
    with pytest.raises(UsageError) as info:
        validate(parse_pipeline_text(text), PASSES)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_bad_recipe_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("pipeline: [toy\n")
    with pytest.raises(UsageError, match="not valid YAML") as info:
        load_recipe(bad_yaml)
    # one paragraph: PyYAML's message quoted the source over several lines, caret and all
    assert "\n" not in str(info.value) and "line 2" in str(info.value), str(info.value)
    no_pipeline = tmp_path / "np.toml"
    no_pipeline.write_text('target = "arm"\n')
    with pytest.raises(UsageError, match="top-level 'pipeline'"):
        load_recipe(no_pipeline)
    with pytest.raises(UsageError, match="Cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_unknown_pass_exits_2_before_loading_the_model(cli):
    result = cli("compile", "no/such/model", "--pipeline", "eliminate-dead-cod")
    assert result.code == 2
    assert "Unknown pass 'eliminate-dead-cod'" in result.err
    assert "eliminate-dead-code" in result.err
    assert "Traceback" not in result.err


def test_cli_empty_pipeline_elements_exit_2_instead_of_building_the_default(cli):
    # ",," used to be read as "no --pipeline" and built the -O1 artifact without a word
    for text in (",,", "", "eliminate-dead-code,,"):
        result = cli("compile", "no/such/model", "--pipeline", text)
        assert result.code == 2, result.err
        assert "--pipeline" in result.err and "Traceback" not in result.err


def test_unknown_optimisation_level(cli):
    result = cli("compile", "tests.models:small_cnn", "-O7")
    assert result.code == 2
    assert "-O7 is not a known optimisation level" in result.err and "-O2" in result.err


def test_opt_levels_name_registered_passes():
    from slimc.compiler import OPT_LEVELS
    from slimc.plugins import get_registry

    for level, text in OPT_LEVELS.items():
        invocations = validate(parse_pipeline_text(text), get_registry().passes)
        assert [inv.name for inv in invocations] == [name for name, _ in
                                                     parse_pipeline_text(text)]
        assert bool(invocations) == (level > 0)
