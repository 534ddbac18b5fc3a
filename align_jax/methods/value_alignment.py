"""Value alignment from unstructured text: document -> data -> SFT -> DPO, with baselines.

    align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo
    align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/tiny

Stages (each a folder of <output_dir>):
  data/    D_sft and D_pref: written by a teacher from the document's chunks (SDG), or given
           as files; split by prompt into train and held-out test records.
  cft/     the "c-fine-tuned" baseline: causal-LM training on the document's chunks. When the
           run starts from scratch (no `init_from`) this is also the base model of SFT.
  sft/     SFT on D_sft.
  dpo/     DPO on D_pref with the SFT model as reference (reference log-probs precomputed).
  report.md, report.csv, report.json, report.png, metrics.png (winrate.png with a judge):
           every system (base, c-fine-tuned, SFT, SFT+DPO, each without and with one
           retrieved chunk, the RAG baseline) answers the held-out questions; BLEU, ROUGE,
           BERTScore against the reference answers, held-out answer likelihood, preference
           accuracy, judged pairwise win rates, side-by-side answers, loss curves.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax import distributed, sharding
from align_jax.atomic import atomic_write, atomic_write_json
from align_jax.data.documents import chunk_document, load_document
from align_jax.data.sources import load_records
from align_jax.eval.report import YES_NO_INSTRUCTION, evaluate_models
from align_jax.eval.retrieval import make_retriever
from align_jax.jsonl import write_jsonl
from align_jax.models.named import resolve_model_path
from align_jax.sdg.backends import make_teacher
from align_jax.sdg.pipeline import run_document_sdg
from align_jax.sdg.store import split_of
from align_jax.tokenizer import load_tokenizer
from align_jax.train.entry import build_tokenizer, train_main
from align_jax.train.optim import OptimizerConfig
from align_jax.train.status import read_json

log = logging.getLogger(__name__)


def _records(path: str, schema: str) -> list[dict]:
    return [r.data for r in load_records(path, schema=schema)[0]]


def _write_jsonl(path: str, rows: Sequence[Mapping]) -> str:
    # Multi-process: process 0 writes (a shared run folder), the others wait, then all read.
    if distributed.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, rows)
    distributed.barrier(f"align_jax.write:{path}")
    return path


def _split(rows: list[dict], heldout: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split by prompt: the same prompt is never on both sides."""
    train, test = [], []
    for r in rows:
        side = split_of(r["prompt"], (1 - heldout, heldout, 0.0))
        (train if side == "train" else test).append(r)
    return train, test


def _say(msg: str) -> None:
    print(f"[value_alignment] {msg}", flush=True)


def _document_data(out: str, *, document: str, teacher: str | None, tokenizer,
                   sdg_kwargs: Mapping[str, Any], sft_data, preference_data,
                   teacher_kwargs: Mapping[str, Any] | None = None):
    """(sft records, preference records, where they came from, SDG summary or None).

    With a teacher and data files, the SDG records and the files' records are pooled.
    """
    if teacher is not None:
        sdg_dir = os.path.join(out, "sdg")
        summary = run_document_sdg([document], sdg_dir,
                                   teacher=make_teacher(teacher, **dict(teacher_kwargs or {})),
                                   tokenizer=tokenizer, **dict(sdg_kwargs))
        # The recipe makes its own held-out split by prompt, so it pools SDG's splits.
        sft = [r for split in ("train", "validation", "test")
               for r in _maybe(os.path.join(sdg_dir, "sft", f"{split}.jsonl"), "sft")]
        pref = [r for split in ("train", "validation", "test")
                for r in _maybe(os.path.join(sdg_dir, "preference", f"{split}.jsonl"),
                                "preference")]
        origin = f"SDG with teacher {teacher} ({sdg_dir}: {len(sft)} SFT, {len(pref)} preference)"
        if sft_data is not None:
            given = _records(sft_data, "sft")
            sft += given
            origin += f" + {len(given)} SFT from {sft_data}"
        if preference_data is not None:
            given = _records(preference_data, "preference")
            pref += given
            origin += f" + {len(given)} preference from {preference_data}"
        if not sft or not pref:
            raise ValueError(f"SDG with teacher {teacher} wrote {len(sft)} SFT and {len(pref)} "
                             f"preference records: too few to train on (reasons in "
                             f"{os.path.join(sdg_dir, 'rejects.jsonl')}); add sft_data / "
                             f"preference_data files to pool with them")
        return sft, pref, origin, summary
    if sft_data is None or preference_data is None:
        raise ValueError("value_alignment: give a `teacher` for SDG, or both `sft_data` and "
                         "`preference_data` files")
    return (_records(sft_data, "sft"), _records(preference_data, "preference"),
            f"given files {sft_data} and {preference_data} (no teacher)", None)


def sdg_counts(summary: Mapping[str, Any]) -> str:
    """One markdown paragraph: records the teacher wrote and kept, and rejects by reason."""
    kinds = summary.get("kinds", {})
    wrote = ", ".join(f"{k} {v.get('raw', 0)} written / {v.get('kept', v.get('raw', 0))} kept"
                      for k, v in kinds.items()) or "nothing"
    rejects = [f"{stage}: " + ", ".join(f"{reason} {n}" for reason, n in sorted(d.items()))
               for stage, d in sorted(summary.get("rejects", {}).items())]
    return (f"SDG over {summary.get('num_chunks', '?')} chunk(s): {wrote}. Rejected: "
            + ("; ".join(rejects) if rejects else "none") + ".")


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def side_by_side(records: Sequence[Mapping], base: Sequence[str],
                 aligned: Sequence[str]) -> str:
    """A markdown table: held-out question, reference answer, base and aligned answers."""
    lines = ["## Base vs aligned (greedy answers to held-out questions)", "",
             "| question | reference (document) | base | SFT+DPO |", "|---|---|---|---|"]
    for r, b, a in zip(records, base, aligned):
        lines.append(f"| {_cell(r['prompt'])} | {_cell(r.get('completion', ''))} | "
                     f"{_cell(b)} | {_cell(a)} |")
    return "\n".join(lines)


def _base_changed(stage_dir: str, init: str | None) -> bool:
    """Whether the stage's base model changed since the stage last ran (an earlier stage was
    trained further or again), so that its folder must start over instead of counting as
    completed or resuming; records the current base in <stage_dir>/recipe_base.json."""
    if init is None:
        return False
    # Every export is a new folder (renamed into place whole), so its config.json's identity
    # changes with the weights.
    config = os.path.join(init, "config.json")
    stat = os.stat(config) if os.path.isfile(config) else None
    mark = {"init": init, "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}
    path = os.path.join(stage_dir, "recipe_base.json")
    old = read_json(path)
    distributed.barrier(f"align_jax.value_alignment.base:{stage_dir}")  # all read, then write
    if distributed.is_main():
        atomic_write_json(path, mark)
    return old is not None and old != mark


def _maybe(path: str, schema: str) -> list[dict]:
    # An empty split file is normal for a small SDG run.
    return _records(path, schema) if os.path.exists(path) and os.path.getsize(path) else []


def value_alignment(*, output_dir: str, document: str, model: str | None = "tiny",
                    init_from: str | None = None, tokenizer: str | None = None,
                    teacher: str | None = None, sdg_kwargs: Mapping[str, Any] | None = None,
                    teacher_kwargs: Mapping[str, Any] | None = None,
                    sft_data: str | None = None, preference_data: str | None = None,
                    preference_test: str | None = None, heldout_fraction: float = 0.2,
                    chunk_tokens: int = 128,
                    seq_len: int = 256, batch_size: int = 8, cft_steps: int = 60,
                    sft_steps: int = 60, dpo_steps: int = 30, learning_rate: float = 3e-3,
                    dpo_learning_rate: float = 1e-3, beta: float = 0.1,
                    rpo_alpha: float = 0.0,
                    mesh: sharding.MeshSpec | None = None, rules: str = "dp",
                    num_samples: int = 3, max_new_tokens: int = 40, seed: int = 0,
                    progress: bool = True, retrieval: str = "semantic",
                    num_questions: int | None = None,
                    bertscore_model: str | None = "all-minilm-l6-v2", judge: str | None = None,
                    judge_template: str = "relative",
                    judge_kwargs: Mapping[str, Any] | None = None,
                    judge_systems: Sequence[str] | None = None,
                    teacher_forced: bool = True, yes_no_test: str | None = None,
                    yes_no_instruction: str | None = YES_NO_INSTRUCTION,
                    yes_no_max_new_tokens: int = 24) -> dict[str, Any]:
    """Runs the whole method and its baselines; returns the report dict.

    Args:
      output_dir: run folder.
      document: the values document (.txt/.md/.html/.pdf).
      model: a preset to train from scratch (with init_from None).
      init_from: a Hugging Face base checkpoint dir (then `model` is ignored).
      tokenizer: tokenizer dir; default init_from's, or one trained on the document.
      teacher: "local:<HF dir>" or "openai:<base URL>" to generate the data (SDG).
      sdg_kwargs: extra arguments of `align_jax.sdg.pipeline.run_document_sdg`.
      teacher_kwargs: extra arguments of the teacher (`make_teacher`), e.g. max_len,
        batch_size, shape_budget for a `local:` one.
      sft_data, preference_data: ready-made D_sft / D_pref JSONL; with a teacher they are
        pooled with what SDG writes.
      preference_test: a held-out D_pref JSONL; when given, every preference record above
        trains (those whose prompt is also in this file are dropped) and these pairs are the
        held-out preference set.
      heldout_fraction: share of prompts kept out of training for evaluation.
      chunk_tokens: chunk size for the c-fine-tune baseline and RAG retrieval.
      seq_len, batch_size: training shapes.
      cft_steps, sft_steps, dpo_steps: updates per stage.
      learning_rate, dpo_learning_rate: peak rates (AdamW, cosine, 10% warmup).
      beta: DPO's beta.
      rpo_alpha: weight of the chosen answers' NLL added to the DPO loss (RPO); 0 is plain
        DPO. A small model trained on a few dozen pairs keeps fluent answers with it.
      mesh, rules: device mesh and sharding preset for every stage.
      num_samples, max_new_tokens: answers shown side by side; answer budget (greedy).
      seed: seed of every stage.
      progress: progress bars.
      retrieval: RAG retriever over the chunks: "semantic" (all-MiniLM-L6-v2; BM25 when it
        is not installed), "bm25" or "tfidf".
      num_questions: held-out questions every system answers (default all).
      bertscore_model: encoder for BERTScore; None skips it.
      judge: "local:<dir or name>" / "openai:<URL>" (written verdicts) or
        "letters:<dir or name>" (a small local judge read from P("A") vs P("B"), see
        `align_jax.eval.letter_judge`) for pairwise win rates; None skips them.
      judge_template, judge_kwargs: see `align_jax.eval.judge.win_rate_matrix`.
      judge_systems: systems the judge compares (default all), e.g. ("base", "sft+dpo").
      teacher_forced: also score the held-out records teacher-forced (answer NLL,
        preference accuracy, DPO's implicit reward); see `evaluate_models`.
      yes_no_test: held-out yes/no questions (JSONL: `question`, `answer` "yes"/"no"): every
        system answers them; accuracy next to the constant answers (`evaluate_models`).
      yes_no_instruction: appended to each yes/no question (None: the question alone).
      yes_no_max_new_tokens: budget of those answers (at most max_new_tokens).
    """
    out = os.path.abspath(output_dir)
    os.makedirs(out, exist_ok=True)
    if init_from is not None:  # a named default ('smollm2-135m-instruct') or a .gguf file
        init_from = resolve_model_path(init_from)
    if init_from is None and tokenizer is None:
        tokenizer = os.path.join(out, "tokenizer")
        built = os.path.exists(os.path.join(tokenizer, "tokenizer.json"))
        if distributed.is_main():
            build_tokenizer(document, tokenizer)
        distributed.barrier("align_jax.value_alignment.tokenizer")
        _say(f"{'reused the' if built else 'trained a'} sentencepiece tokenizer on {document}"
             f" -> {tokenizer}")
    tok_path = tokenizer or init_from
    tok = load_tokenizer(tok_path)

    # Read (and checked) before any training: a bad record stops the run at once.
    yes_no = _records(yes_no_test, "yes_no") if yes_no_test else None
    doc = load_document(document)
    chunks = chunk_document(doc, tok, chunk_tokens=chunk_tokens, overlap=chunk_tokens // 8)
    chunk_file = _write_jsonl(os.path.join(out, "data", "chunks.jsonl"),
                              [{"text": c.text, "chunk_id": c.id} for c in chunks])
    _say(f"{document}: {len(doc.text.split())} words -> {len(chunks)} chunks of <= "
         f"{chunk_tokens} tokens")

    sft_rows, pref_rows, origin, sdg_summary = _document_data(
        out, document=document, teacher=teacher, tokenizer=tok, sdg_kwargs=sdg_kwargs or {},
        sft_data=sft_data, preference_data=preference_data, teacher_kwargs=teacher_kwargs)
    sft_train, sft_test = _split(sft_rows, heldout_fraction)
    if preference_test is None:
        pref_train, pref_test = _split(pref_rows, heldout_fraction)
    else:
        pref_test = _records(preference_test, "preference")
        test_prompts = {r["prompt"] for r in pref_test}
        pref_train = [r for r in pref_rows if r["prompt"] not in test_prompts]
        if len(pref_train) < len(pref_rows):
            _say(f"dropped {len(pref_rows) - len(pref_train)} training preference records whose "
                 f"prompt is in {preference_test}")
    files = {name: _write_jsonl(os.path.join(out, "data", f"{name}.jsonl"), rows)
             for name, rows in (("sft_train", sft_train), ("sft_test", sft_test),
                                ("preference_train", pref_train), ("preference_test", pref_test))}
    _say(f"data from {origin}: D_sft {len(sft_train)} train / {len(sft_test)} held out, "
         f"D_pref {len(pref_train)} train / {len(pref_test)} held out")

    def stage(name, objective, data, steps, *, init, lr, **kw):
        _say(f"stage {name}: {objective} on {os.path.basename(data)} for {steps} steps"
             f" from {init or model + ' (random init)'}")
        restart = _base_changed(os.path.join(out, name), init)
        if restart:
            _say(f"stage {name}: its base {init} changed since the stage ran: training it again")
        train_main(output_dir=os.path.join(out, name), data=data, objective=objective,
                   overwrite=restart,
                   model=None if init else model, init_from=init,
                   tokenizer=None if init else tok_path, seq_len=seq_len,
                   batch_size=batch_size, num_steps=steps, mesh=mesh, rules=rules, seed=seed,
                   optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=max(1, steps // 10),
                                             schedule="cosine"),
                   save_every=max(steps, 1), progress=progress,
                   log_every=max(1, min(10, steps // 10)), **kw)
        return os.path.join(out, name, "hf")

    cft = stage("cft", "lm", chunk_file, cft_steps, init=init_from, lr=learning_rate)
    # From scratch, the document-pretrained model is the only sensible base for SFT.
    base = init_from or cft
    sft = stage("sft", "sft", files["sft_train"], sft_steps, init=base, lr=learning_rate)
    dpo_kwargs = {"beta": beta, **({"rpo_alpha": rpo_alpha} if rpo_alpha else {})}
    dpo = stage("dpo", "dpo", files["preference_train"], dpo_steps, init=sft,
                lr=dpo_learning_rate, loss_kwargs=dpo_kwargs, reference="precomputed")

    models = {"base": base, "c-fine-tuned": cft, "sft": sft, "sft+dpo": dpo}
    if init_from is None:
        models.pop("base")  # the same model as c-fine-tuned
    report = evaluate_models(
        out, models=models, tokenizer=tok, sft_test=sft_test, pref_test=pref_test,
        retriever=make_retriever([c.text for c in chunks], kind=retrieval),
        rag_models=tuple(models), reference=("sft+dpo", "sft"), seq_len=seq_len,
        num_samples=num_samples, max_new_tokens=max_new_tokens,
        stages={"cft": "c-fine-tuned", "sft": "sft", "dpo": "sft+dpo"},
        num_questions=num_questions, bertscore_model=bertscore_model, judge=judge,
        judge_template=judge_template, judge_kwargs=judge_kwargs, judge_systems=judge_systems,
        mesh=sharding.make_mesh(mesh or sharding.MeshSpec()), rules=rules,
        teacher_forced=teacher_forced,
        yes_no_test=yes_no, yes_no_instruction=yes_no_instruction,
        yes_no_max_new_tokens=yes_no_max_new_tokens)
    report["data_origin"] = origin
    extra = [f"Data: {origin}."]
    if sdg_summary is not None:
        report["sdg"] = {"kinds": sdg_summary.get("kinds", {}),
                         "rejects": sdg_summary.get("rejects", {})}
        extra += ["", sdg_counts(sdg_summary)]
    if "base" in report["samples"] and "sft+dpo" in report["samples"]:
        extra += ["", side_by_side(sft_test[:num_samples], report["samples"]["base"],
                                   report["samples"]["sft+dpo"])]
    if distributed.is_main():
        md_path = os.path.join(out, "report.md")
        with open(md_path, encoding="utf-8") as f:
            md = f.read()
        atomic_write(md_path, md + "\n" + "\n".join(extra) + "\n")
        atomic_write_json(os.path.join(out, "report.json"), report)
        _say(f"report: {os.path.join(out, 'report.md')} and report.png")
        print(open(os.path.join(out, "report.md")).read())
    return report
