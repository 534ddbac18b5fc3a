"""SDG against a real HTTP teacher that fails: transient faults are retried, a request that
fails for good costs only its unit, and reruns reach the store a healthy teacher writes."""

import json
import os

import pytest
import run_scripted_sdg
from scripted_teacher import ScriptedServer, WordTokenizer

from align_jax.data import documents
from align_jax.sdg import pipeline
from align_jax.sdg.backends import OpenAITeacher, TeacherError

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "values_document.md")


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "small.md"
    path.write_text(documents.load_document(EXAMPLE).text[:3000], encoding="utf-8")
    return str(path)


@pytest.fixture
def servers():
    made = []

    def make(**kw):
        made.append(ScriptedServer(**kw))
        return made[-1]
    yield make
    for srv in made:
        srv.stop()


def _run(doc, out, srv, **teacher_kw):
    kw = {"concurrency": 4, "max_retries": 20, "backoff": 0.01, "max_backoff": 0.05,
          **teacher_kw}
    with OpenAITeacher(srv.url, **kw) as teacher:
        return pipeline.run_document_sdg([doc], out, teacher=teacher, tokenizer=WordTokenizer(),
                                         seed=0, progress=False, verbose=False,
                                         **run_scripted_sdg.SETTINGS)


def _final(out_dir):
    """The finished store: every file (summary without out_dir, settings without the
    teacher's URL), raw/'s records as sorted lines (a rerun commits the units that failed
    later, so later in raw/)."""
    snap = {}
    for dirpath, _, files in os.walk(out_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), out_dir)
            with open(os.path.join(out_dir, rel), encoding="utf-8") as f:
                text = f.read()
            if rel == "summary.json":
                summary = json.loads(text)
                summary.pop("out_dir")
                text = json.dumps(summary, sort_keys=True)
            elif rel == os.path.join("raw", "settings.json"):
                settings = json.loads(text)
                assert settings.pop("teacher")["model"] == "scripted"  # the URL has its port
                text = json.dumps(settings, sort_keys=True)
            elif rel.startswith("raw") and rel.endswith(".jsonl"):
                text = sorted(text.splitlines())
            snap[rel] = text
    return snap


@pytest.fixture
def reference(tmp_path, doc, servers):
    out = tmp_path / "reference"
    summary = _run(doc, out, servers())
    assert summary["kinds"]["sft"]["kept"] > 0 and summary["units_failed"] == 0
    return _final(out)


@pytest.mark.parametrize("fault", [dict(fail_every=2, fail_status=503, retry_after="0.01"),
                                   dict(fail_every=17, fail_status=500)])
def test_transient_faults_are_retried_into_the_reference_store(tmp_path, doc, servers,
                                                               reference, fault):
    srv = servers(**fault)
    out = tmp_path / "flaky"
    _run(doc, out, srv)
    assert srv.failures == srv.requests // srv.fail_every > 0
    assert _final(out) == reference


def test_a_request_that_keeps_failing_costs_only_its_unit(tmp_path, doc, servers, reference):
    flaky, out = servers(fail_prompts=17), tmp_path / "run"
    with pytest.raises(TeacherError) as e:
        _run(doc, out, flaky, max_retries=1)
    msg = str(e.value)
    assert "\n" not in msg and "units failed" in msg and "HTTP 500" in msg, msg
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units_failed"] > 0
    with open(out / "raw" / "manifest.jsonl") as f:
        done = [json.loads(line)["unit"] for line in f]
    # Most units finished, and they are kept: committed exactly as the healthy run wrote them.
    assert len(done) > summary["units_failed"] + summary["units_held_back"]
    assert done and set(_final(out)["raw/sft.jsonl"]) <= set(reference["raw/sft.jsonl"])
    # A rerun against the same teacher keeps what was finished and fails the same units.
    with pytest.raises(TeacherError, match="units failed"):
        _run(doc, out, flaky, max_retries=1)
    again = json.loads((out / "summary.json").read_text())
    assert (again["units_failed"], again["units_finished"]) == (
        summary["units_failed"], summary["units_finished"])
    # Once the teacher is healthy again, a rerun completes the store a healthy run wrote.
    flaky.fail_prompts = 0
    _run(doc, out, flaky)
    assert _final(out) == reference


def _cli(out, doc, url, *extra):
    import gin

    from align_jax import cli
    gin.clear_config()
    root = os.path.dirname(os.path.dirname(HERE))
    return cli.main(["sdg", f"--gin_file={os.path.join(root, 'configs/runs/sdg_document.gin')}",
                     f"--output_dir={out}", f"--gin_param=entry.sdg_main.documents=['{doc}']",
                     f"--gin_param=entry.sdg_main.teacher='openai:{url}'",
                     "--gin_param=entry.sdg_main.nex=3",
                     "--gin_param=entry.sdg_main.progress=False",
                     "--gin_param=entry.sdg_main.chunk_tokens=200",
                     "--gin_param=entry.sdg_main.overlap=10",
                     "--gin_param=entry.sdg_main.teacher_kwargs={'backoff': 0.01}", *extra])


def test_a_resumed_run_refuses_another_teacher(tmp_path, doc, servers, capsys):
    first, out = servers(), tmp_path / "run"
    assert _cli(out, doc, first.url) == 0
    settings = json.loads((out / "raw" / "settings.json").read_text())
    assert settings["teacher"] == {"backend": "openai", "base_url": first.url,
                                   "model": "scripted"}
    capsys.readouterr()
    for other, changed in ((servers(), "['teacher.base_url']"),
                           (servers(model="other-model"), "['teacher.base_url', 'teacher.model']")):
        assert _cli(out, doc, other.url) != 0
        err = capsys.readouterr().err.splitlines()[0]  # the CLI's one-line error
        assert changed in err and first.url in err and other.url in err, err
        assert "--overwrite" in err
    # Asked to start over, the other teacher's run replaces the first one's records.
    before = other.requests
    assert _cli(out, doc, other.url, "--overwrite") == 0
    assert other.requests > before
    assert json.loads((out / "raw" / "settings.json").read_text())["teacher"]["model"] == \
        "other-model"


def test_a_teacher_of_junk_is_an_error_with_the_reject_counts(tmp_path, doc, servers, capsys):
    srv, out = servers(junk="I'm sorry, but I cannot help with that."), tmp_path / "run"
    assert _cli(out, doc, srv.url) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "0 sft/preference records" in err[0], err
    summary = json.loads((out / "summary.json").read_text())
    n = summary["num_chunks"]
    # The counts in the line are the summary's: every chunk's questions and verdict rejected.
    assert summary["rejects"] == {"instruct": {"no_items": n}, "preference": {"no_verdict": n}}
    assert f"'instruct': {n}, 'preference': {n}" in err[0]


def test_an_empty_documents_folder_is_an_error(tmp_path, servers, capsys):
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "notes.csv").write_text("a,b\n")  # not a document type
    assert _cli(tmp_path / "run", str(empty), servers().url) != 0
    err = capsys.readouterr().err.splitlines()[0]
    assert f"documents {empty}: no document files found" in err, err
    (empty / "blank.md").write_text("\n \n")
    assert _cli(tmp_path / "run", str(empty), servers().url) != 0
    assert "blank.md: document has no text" in capsys.readouterr().err.splitlines()[0]


def test_a_recipe_whose_teacher_writes_junk_stops_in_one_line(tmp_path, servers, capsys,
                                                               monkeypatch):
    """`align-jax run` of the value-alignment recipe: SDG runs first and keeps nothing, so
    the run stops there with the SDG line (it printed a traceback), before any training."""
    import gin

    from align_jax import cli
    monkeypatch.chdir(os.path.dirname(os.path.dirname(HERE)))
    srv, out = servers(junk="No idea."), tmp_path / "run"
    gin.clear_config()
    try:
        code = cli.main(["run", "--gin_file=configs/runs/value_alignment_tiny.gin",
                         f"--output_dir={out}"] + [
            f"--gin_param=value_alignment.value_alignment.{p}" for p in (
                f"teacher='openai:{srv.url}'", "train_on=('sdg',)", "progress=False",
                "teacher_kwargs={'backoff': 0.01}",
                "sdg_kwargs={'max_chunks': 4, 'progress': False, 'verbose': False}")])
    finally:
        gin.clear_config()
    assert code == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert "NoRecordsError" in err and "gave 0 sft/preference records" in err, err
    assert not (out / "cft").exists()
