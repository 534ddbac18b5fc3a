"""gin errors in one line naming file, line and binding; the shipped configs win over the cwd."""

import os
import pathlib

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "runs" / "sft_tiny.gin"


@pytest.fixture(autouse=True)
def _clean():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("binding,code,expect", [
    ("entry.train_main.num_steps = (5", 2,
     ":2: unclosed bracket in `entry.train_main.num_steps = (5`"),
    ("entry.train_main.mesh = %MESHH", 2, ":2: macro %MESHH is not defined"),
    ("entry.train_main.num_steps = 'five'", 2,
     ":2: entry.train_main.num_steps = 'five': expected int"),
    ("entry.train_main.batch_size = 0", 1, "train_main.batch_size=0: must be >= 1"),
    # gradient ascent without a word otherwise
    ("optim.OptimizerConfig.learning_rate = -1e-3", 1,
     "OptimizerConfig.learning_rate=-0.001: must be > 0"),
])
def test_gin_errors_are_one_line_with_file_and_line(tmp_path, capsys, binding, code, expect):
    path = tmp_path / "bad.gin"
    path.write_text(f"include '{SFT}'\n{binding}\n")
    assert cli.main(["train", f"--gin_file={path}", f"--output_dir={tmp_path / 'out'}"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert expect in first
    if code == 2:
        assert str(path) in first
    assert not (tmp_path / "out" / "config.gin").exists()


def test_shipped_configs_win_over_the_working_directory(tmp_path, monkeypatch, capsys):
    shadow = tmp_path / "configs" / "runs"
    shadow.mkdir(parents=True)
    (shadow / "sft_tiny.gin").write_text("entry.train_main.batch_size = 'shadowed'\n")
    monkeypatch.chdir(tmp_path)
    from align_jax import ginconf
    folders = ginconf.search_folders([], str(ROOT))
    assert ginconf.resolve("configs/runs/sft_tiny.gin", folders) == os.path.join(
        str(ROOT), "configs/runs/sft_tiny.gin")
    assert ginconf.resolve("./configs/runs/sft_tiny.gin", folders) == str(shadow / "sft_tiny.gin")
    # The explicit ./ path is the shadow file, parsed (and its wrong type named).
    code = cli.main(["train", f"--gin_file={SFT}", "--gin_file=./configs/runs/sft_tiny.gin",
                     f"--output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "batch_size = 'shadowed'" in capsys.readouterr().err
