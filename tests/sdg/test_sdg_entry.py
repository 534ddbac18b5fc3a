"""`align-jax sdg` end to end: the real CLI, the `openai:` backend, our own server."""

import json
import os
import pathlib

import gin
import jax
import pytest

from align_jax import cli
from align_jax.generate import server
from align_jax.models.config import get_config
from align_jax.models.hf import save_hf
from align_jax.models.transformer import init_params
from align_jax.tokenizer_training import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_gin(monkeypatch):
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with a tokenizer: a teacher that writes garbage."""
    path = tmp_path_factory.mktemp("teacher")
    lines = [x for x in (ROOT / "examples" / "values_document.md").read_text().splitlines() if x]
    tok = train_tokenizer(lines, path, vocab_size=400)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=4096,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def served(checkpoint):
    """`align-jax serve`'s app on a free port."""
    srv = server.ServerThread(server.app_from_checkpoint(checkpoint, model_name="tiny"))
    yield srv.url
    srv.stop()


@pytest.mark.parametrize("backend", ["openai", "local"])
def test_sdg_cli_counts_garbage_and_resumes(request, checkpoint, backend, tmp_path):
    teacher = (f"openai:{request.getfixturevalue('served')}/v1" if backend == "openai"
               else f"local:{checkpoint}")
    # A short document: three chunks are enough to drive every stage through the server.
    doc = tmp_path / "code.md"
    paragraphs = (ROOT / "examples" / "values_document.md").read_text().split("\n\n")
    doc.write_text("\n\n".join(p for p in paragraphs if len(p) > 200)[:2500])
    tmp_path = tmp_path / "out"
    args = ["sdg", "--gin_file=configs/runs/sdg_document.gin", f"--output_dir={tmp_path}",
            f"--gin_param=entry.sdg_main.documents=['{doc}']",
            f"--gin_param=entry.sdg_main.teacher='{teacher}'",
            "--gin_param=entry.sdg_main.nex=2", "--gin_param=entry.sdg_main.chunk_tokens=256",
            "--gin_param=entry.sdg_main.overlap=16", "--gin_param=entry.sdg_main.progress=False",
            "--gin_param=entry.sdg_main.teacher_kwargs={'timeout': 300.0}"]
    # A random model's answers may give no record to train on: then an error (its line is
    # tested in test_flaky_teacher), not a success; the summary and rejects are written.
    code = cli.main(args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    kept = sum(summary["kinds"].get(k, {}).get("kept", 0) for k in ("sft", "preference"))
    assert code == (0 if kept else 1)
    # A random model writes garbage; under the templates' constraints it is at least garbage
    # of the right shape (a verdict, a JSON line it never closes), and every output is
    # counted: a record, or a reject with its reason.
    rejects, kinds, n = summary["rejects"], summary["kinds"], summary["num_chunks"]
    assert n > 0 and summary["teacher_calls"] >= 2 * n, summary
    assert kinds["values_filter"]["raw"] == n  # every chunk got a verdict record
    assert sum(rejects["instruct"].values()) + kinds.get("sft", {}).get("raw", 0) >= n
    assert summary["parse_failures"] >= sum(rejects["instruct"].get(r, 0)
                                            for r in ("invalid_json", "no_items"))
    assert os.path.exists(tmp_path / "run_info.json")
    # Started again on the finished folder: nothing is redone, the same summary results.
    gin.clear_config()
    assert cli.main(args) == code
    again = json.loads((tmp_path / "summary.json").read_text())
    assert (again["kinds"], again["rejects"]) == (summary["kinds"], summary["rejects"])


def test_sdg_cli_without_a_teacher_says_so_in_one_line(tmp_path, capsys):
    args = ["sdg", "--gin_file=configs/runs/sdg_document.gin", f"--output_dir={tmp_path}",
            "--gin_param=entry.sdg_main.teacher='openai:http://127.0.0.1:9/v1'",
            "--gin_param=entry.sdg_main.teacher_kwargs={'max_retries': 1, 'backoff': 0.05}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "127.0.0.1:9" in err


def test_aligner_and_principles_tasks_with_the_local_teacher(checkpoint, tmp_path, capsys):
    common = [f"--gin_param=entry.sdg_main.teacher='local:{checkpoint}'",
              "--gin_param=entry.sdg_main.progress=False"]
    out = tmp_path / "aligner"
    code = cli.main(["sdg", "--gin_file=configs/runs/sdg_aligner.gin", f"--output_dir={out}",
                     "--gin_param=entry.sdg_main.max_questions=4", *common])
    summary = json.loads((out / "summary.json").read_text())
    # No aligner or inspector record from a random model is an error, counted all the same.
    kept = sum(summary["kinds"].get(k, {}).get("kept", 0) for k in ("aligner", "inspector"))
    assert code == (0 if kept else 1)
    assert sum(summary["rejects"]["inputs"].values()) > 0, summary
    # A principle writer that writes nothing usable: a clear one-line error, no constitutions.
    gin.clear_config()
    out = tmp_path / "principles"
    assert cli.main(["sdg", "--gin_file=configs/runs/sdg_principles.gin",
                     f"--output_dir={out}", *common]) == 1
    err = capsys.readouterr().err
    assert "0 usable principles" in err and len(err.splitlines()[0]) < 400
    assert not (out / "constitutions.jsonl").exists()
    # User-written principles need no teacher.
    gin.clear_config()
    assert cli.main(["sdg", "--gin_file=configs/runs/sdg_principles.gin",
                     f"--output_dir={out}", "--gin_param=entry.sdg_main.teacher=None",
                     "--gin_param=entry.sdg_main.principles_file='examples/principles.jsonl'"]) == 0
    assert len((out / "constitutions.jsonl").read_text().splitlines()) == 8
