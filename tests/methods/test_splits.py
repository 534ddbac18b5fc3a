"""A recipe's held-out split parameters are recorded and cannot change under trained stages."""

import json

import pytest

from align_jax.methods.splits import check_split


def test_split_change_is_refused_once_a_stage_trained(tmp_path):
    params = {"heldout_fraction": 0.2, "sft_test": None}
    check_split(str(tmp_path), params, recipe="value_alignment", stages=("sft", "dpo"))
    assert json.loads((tmp_path / "split.json").read_text()) == params
    # Before any stage trained, a change just replaces the record.
    check_split(str(tmp_path), {**params, "heldout_fraction": 0.3}, recipe="value_alignment",
                stages=("sft", "dpo"))
    (tmp_path / "sft").mkdir()
    with pytest.raises(ValueError) as e:
        check_split(str(tmp_path), {**params, "heldout_fraction": 0.5},
                    recipe="value_alignment", stages=("sft", "dpo"))
    msg = str(e.value)
    assert "\n" not in msg and "value_alignment.heldout_fraction was 0.3 when sft trained, " \
        "now 0.5" in msg, msg
    assert json.loads((tmp_path / "split.json").read_text())["heldout_fraction"] == 0.3
    # The same split resumes.
    check_split(str(tmp_path), {**params, "heldout_fraction": 0.3}, recipe="value_alignment",
                stages=("sft", "dpo"))
