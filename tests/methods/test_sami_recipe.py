"""The SAMI recipe through `align-jax run`: sample, train from the base, measure, repeat."""

import json
import math
import pathlib

import gin
import jax

from align_jax import cli
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sami_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = tmp_path / "base"
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    tok = train_tokenizer(lines, base, vocab_size=400)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(base))
    gin.clear_config()
    out = tmp_path / "sami"
    params = [f"HF_CHECKPOINT='{base}'", "sami.sami.num_iterations=2",
              "sami.sami.max_new_tokens=8", "sami.sami.progress=False"]
    code = cli.main(["run", "--gin_file=configs/runs/sami_recipe_tiny.gin",
                     f"--output_dir={out}"] + [f"--gin_param={p}" for p in params])
    gin.clear_config()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["mi_bound"]) and r["mi_bound"] <= math.log(2) + 1e-5
               for r in rows)
    for k in (1, 2):
        # Iteration k trains the base model for 2k steps on 2k batches of fresh samples.
        metrics = [json.loads(x) for x in open(out / f"iter_{k}" / "train" / "metrics.jsonl")]
        assert metrics[-1]["step"] == 2 * k
        data = [json.loads(x) for x in open(out / f"iter_{k}" / "data.jsonl")]
        assert len(data) == 2 * k * 8 and all(len(r["responses"]) == 2 for r in data)
        assert all(c0 != c1 for c0, c1 in (r["constitutions"] for r in data))
    # Iteration 2 sampled with iteration 1's model, from the other half of the queries.
    q1 = {r["prompt"] for r in map(json.loads, open(out / "iter_1" / "data.jsonl"))}
    q2 = {r["prompt"] for r in map(json.loads, open(out / "iter_2" / "data.jsonl"))}
    assert not q1 & q2
    assert (out / "report.png").exists() and (out / "report.md").exists()
