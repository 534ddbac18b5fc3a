"""`align-jax eval` through the real CLI: bad arguments are one line, before any model loads."""

import gin
import pytest

from align_jax import cli


def _eval(tmp_path, *params):
    gin.clear_config()
    try:
        return cli.main(["eval", f"--output_dir={tmp_path / 'eval'}",
                         *(f"--gin_param=entry.eval_main.{p}" for p in params)])
    finally:
        gin.clear_config()


def test_models_given_as_a_list_is_one_line(tmp_path, capsys):
    code = _eval(tmp_path, f"models=['{tmp_path / 'a'}', '{tmp_path / 'b'}']",
                 "sft_test='examples/sft.jsonl'")
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 2, err
    assert err[0].startswith("align-jax eval: ValueError: eval_main.models must be a mapping "
                             "name -> path, got a list")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("params", [(), ("preference_test='examples/preference.jsonl'",
                                         "teacher_forced=False")])
def test_no_test_set_is_an_error_not_an_empty_success(tmp_path, capsys, params):
    code = _eval(tmp_path, f"models={{'m': '{tmp_path / 'no_model'}'}}", *params)
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[0] == (
        "align-jax eval: ValueError: eval_main: nothing to evaluate: give sft_test, "
        "yes_no_test or preference_test (the last needs teacher_forced=True)"), err
    assert not (tmp_path / "eval").exists()
