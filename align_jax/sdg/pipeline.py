"""SDG entry points: documents -> D_sft / D_pref, red-teaming -> aligner data, principles ->
constitutions. These are the functions `align-jax sdg` and gin call.

Resumability: work is cut into units (chunk x stage, or question x criterion) grouped into
fixed batches in a fixed order (`concurrency` units a batch). Each batch's teacher calls
use a seed derived from the global seed and the batch's unit ids, so re-running a batch
after a crash sends the very same prompts with the very same seed and gets the same
completions; only units missing from the manifest are then committed. Settings that change
what is generated (the teacher's backend, URL and model id among them) are stored on the first
run and must match on resume.

Failures: the teacher retries transient errors itself (`OpenAITeacher`: 408/429/5xx, timeouts,
connection errors, with backoff and Retry-After, `max_retries` a request). A prompt that still
fails fails its unit only: the other units are committed, and so is every unit of its batch
before it (a unit after it may have sent its next prompts at other positions, hence other
seeds, than an undisturbed run, so it is held back too). The run goes on, writes the summary
(`units_failed`, `units_held_back`, `first_failure`) and then stops with `IncompleteRunError`;
a rerun redoes just those batches and ends with the records of an undisturbed run. A run that
keeps no record at all stops with `NoRecordsError` and the reject counts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence

import tqdm

from align_jax import interrupts
from align_jax.data import documents as documents_lib
from align_jax.jsonl import write_jsonl
from align_jax.sdg import aligner_data, instruct, preference, yes_no
from align_jax.sdg import principles as principles_lib
from align_jax.sdg.store import RunStore, UnitResult, derive_seed, finalize
from align_jax.sdg.teacher import Teacher, TeacherError
from align_jax.sdg.templates import Template, resolve_templates

STAGES = ("instruct", "preference", "yes_no")
# The paper's two stages; "yes_no" (few-shot raw completions, for small local teachers and
# balanced yes/no data) is asked for by name.
DEFAULT_STAGES = ("instruct", "preference")
_SETTINGS = "settings.json"
# Room for a generated question inside the answer prompt, beyond the template itself.
_QUESTION_RESERVE = 128


class _CountEncoder:
    """Adapts a teacher's count_tokens to the encode() the chunker wants."""

    def __init__(self, teacher: Teacher):
        self._teacher = teacher

    def encode(self, text: str) -> list[int]:
        return [0] * self._teacher.count_tokens(text)


def _check_settings(store: RunStore, settings: dict) -> None:
    path = os.path.join(store.raw_dir, _SETTINGS)
    settings = json.loads(json.dumps(settings))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if "teacher" in settings and "teacher" not in old:
            # A folder written before teachers were recorded: adopt the current one.
            old["teacher"] = settings["teacher"]
            _write_settings(path, old)
        old, settings = _flat(old), _flat(settings)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{store.out_dir}: resuming with different settings {diff} "
                f"(was {[old.get(k) for k in diff]}, now {[settings.get(k) for k in diff]}); "
                f"use a new out_dir, the original settings, or --overwrite to start over")
    else:
        _write_settings(path, settings)


def _flat(settings: dict) -> dict:
    """The teacher's fields as their own settings ("teacher.model"), so a diff names them."""
    teacher = settings.get("teacher")
    if not isinstance(teacher, dict):
        return settings
    return {**{k: v for k, v in settings.items() if k != "teacher"},
            **{f"teacher.{k}": v for k, v in teacher.items()}}


def _write_settings(path: str, settings: dict) -> None:
    tmp = path + ".new"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _teacher_setting(teacher: Teacher) -> dict:
    """{"teacher": the backend, its target and model id} for the run's settings; a resumed
    run with another teacher would mix two teachers' records in one store."""
    identity = getattr(teacher, "identity", None)
    return {"teacher": identity} if isinstance(identity, dict) else {}


def _check_kept(summary: dict, kinds: Sequence[str]) -> None:
    """A run that kept no record of its data kinds failed, whatever its exit path."""
    if any(summary["kinds"].get(k, {}).get("kept", 0) for k in kinds):
        return
    rejects = {stage: sum(c.values()) for stage, c in summary["rejects"].items()}
    top = collections.Counter({f"{stage}:{reason}": n for stage, c in summary["rejects"].items()
                               for reason, n in c.items()}).most_common(5)
    raise NoRecordsError(
        f"{summary['out_dir']}: the teacher's answers gave 0 {'/'.join(kinds)} records "
        f"(rejects by stage {rejects}; most common {dict(top)}); see rejects.jsonl")


class NoRecordsError(TeacherError):
    """Every answer of the teacher was rejected: nothing to train on."""


def _template_fingerprint(templates: Mapping[str, Template]) -> dict:
    return {k: hashlib.sha256(t.body.encode()).hexdigest()[:12]
            for k, t in sorted(templates.items())}


def round_unit(unit: str, r: int) -> str:
    """The unit id of round r of a stage's unit (round 0 keeps the plain id)."""
    return unit if r == 0 else f"{unit}/r{r}"


class _Failures:
    """Units of this invocation that were not committed, and why (retried on a rerun)."""

    def __init__(self):
        self.units: dict[str, str] = {}  # unit -> why
        self.held_back = 0
        self.answered = False  # the teacher answered a prompt in this invocation

    def summary(self) -> dict:
        return {"units_failed": len(self.units) - self.held_back,
                "units_held_back": self.held_back,
                **({"first_failure": next(iter(self.units.values()))} if self.units else {})}

    def check(self, store: RunStore, total: int) -> None:
        """Raises the run's one-line error when some units were not committed."""
        if self.units:
            raise IncompleteRunError(
                f"{store.out_dir}: {len(self.units) - self.held_back} of {total} units failed"
                f"{f' ({self.held_back} more held back with them)' if self.held_back else ''}"
                f"; the finished units are kept and a rerun retries the rest; first failure: "
                f"{next(iter(self.units.values()))}")


class IncompleteRunError(TeacherError):
    """Some work units failed; the committed ones are kept and a rerun retries the others."""


def _run_batches(store: RunStore, items: Sequence, unit_of: Callable, run_batch: Callable, *,
                 seed: int, batch_size: int, desc: str, progress: bool,
                 failures: _Failures) -> None:
    units = [unit_of(x) for x in items]
    done = sum(store.is_done(u) for u in units)
    bar = tqdm.tqdm(total=len(units), initial=done, desc=desc, disable=not progress,
                    unit="unit", dynamic_ncols=True)
    try:
        for b in range(0, len(items), batch_size):
            batch, batch_units = items[b:b + batch_size], units[b:b + batch_size]
            if all(store.is_done(u) for u in batch_units):
                continue
            with interrupts.phase("sdg"):  # a safe point between batches
                results: list[UnitResult] = run_batch(
                    batch, derive_seed(seed, "|".join(batch_units)))
            first = next((k for k, res in enumerate(results) if res.error is not None),
                         len(results))
            if (first < len(results) and not failures.answered
                    and not any(r.answered for r in results)):
                # Not one prompt has been answered yet: the teacher is unusable, not flaky.
                raise TeacherError(results[first].error)
            for k, (u, res) in enumerate(zip(batch_units, results)):
                if res.unit != u:
                    raise RuntimeError(f"stage returned unit {res.unit!r} for {u!r}")
                if store.is_done(u):
                    continue
                if k >= first:
                    # A later unit of a batch with a failed one may have sent its next prompts
                    # at other positions (other row seeds) than an undisturbed run: it is not
                    # committed, so a rerun still writes exactly the uninterrupted records.
                    failures.held_back += res.error is None
                    failures.units[u] = res.error or "held back after a failure in its batch"
                    continue
                store.commit(u, res.records, res.rejects,
                             info={"calls": res.calls} if res.calls else None)
                bar.update(1)
            failures.answered |= any(r.answered for r in results)
    finally:
        bar.close()


def plan_chunks(document_paths: Sequence[str | os.PathLike], *, teacher: Teacher,
                tokenizer=None, chunk_tokens: int, overlap: int,
                templates: Mapping[str, Template], reserve: Mapping[str, int]
                ) -> list[documents_lib.Chunk]:
    """Load and chunk documents so every chunk-level prompt fits the teacher.

    Args:
      document_paths: files or folders.
      teacher: its context_length and count_tokens bound the chunks.
      tokenizer: encodes text for chunking; the teacher's own count when None.
      chunk_tokens, overlap: chunk size and overlap in tokens.
      templates: role -> Template of every prompt that embeds a whole chunk.
      reserve: role -> generation budget (+ room for other inserted text) of that prompt.
    Returns:
      Unique chunks in document order.
    Raises:
      ValueError if some chunk + template + budget would exceed the teacher's context.
    """
    encoder = tokenizer if tokenizer is not None else _CountEncoder(teacher)
    empty = {"passage": "", "question": "", "nex": 5, "keyword": "", "rule": "", "frame": "",
             "verdict": "", "stance": ""}
    reserved = max(teacher.count_tokens(t.render(**empty)) + reserve[role]
                   for role, t in templates.items())
    # Slack for tokenizer merges at the passage boundary and for nex/keyword text.
    reserved += 16
    docs = documents_lib.load_documents(document_paths)
    names = ", ".join(map(os.fspath, document_paths))
    if not docs:
        suffixes = sorted(set(documents_lib.TEXT_SUFFIXES + documents_lib.HTML_SUFFIXES
                              + documents_lib.PDF_SUFFIXES))
        raise ValueError(f"documents {names}: no document files found (looked for "
                         f"{' '.join(suffixes)})")
    chunks = documents_lib.chunk_documents(
        docs, encoder, chunk_tokens=chunk_tokens, overlap=overlap,
        context_length=teacher.context_length, reserved_tokens=reserved)
    if not chunks:
        raise ValueError(f"documents {names}: {len(docs)} file(s) hold no text to generate from")
    for chunk in chunks:
        for role, t in templates.items():
            n = teacher.count_tokens(t.render(**{**empty, "passage": chunk.text,
                                                 "rule": chunk.text})) + reserve[role]
            if n > teacher.context_length:
                raise ValueError(
                    f"chunk {chunk.id} of {chunk.source} (chars {chunk.start}-{chunk.end}) "
                    f"with template {t.path} needs {n} tokens > teacher context "
                    f"{teacher.context_length}; the chunking tokenizer disagrees with the "
                    f"teacher's, pass tokenizer=None or a smaller chunk_tokens")
    return chunks


def run_document_sdg(document_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                     teacher: Teacher, tokenizer=None, nex: int = 5, keyword: str = "policies",
                     templates: Mapping[str, str | os.PathLike | Template] | None = None,
                     chunk_tokens: int = 512, overlap: int = 64, seed: int = 0,
                     stages: Sequence[str] = DEFAULT_STAGES, concurrency: int = 8,
                     instruct_config: instruct.InstructConfig | None = None,
                     preference_config: preference.PreferenceConfig | None = None,
                     yes_no_config: yes_no.YesNoConfig | None = None,
                     split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                     near_duplicate_threshold: float | None = 0.8,
                     max_chunks: int | None = None, rounds: int = 1,
                     balance: bool = True,
                     progress: bool = True, verbose: bool = True) -> dict:
    """Generate D_sft and D_pref from value documents.

    Stages: "instruct" (open questions with answers from the chunk: D_sft), "preference"
    (values filter, then faithful/unfaithful answer pairs: D_pref), "yes_no" (questions about
    each rule of the chunk whose yes/no answer comes from the rule's wording, balanced by
    construction: both D_sft and D_pref; see `align_jax.sdg.yes_no`).

    Args:
      document_paths: .txt/.md/.html/.pdf files or folders of them.
      out_dir: run folder (see align_jax.sdg.store); an existing one is resumed.
      teacher: any Teacher.
      tokenizer: encode(text) -> ids used for chunking and length stats; the teacher's
        own count_tokens when None.
      nex: questions per chunk and call (overrides the configs' nex).
      keyword: what the document holds, e.g. "policies" or "rights".
      templates: overrides by role: instruct_questions, instruct_answer, values_filter,
        preference_pairs (a name, a path or a Template).
      chunk_tokens, overlap: chunking in tokens.
      seed: global seed; unit/batch seeds derive from it.
      stages: any of "instruct", "preference", "yes_no" (default the first two).
      concurrency: chunks per teacher call.
      instruct_config, preference_config, yes_no_config: the stages' settings.
      split_fractions: train/validation/test shares, by chunk.
      near_duplicate_threshold: word-bigram Jaccard for near-duplicate removal.
      max_chunks: use only the first this many chunks (a quick run on a small machine).
      rounds: teacher calls per chunk and stage, each with its own seed (so new questions
        and pairs); records are deduplicated across rounds by `finalize`, and each round of
        each chunk is its own resumable unit ("instruct/<chunk>/r2"; round 0 keeps the id
        "instruct/<chunk>").
      balance: keep the yes/no stage's records balanced after deduplication (answers 50/50,
        the chosen answer the shorter one in 40-60% of pairs; `yes_no.balance_records`).
      progress: show a tqdm bar.
      verbose: print the summary.
    Returns:
      The summary (also <out_dir>/summary.json).
    """
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1 or None, got {max_chunks}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(stages)}")
    if concurrency < 1 or nex < 1:
        raise ValueError(f"concurrency and nex must be >= 1, got {concurrency}, {nex}")
    i_cfg = instruct.InstructConfig(**{**vars(instruct_config or instruct.InstructConfig()),
                                       "nex": nex, "keyword": keyword})
    p_cfg = preference.PreferenceConfig(**{
        **vars(preference_config or preference.PreferenceConfig()),
                                           "nex": nex, "keyword": keyword})
    y_cfg = yes_no_config or yes_no.YesNoConfig()
    modules = {"instruct": (instruct, i_cfg, instruct.generate_instruct),
               "preference": (preference, p_cfg, preference.generate_preference),
               "yes_no": (yes_no, y_cfg, yes_no.generate_yes_no)}
    all_roles = {r: t for m, _, _ in modules.values() for r, t in m.TEMPLATES.items()}
    tpls = resolve_templates(all_roles, templates, strict=True)
    # The yes/no prompts hold one rule (a part of the chunk), so a chunk that fits with
    # the template fits with any of its rules.
    chunk_roles = {"instruct_questions": i_cfg.question_max_tokens,
                   "instruct_answer": i_cfg.answer_max_tokens + _QUESTION_RESERVE,
                   "values_filter": p_cfg.filter_max_tokens,
                   "preference_pairs": p_cfg.pair_max_tokens,
                   "yes_no_question": y_cfg.question_max_tokens,
                   "yes_no_unfaithful": y_cfg.unfaithful_max_tokens + _QUESTION_RESERVE}
    used = {r for s in stages for r in modules[s][0].TEMPLATES}
    chunks = plan_chunks(document_paths, teacher=teacher, tokenizer=tokenizer,
                         chunk_tokens=chunk_tokens, overlap=overlap,
                         templates={r: tpls[r] for r in used},
                         reserve={r: chunk_roles[r] for r in used})
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    store = RunStore(out_dir)
    settings = {"kind": "documents", "sources": sorted({c.source for c in chunks}),
                "chunk_ids": [c.id for c in chunks], "seed": seed, "concurrency": concurrency,
                "stages": list(stages), "instruct": vars(i_cfg), "preference": vars(p_cfg),
                **({"yes_no": vars(y_cfg)} if "yes_no" in stages else {}),
                "rounds": rounds,
                "templates": _template_fingerprint({r: tpls[r] for r in used}),
                **_teacher_setting(teacher)}
    _check_settings(store, settings)
    failures = _Failures()
    planned = []
    for stage in stages:
        module, config, generate_units = modules[stage]
        stage_unit = module.unit_id
        for r in range(rounds):
            def unit_of(chunk, r=r, stage_unit=stage_unit):
                return round_unit(stage_unit(chunk), r)

            def run_batch(batch, batch_seed, r=r, generate_units=generate_units,
                          config=config):
                # The batch seed derives from the unit ids, which carry the round: every
                # round samples afresh, and a resumed round redoes exactly what it did.
                kw = {"round_index": r} if generate_units is yes_no.generate_yes_no else {}
                results = generate_units(teacher, batch, seed=batch_seed, config=config,
                                         templates=tpls, **kw)
                return [dataclasses.replace(res, unit=round_unit(res.unit, r))
                        for res in results]
            desc = f"sdg {stage}" + (f" round {r + 1}/{rounds}" if rounds > 1 else "")
            planned += [unit_of(c) for c in chunks]
            _run_batches(store, chunks, unit_of, run_batch, seed=seed,
                         batch_size=concurrency, desc=desc, progress=progress,
                         failures=failures)
    count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else teacher.count_tokens
    summary = finalize(store, kinds=("sft", "preference"), split_fractions=split_fractions,
                       near_threshold=near_duplicate_threshold, count_tokens=count,
                       select=yes_no.balance_records if balance else None,
                       extra={"num_chunks": len(chunks),
                              "num_documents": len(settings["sources"]), **failures.summary()},
                       unit_order=planned, verbose=verbose)
    failures.check(store, len(planned))
    _check_kept(summary, ("sft", "preference"))
    return summary


def run_aligner_sdg(out_dir: str | os.PathLike, *, teacher: Teacher, seed: int = 0,
                    criteria: Sequence[str] = aligner_data.CRITERIA,
                    seed_questions: str | os.PathLike | None = None,
                    config: aligner_data.AlignerDataConfig | None = None,
                    templates: Mapping[str, str | os.PathLike | Template] | None = None,
                    concurrency: int = 8, max_questions: int | None = None,
                    split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                    near_duplicate_threshold: float | None = 0.8,
                    progress: bool = True, verbose: bool = True) -> dict:
    """Generate aligner triples and inspector examples per criterion.

    Args:
      out_dir: run folder; an existing one is resumed.
      teacher: any Teacher.
      seed: global seed.
      criteria: alignment criteria; each needs a template "aligner_<criterion>".
      seed_questions: JSONL of {question_type, topic, question}; the shipped seeds if None.
      config: settings (rounds, topics per round, sampling, cleaning thresholds).
      templates: overrides by role: aligner_topics, aligner_questions, aligner_<criterion>.
      concurrency: prompts per teacher call.
      max_questions: cap on generated questions (None: all).
      split_fractions, near_duplicate_threshold, progress, verbose: as run_document_sdg.
    Returns:
      The summary (also <out_dir>/summary.json); kinds "questions", "aligner", "inspector".
    """
    cfg = config or aligner_data.AlignerDataConfig()
    seeds = aligner_data.load_seed_questions(seed_questions)
    store = RunStore(out_dir)
    roles = {"aligner_topics", "aligner_questions", *(f"aligner_{c}" for c in criteria)}
    defaults = {r: aligner_data.TEMPLATES.get(r, r) for r in roles}
    tpls = resolve_templates(defaults, templates, strict=True)
    _check_settings(store, {"kind": "aligner", "seed": seed, "criteria": list(criteria),
                            "seeds": seeds, "config": vars(cfg), "concurrency": concurrency,
                            "max_questions": max_questions,
                            "templates": _template_fingerprint(tpls)})
    unit = "inputs/all"
    failures = _Failures()
    if not store.is_done(unit):
        topics, rejects = aligner_data.brainstorm_topics(
            teacher, seeds, seed=derive_seed(seed, "topics"), config=cfg, templates=tpls)
        questions, q_rejects = aligner_data.write_questions(
            teacher, seeds, topics, seed=derive_seed(seed, "questions"), concurrency=concurrency,
            config=cfg, templates=tpls)
        if max_questions is not None:
            questions = questions[:max_questions]
        store.commit(unit, {"topics": [{"question_type": t, "topic": x}
                                       for t, xs in topics.items() for x in xs],
                            "questions": questions}, rejects + q_rejects)
    questions = [{k: v for k, v in q.items() if k != "_unit"} for q in store.records("questions")]
    planned = [unit]
    for criterion in criteria:
        def run_batch(batch, batch_seed, criterion=criterion):
            return aligner_data.generate_aligner(teacher, batch, criterion=criterion,
                                                 seed=batch_seed, config=cfg, templates=tpls)

        def unit_of(q, c=criterion):
            return f"aligner/{c}/{q['question_id']}"
        planned += [unit_of(q) for q in questions]
        _run_batches(store, questions, unit_of, run_batch, seed=seed, batch_size=concurrency,
                     desc=f"sdg aligner {criterion}", progress=progress, failures=failures)
    summary = finalize(store, kinds=("questions", "aligner", "inspector"),
                       split_fractions=split_fractions, near_threshold=near_duplicate_threshold,
                       count_tokens=teacher.count_tokens, extra=failures.summary(),
                       unit_order=planned, verbose=verbose)
    failures.check(store, len(planned))
    _check_kept(summary, ("aligner", "inspector"))
    return summary


def run_principles_sdg(out_dir: str | os.PathLike, *, teacher: Teacher | None = None,
                       task: str | None = None, principles: Sequence[str] | int = 2,
                       principles_file: str | os.PathLike | None = None, seed: int = 0,
                       templates: Mapping[str, str | os.PathLike | Template] | None = None,
                       use_chat: bool = True, verbose: bool = True) -> list[dict]:
    """Write SAMI principles and all their constitutions.

    Either a principle writer (`teacher` + `task` + `principles`) or a user file
    (`principles_file`, see principles.load_principles) supplies the principles.

    Args:
      out_dir: folder for principles.jsonl and constitutions.jsonl.
      teacher, task, principles, seed, templates, use_chat: see principles.write_principles.
      principles_file: user-written principles instead of a principle writer.
      verbose: print what was written.
    Returns:
      The constitution records.
    """
    if principles_file is not None:
        found = principles_lib.load_principles(principles_file)
    elif teacher is not None and task:
        found, _ = principles_lib.write_principles(teacher, task=task, principles=principles,
                                                   seed=seed, use_chat=use_chat,
                                                   templates=templates)
    else:
        raise ValueError("give principles_file, or teacher and task for the principle writer")
    constitutions = principles_lib.make_constitutions(found)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "principles.jsonl"), found)
    write_jsonl(os.path.join(out_dir, "constitutions.jsonl"), constitutions)
    if verbose:
        print(f"wrote {len(found)} principles and {len(constitutions)} constitutions to {out_dir}")
    return constitutions
