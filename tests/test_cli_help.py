"""`align-jax <command> --help` lists every setting of the command, each with a doc; an unknown
binding names the closest known ones."""

import importlib
import inspect

import gin
import pytest

from align_jax import cli, cli_help
from align_jax.methods import value_alignment
from align_jax.train import entry


def test_train_help_prints_train_parameters_defaults_and_docs(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: align-jax train" in out
    for name, p in inspect.signature(entry.train_main).parameters.items():
        want = "required" if p.default is p.empty else f"default {p.default!r}"
        assert f"  {name} ({want})" in out, name
    assert "passes over the data when num_steps is None." in out
    # Grouped docs ("seq_len, batch_size, ...: text") reach each name.
    assert out.split("  batch_size (default 8)\n")[1].startswith("      how records become")


def test_train_help_names_the_optimizer_bindings(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--gin_param='optim.OptimizerConfig.NAME=VALUE'" in out
    section = out.split("fields of align_jax.train.optim.OptimizerConfig")[1]
    assert "  learning_rate (default 0.0003)\n      the peak rate" in section
    assert "  warmup_ratio (default 0.0)" in section


def test_train_help_names_the_eval_bindings(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--gin_param='evaluation.EvalConfig.NAME=VALUE'" in out
    section = out.split("fields of align_jax.train.evaluation.EvalConfig")[1]
    for name in ("data (default None)", "every (default 0)", "keep_best (default False)",
                 "early_stopping_patience (default 0)", "metric (default 'loss')"):
        assert f"\n  {name}\n      " in section, name


def test_run_help_lists_the_recipe_parameters(capsys):
    assert cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin", "--help"]) == 0
    out = capsys.readouterr().out
    assert "parameters of align_jax.methods.value_alignment.value_alignment" in out
    params = [p for p in inspect.signature(value_alignment.value_alignment).parameters
              if p != "output_dir"]
    assert len(params) > 30
    for name in params:
        assert f"\n  {name} (" in out, name
    assert "  sft_steps (default 60)\n      updates per stage." in out
    # Only the recipe that file binds.
    assert "aligners_recipe.aligners" not in out
    # Without a run file: the recipes of every shipped run file.
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for recipe in ("value_alignment.value_alignment", "aligners_recipe.aligners", "sami.sami"):
        assert f"align_jax.methods.{recipe} (bind with" in out


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - {"bench"}))
def test_every_setting_has_a_doc(command):
    module, fn, _ = cli.COMMANDS[command]
    groups = cli._groups(command, getattr(importlib.import_module(module), fn), [])
    blank = [s.name for g in groups for s in g.settings
             if not s.doc or s.doc[0].startswith("see ")]
    assert not blank, f"{command} --help: no doc for {blank}"


def test_arg_docs_parses_grouped_and_continued_lines():
    doc = "Summary.\n\nArgs:\n  a, b: first line\n    second line\n  c: alone\nReturns:\n  x\n"
    assert cli_help.arg_docs(doc) == {"a": ["first line", "second line"],
                                      "b": ["first line", "second line"], "c": ["alone"]}
    wrapped = "Args:\n  a, b,\n    c: all three\n  d: alone\n"
    assert cli_help.arg_docs(wrapped) == {"a": ["all three"], "b": ["all three"],
                                          "c": ["all three"], "d": ["alone"]}


@pytest.mark.parametrize("binding,suggestion", [
    ("entry.train_main.learning_rate=1e-3", "did you mean optim.OptimizerConfig.learning_rate?"),
    ("entry.train_main.num_step=5", "did you mean entry.train_main.num_steps"),
    ("train.num_steps=5", "did you mean entry.train_main.num_steps"),
])
def test_unknown_binding_names_the_closest_known_ones(tmp_path, capsys, binding, suggestion):
    gin.clear_config()
    code = cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin", f"--gin_param={binding}",
                     f"--output_dir={tmp_path / 'out'}"])
    gin.clear_config()
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and suggestion in err[0], err
    assert not (tmp_path / "out").exists()
