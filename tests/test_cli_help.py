"""`align-jax <command> --help` lists that command's entry parameters."""

import inspect

from align_jax import cli
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


def test_arg_docs_parses_grouped_and_continued_lines():
    doc = "Summary.\n\nArgs:\n  a, b: first line\n    second line\n  c: alone\nReturns:\n  x\n"
    assert cli._arg_docs(doc) == {"a": ["first line", "second line"],
                                  "b": ["first line", "second line"], "c": ["alone"]}
