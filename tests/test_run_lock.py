"""The run-folder lock: one writer, stale locks taken over, malformed lock files in one line."""

import json
import logging
import os

import pytest

from align_jax import run_lock


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", '{"pid": "abc", "host": "h"}',
                                     '{"pid": [1], "host": "h"}', "{not json"])
def test_malformed_lock_is_taken_over_with_one_line(tmp_path, caplog, content):
    # A lock holding a JSON list (or any other shape) printed a traceback.
    (tmp_path / ".lock").write_text(content)
    with caplog.at_level(logging.WARNING, logger="align_jax.run_lock"):
        path = run_lock.acquire(tmp_path)
    assert json.loads(open(path).read())["pid"] == os.getpid()
    [record] = [r for r in caplog.records if "stale lock" in r.getMessage()]
    assert "\n" not in record.getMessage() and ".lock" in record.getMessage()
    run_lock.release(path)
    assert not (tmp_path / ".lock").exists()


def test_release_leaves_a_malformed_lock_alone(tmp_path):
    (tmp_path / ".lock").write_text("[1, 2]")
    run_lock.release(str(tmp_path / ".lock"))
    assert (tmp_path / ".lock").read_text() == "[1, 2]"
