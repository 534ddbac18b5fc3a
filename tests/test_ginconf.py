"""gin errors in one line naming file, line and binding; the shipped configs win over the cwd."""

import os
import pathlib
import subprocess
import sys

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


@pytest.mark.parametrize("included", [False, True])
def test_non_utf8_gin_file_is_one_line_naming_file_and_line(tmp_path, capsys, included):
    bad = tmp_path / "latin1.gin"
    bad.write_bytes(f"include '{SFT}'\nentry.train_main.data = 'caf\xe9.jsonl'\n"
                    .encode("latin-1"))
    named = bad
    if included:
        named = tmp_path / "outer.gin"
        named.write_text(f"include '{bad}'\n")
    assert cli.main(["train", f"--gin_file={named}", f"--output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{bad}:2: not UTF-8 text (byte 0xe9)" in err
    assert not (tmp_path / "out").exists()


def test_missing_gin_file_names_the_closest_shipped_ones(capfd):
    assert cli.main(["run", "--gin_file=configs/runs/value_alignmnt_tiny.gin"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no "ERROR:root:Path not found" lines before it
    assert "configs/runs/value_alignmnt_tiny.gin: no such gin file" in err[0]
    assert "did you mean configs/runs/value_alignment_tiny.gin" in err[0]


def test_search_path_misses_log_nothing(tmp_path, capfd):
    # Every include is looked up in tmp_path first; gin's resource reader logged an ERROR
    # line for each miss.
    code = cli.main(["train", f"--gin_file={SFT}", f"--gin_search_path={tmp_path}"],
                    check_only=True)
    assert code == 0
    assert capfd.readouterr().err == ""


def test_shipped_data_paths_resolve_from_any_directory_and_the_cwd_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin"], check_only=True) == 0
    assert gin.query_parameter("entry.train_main.data") == str(ROOT / "examples" / "sft.jsonl")
    assert gin.query_parameter("%TOKENIZER") == (
        f"train:{ROOT / 'examples' / 'values_document.md'}")
    gin.clear_config()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert cli.main(["train", "--gin_file=configs/runs/sft_tiny.gin"], check_only=True) == 0
    assert gin.query_parameter("entry.train_main.data") == "examples/sft.jsonl"


def _stderr_lines(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "align_jax.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    return res.returncode, res.stderr.splitlines()


def test_tiny_run_outside_the_repository_has_a_clean_stderr(tmp_path):
    """The shipped tiny config trains from another directory (its tokenizer text and data are
    the repository's), and a clean run and --help print no ERROR or WARNING line."""
    code, err = _stderr_lines(["train", "--help"], tmp_path)
    assert code == 0 and err == []
    code, err = _stderr_lines(
        ["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={tmp_path / 'out'}",
         "--gin_param=entry.train_main.num_steps=4", "--gin_param=entry.train_main.progress=False",
         "--gin_param=entry.train_main.export_hf=False"], tmp_path)
    assert code == 0, err
    assert not [line for line in err if "ERROR" in line or "WARNING" in line], err
    assert (tmp_path / "out" / "train_summary.json").exists()


def test_batch_not_divisible_by_grad_accum_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", f"--gin_file={SFT}", f"--output_dir={out}",
                     "--gin_param=entry.train_main.batch_size=4",
                     "--gin_param=entry.train_main.grad_accum=16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert "train_main.batch_size=4 is not divisible by grad_accum=16" in err
    assert "set batch_size=16 or grad_accum=4" in err
    assert not out.exists()  # refused before the run folder, the tokenizer or any model


def test_batch_too_large_for_memory_is_refused_with_the_numbers(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", f"--gin_file={SFT}", f"--output_dir={out}",
                     "--gin_param=entry.train_main.batch_size=1_000_000_000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[0]
    # 5 int32/float32 arrays x 128 tokens x 1e9 rows = 2.56e12 bytes of batch, over the 8 fake
    # devices of conftest: 298.02 GiB each.
    assert "batch_size=1000000000 x seq_len=128 needs at least" in err
    assert "batch 298.02 GiB" in err and "over the host's RAM" in err
    assert not (out / "checkpoints").exists() and not (out / "model").exists()


def test_only_shipped_folders_resolve_against_the_repository(tmp_path, monkeypatch):
    from align_jax import ginconf
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "repo"
    (root / "runs" / "demo").mkdir(parents=True)  # a checkout's own earlier run
    (root / "examples").mkdir()
    (root / "examples" / "a.jsonl").write_text("{}\n")
    assert ginconf._repo_paths({"out": "runs/demo", "data": ["examples/a.jsonl"]},
                               str(root)) == {"out": "runs/demo",
                                              "data": [str(root / "examples" / "a.jsonl")]}
