"""Value alignment from unstructured text: document -> data -> SFT -> DPO, with baselines.

    align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo
    align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/tiny

Stages (each a folder of <output_dir>):
  data/    D_sft and D_pref: written by a teacher from the document's chunks (SDG), and/or
           given as files (`train_on`); held-out records from test files or a split by prompt
           (`align_jax.methods.value_data`).
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

from align_jax import distributed, interrupts, sharding
from align_jax.atomic import atomic_write, atomic_write_json
from align_jax.data.documents import chunk_document, load_document
from align_jax.eval.oracle_rag import grounding_oracle, sdg_chunks
from align_jax.eval.report import YES_NO_INSTRUCTION, check_judge, evaluate_models
from align_jax.eval.retrieval import make_retriever
from align_jax.jsonl import write_jsonl
from align_jax.methods import value_data
from align_jax.methods.splits import check_split
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer
from align_jax.train.entry import build_tokenizer, train_main
from align_jax.train.optim import OptimizerConfig
from align_jax.train.status import data_identity, read_json

log = logging.getLogger(__name__)


def _write_jsonl(path: str, rows: Sequence[Mapping]) -> str:
    # Multi-process: process 0 writes (a shared run folder), the others wait, then all read.
    if distributed.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, rows)
    distributed.barrier(f"align_jax.write:{path}")
    return path


def _say(msg: str) -> None:
    print(f"[value_alignment] {msg}", flush=True)


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


def _probe_judge(judge: str, *, template, judge_kwargs, mesh, rules) -> None:
    """One request to the judge before anything is generated or trained (its failure after
    hours of training would lose the report); a judge made here is released again."""
    made = check_judge(judge, template=template, judge_kwargs=judge_kwargs,
                       mesh=sharding.make_mesh(mesh or sharding.MeshSpec()), rules=rules,
                       consequence="nothing was trained")
    if isinstance(judge, str) and hasattr(made, "close"):
        made.close()


def _base_changed(stage_dir: str, init: str | None) -> bool:
    """Whether the stage's base model changed since the stage last ran (an earlier stage was
    trained further or again), so that its folder must start over instead of counting as
    completed or resuming; records the current base in <stage_dir>/recipe_base.json.

    The base is recorded by its path relative to the stage and the content of its files, so a
    recipe folder moved or copied whole (mtimes and absolute paths change) still resumes."""
    if init is None:
        return False
    identity = data_identity(init)
    mark = {"init": os.path.relpath(os.path.abspath(init), os.path.abspath(stage_dir)),
            "files": identity["files"] if identity else None}
    path = os.path.join(stage_dir, "recipe_base.json")
    old = read_json(path)
    distributed.barrier(f"align_jax.value_alignment.base:{stage_dir}")  # all read, then write
    if distributed.is_main():
        atomic_write_json(path, mark)
    if old is not None and "mtime_ns" in old:  # written before contents were recorded
        config = os.path.join(init, "config.json")
        stat = os.stat(config) if os.path.isfile(config) else None
        return old != {"init": init, "size": stat and stat.st_size,
                       "mtime_ns": stat and stat.st_mtime_ns}
    return old is not None and old != mark


def value_alignment(*, output_dir: str, document: str, model: str | None = "tiny",
                    init_from: str | None = None, tokenizer: str | None = None,
                    teacher: str | None = None, sdg_kwargs: Mapping[str, Any] | None = None,
                    teacher_kwargs: Mapping[str, Any] | None = None,
                    sft_data: str | None = None, preference_data: str | None = None,
                    train_on: Sequence[str] | None = None, sft_test: str | None = None,
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
                    bertscore_model: str | None = "all-minilm-l6-v2",
                    bertscore_layer: int | None = None, bertscore_baseline: str | None = None,
                    judge: str | None = None,
                    judge_template: str = "relative",
                    judge_kwargs: Mapping[str, Any] | None = None,
                    judge_systems: Sequence[str] | None = None,
                    teacher_forced: bool = True, yes_no_test: str | None = None,
                    yes_no_instruction: str | None = YES_NO_INSTRUCTION,
                    yes_no_max_new_tokens: int = 24, oracle_rag: bool = True,
                    rag_systems: Sequence[str] | None = None) -> dict[str, Any]:
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
        pooled with what SDG writes (when `train_on` has "files").
      train_on: which records train: "sdg" (the teacher's, from the document) and/or "files"
        (sft_data / preference_data); None: every source given. The report lists every
        source (`value_data`).
      sft_test, preference_test: held-out D_sft / D_pref JSONL; when given, every record of
        `train_on` trains, and these are the held-out sets; otherwise `heldout_fraction` of
        the prompts is split off. Either way, training records that repeat a held-out
        question (or nearly) are dropped first.
      heldout_fraction: share of prompts kept out of training when no test file is given.
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
      bertscore_layer: its layer (None: the last; the paper's setting is a roberta-large dir
        at layer 17, `align_jax.eval.bertscore.PAPER_SETTING`).
      bertscore_baseline: a bert-score baseline file to rescale the scores with (None: raw).
      judge: "local:<dir or name>" / "openai:<URL>" (written verdicts) or
        "letters:<dir or name>" (a small local judge read from P("A") vs P("B"), see
        `align_jax.eval.letter_judge`) for pairwise win rates; None skips them. It is asked
        one request before anything is trained (and again before judging).
      judge_template: the judge's prompt template: a name under configs/judge_templates
        ("relative", "pairwise", "prometheus_relative", ...) or a template file.
      judge_kwargs: extra arguments of `align_jax.eval.judge.win_rate_matrix` (rubric,
        principles, max_tokens, temperature, top_p, ...).
      judge_systems: systems the judge compares (default all), e.g. ("base", "sft+dpo").
      teacher_forced: also score the held-out records teacher-forced (answer NLL,
        preference accuracy, DPO's implicit reward); see `evaluate_models`.
      yes_no_test: held-out yes/no questions (JSONL: `question`, `answer` "yes"/"no"): every
        system answers them; accuracy next to the constant answers (`evaluate_models`).
      yes_no_instruction: appended to each yes/no question (None: the question alone).
      yes_no_max_new_tokens: budget of those answers (at most max_new_tokens).
      oracle_rag: the RAG systems also answer the held-out questions whose grounding chunk is
        known with that chunk in the prompt ("+ oracle RAG", `align_jax.eval.oracle_rag`):
        the chunk SDG wrote the record from (its `chunk_id`, among SDG's chunks cut again
        with `sdg_kwargs`' chunk_tokens and overlap), else the RAG chunk holding its
        `evidence` or `rule` text.
      rag_systems: the models that also answer with retrieval (default all), e.g.
        ("base", "sft+dpo") to halve the RAG rows' cost.
    """
    systems = ["base"] * (init_from is not None) + ["c-fine-tuned", "sft", "sft+dpo"]
    unknown = sorted(set(rag_systems or ()) - set(systems))
    if unknown:
        raise ValueError(f"value_alignment.rag_systems: {unknown} are not among the models "
                         f"{systems}")
    if judge is not None and (judge_systems is None or len(set(judge_systems)) > 1):
        _probe_judge(judge, template=judge_template, judge_kwargs=judge_kwargs, mesh=mesh,
                     rules=rules)
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

    # What decides the held-out sets; refused when changed under trained stages, before
    # anything (SDG, data files) is written.
    check_split(out, {"heldout_fraction": heldout_fraction
                      if sft_test is None or preference_test is None else None,
                      "sft_test": sft_test, "preference_test": preference_test,
                      "yes_no_test": yes_no_test},
                recipe="value_alignment", stages=("sft", "dpo"))
    # Read (and checked) before any training: a bad record stops the run at once.
    yes_no = value_data.records(yes_no_test, "yes_no") if yes_no_test else None
    doc = load_document(document)
    chunks = chunk_document(doc, tok, chunk_tokens=chunk_tokens, overlap=chunk_tokens // 8)
    chunk_file = _write_jsonl(os.path.join(out, "data", "chunks.jsonl"),
                              [{"text": c.text, "chunk_id": c.id} for c in chunks])
    _say(f"{document}: {len(doc.text.split())} words -> {len(chunks)} chunks of <= "
         f"{chunk_tokens} tokens")

    with interrupts.phase("data"):  # SDG with a teacher
        data = value_data.gather(
            out, document=document, teacher=teacher, tokenizer=tok,
            sdg_kwargs=sdg_kwargs or {}, teacher_kwargs=teacher_kwargs, sft_data=sft_data,
            preference_data=preference_data, train_on=train_on, sft_test=sft_test,
            preference_test=preference_test, heldout_fraction=heldout_fraction,
            heldout_questions=[q["question"] for q in yes_no or ()])
    sft_train, sft_test_rows = data.sft_train, data.sft_test
    pref_train, pref_test = data.pref_train, data.pref_test
    files = {name: _write_jsonl(os.path.join(out, "data", f"{name}.jsonl"), rows)
             for name, rows in (("sft_train", sft_train), ("sft_test", sft_test_rows),
                                ("preference_train", pref_train), ("preference_test", pref_test))}
    _say(f"data from {data.origin}: D_sft {len(sft_train)} train / {len(sft_test_rows)} held "
         f"out, D_pref {len(pref_train)} train / {len(pref_test)} held out"
         + (f"; {data.leaks_dropped} training records dropped: a held-out question repeats "
            f"them" if data.leaks_dropped else ""))

    def stage(name, objective, data, steps, *, init, lr, **kw):
        _say(f"stage {name}: {objective} on {os.path.basename(data)} for {steps} steps"
             f" from {init or model + ' (random init)'}")
        restart = _base_changed(os.path.join(out, name), init)
        if restart:
            _say(f"stage {name}: its base {init} changed since the stage ran: training it again")
        with interrupts.phase(f"train_{name}"):
            train_main(output_dir=os.path.join(out, name), data=data, objective=objective,
                       overwrite=restart,
                       model=None if init else model, init_from=init,
                       tokenizer=None if init else tok_path, seq_len=seq_len,
                       batch_size=batch_size, num_steps=steps, mesh=mesh, rules=rules,
                       seed=seed,
                       optimizer=OptimizerConfig(learning_rate=lr,
                                                 warmup_steps=max(1, steps // 10),
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

    oracle = None
    if oracle_rag:  # SDG's own chunks too: its records name them by chunk_id
        with_sdg = teacher is not None and "sdg" in (train_on or ("sdg",))  # None: all given
        oracle = grounding_oracle(chunks, sdg_chunks([document], tokenizer=tok,
                                                     sdg_kwargs=sdg_kwargs)
                                  if with_sdg else [])
    models = {"base": base, "c-fine-tuned": cft, "sft": sft, "sft+dpo": dpo}
    if init_from is None:
        models.pop("base")  # the same model as c-fine-tuned
    with interrupts.phase("evaluation"):
        report = evaluate_models(
            out, models=models, tokenizer=tok, sft_test=sft_test_rows, pref_test=pref_test,
            retriever=make_retriever([c.text for c in chunks], kind=retrieval),
            rag_models=tuple(m for m in models if rag_systems is None or m in rag_systems),
            reference=("sft+dpo", "sft"), seq_len=seq_len,
            num_samples=num_samples, max_new_tokens=max_new_tokens,
            stages={"cft": "c-fine-tuned", "sft": "sft", "dpo": "sft+dpo"},
            num_questions=num_questions, bertscore_model=bertscore_model,
            bertscore_layer=bertscore_layer, bertscore_baseline=bertscore_baseline, judge=judge,
            judge_template=judge_template, judge_kwargs=judge_kwargs, judge_systems=judge_systems,
            mesh=sharding.make_mesh(mesh or sharding.MeshSpec()), rules=rules,
            teacher_forced=teacher_forced,
            yes_no_test=yes_no, yes_no_instruction=yes_no_instruction,
            yes_no_max_new_tokens=yes_no_max_new_tokens, oracle=oracle)
    report["data_origin"] = data.origin
    report["provenance"] = data.provenance
    report["leaks_dropped"] = data.leaks_dropped
    extra = [f"Data: {data.origin}.", ""] + value_data.provenance_lines(data)
    if data.sdg_summary is not None:
        report["sdg"] = {k: data.sdg_summary[k] for k in
                         ("kinds", "rejects", "teacher_calls", "parse_failures")
                         if k in data.sdg_summary}
    if "base" in report["samples"] and "sft+dpo" in report["samples"]:
        extra += ["", side_by_side(sft_test_rows[:num_samples], report["samples"]["base"],
                                   report["samples"]["sft+dpo"])]
    interrupts.check()  # evaluate_models wrote report.md: not the final one yet
    if distributed.is_main():
        md_path = os.path.join(out, "report.md")
        with open(md_path, encoding="utf-8") as f:
            md = f.read()
        atomic_write(md_path, md + "\n" + "\n".join(extra) + "\n")
        atomic_write_json(os.path.join(out, "report.json"), report)
        _say(f"report: {os.path.join(out, 'report.md')} and report.png")
        print(open(os.path.join(out, "report.md")).read())
    return report
