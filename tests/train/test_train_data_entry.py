"""`align-jax train` on a mixture of an `hf:folder:config:split` chat set and a JSONL file,
with a W&B writer (a stand-in module): the data and logging options through the real CLI."""

import json
import pathlib
import sys
import types

import gin
import pytest

from align_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAT = [{"messages": [{"role": "user", "content": f"Who reviews repairs {i}?"},
                      {"role": "assistant", "content": "The repair lead."},
                      {"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": "The member who asked."}]}
        for i in range(6)]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


# A real run (compile + 2 steps): ~25 s of CPU, over a minute on the shared 2-core machine.
@pytest.mark.slow
def test_mixture_of_hf_config_and_jsonl_with_wandb(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    folder = tmp_path / "chats"
    (folder / "multi").mkdir(parents=True)
    (folder / "multi" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: multi\n  data_files:\n"
                                      "  - split: train\n    path: multi/train.jsonl\n---\n")
    calls = []
    run = types.SimpleNamespace(log=lambda values, *, step: calls.append(("log", step, values)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    data = f"hf:{folder}:multi:train@1,examples/sft.jsonl@3"
    args = ["train", "--gin_file=configs/runs/sft_tiny.gin", f"--output_dir={out}",
            "--gin_param=entry.train_main.progress=False",
            f"--gin_param=entry.train_main.data='{data}'",
            "--gin_param=entry.train_main.loggers=('wandb',)",
            "--gin_param=entry.train_main.num_steps=2",
            "--gin_param=optim.OptimizerConfig.warmup_steps=0",
            "--gin_param=entry.train_main.log_every=1",
            "--gin_param=entry.train_main.export_hf=False"]
    assert cli.main(args) == 0
    summary = json.load(open(out / "train_summary.json"))
    examples = sum(1 for line in open(ROOT / "examples" / "sft.jsonl") if line.strip())
    assert summary["data"]["examples"] == examples + len(CHAT)
    assert f"{folder}:multi[train][5]" not in summary["data"]["load"]  # nothing skipped
    init = calls[0]
    assert init[0] == "init" and init[1]["config"]["data"] == data
    assert init[1]["name"] == "run"
    assert [(c[0], c[1]) for c in calls[1:3]] == [("log", 1), ("log", 2)]
    assert calls[-1] == ("finish",)
    # A run logged elsewhere is the same run: the loggers are not a resume setting.
    settings = json.load(open(out / "settings.json"))
    assert "loggers" not in settings and settings["data"] == data
