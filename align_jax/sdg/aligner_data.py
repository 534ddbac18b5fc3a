"""Aligner and inspector data: red-teaming questions, then flawed/critiqued/aligned answers.

Inputs come from topic-guided red-teaming self-instruct: seed (question type, topic,
question) triples; the teacher brainstorms new topics per type over several rounds
(de-duplicated against everything known), then writes questions from (type, topic) hints
with the seeds and earlier questions as examples. For each question and criterion
(ethical, factuality, helpful) a prompt of principles and worked examples makes the
teacher write a first response y, a critique and an aligned response y'. Cleaning drops
leaked template markers, non-text, and rewrites that leave y (nearly) unchanged, which
would give an inspector the same text with both labels: by default when their difflib
ratio is >= `max_rewrite_similarity`; with a `rewrite_encoder` (all-MiniLM-L6-v2, as the
aligners' reference code filters) when the cosine of their sentence embeddings is >=
`max_rewrite_cosine` instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from align_jax.jsonl import iter_values
from align_jax.sdg import parsing
from align_jax.sdg.store import UnitResult, dedup_records, derive_seed
from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import TEMPLATE_DIR, Template, resolve_templates
from align_jax.tokenizer import load_tokenizer

CRITERIA = ("ethical", "factuality", "helpful")
TEMPLATES = {"aligner_topics": "aligner_topics", "aligner_questions": "aligner_questions",
             **{f"aligner_{c}": f"aligner_{c}" for c in CRITERIA}}
SEED_QUESTIONS = os.path.join(TEMPLATE_DIR, "aligner_seed_questions.jsonl")
SECTIONS = ("First response", "Critique", "Aligned response")
_MARKERS = ("Question:", "First response:", "Critique:", "Aligned response:", "{input}",
            "## Principles", "## Examples")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignerDataConfig:
    """Settings of the aligner data generation."""
    rounds: int = 2
    topics_per_round: int = 10
    max_topic_words: int = 4
    questions_per_call: int = 20
    # Examples shown when writing questions: all seeds, then the latest generated ones.
    max_examples: int = 30
    temperature: float = 0.8
    top_p: float = 0.95
    topic_max_tokens: int = 300
    question_max_tokens: int = 1200
    # The paper's triple stage: greedy, repetition penalty 2, at most 1500 new tokens.
    response_max_tokens: int = 1500
    response_temperature: float = 0.0
    response_repetition_penalty: float = 2.0
    # y' this similar to y (difflib ratio) counts as "no change" and is dropped.
    max_rewrite_similarity: float = 0.9
    # An encoder checkpoint dir or named model (e.g. "all-minilm-l6-v2"): then a triple is
    # dropped when cosine(embed(y), embed(y')) >= max_rewrite_cosine, as the reference code
    # filters, instead of by the difflib ratio.
    rewrite_encoder: str | None = None
    max_rewrite_cosine: float = 0.9
    near_duplicate_questions: float = 0.8
    # An encoder checkpoint dir (e.g. all-MiniLM-L6-v2): questions are then also dropped when
    # the cosine of their sentence embeddings with an earlier one is >= embedding_similarity.
    similarity_encoder: str | None = None
    embedding_similarity: float = 0.9
    use_chat: bool = False


def question_id(question: str) -> str:
    """Stable id of a question (groups its aligner/inspector records in one split)."""
    return hashlib.sha256(" ".join(question.lower().split()).encode()).hexdigest()[:16]


def load_seed_questions(path: str | os.PathLike | None = None) -> list[dict]:
    """Seed triples {question_type, topic, question} from a JSONL file.

    Args:
      path: the file; the shipped 20 seeds when None.
    Returns:
      The seeds in file order.
    Raises:
      ValueError naming the file, line and field for malformed lines.
    """
    path = os.fspath(path or SEED_QUESTIONS)
    out = []
    for where, d in iter_values(path):
        for field in ("question_type", "topic", "question"):
            if not isinstance(d, dict) or not isinstance(d.get(field), str) or not d[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string")
        out.append({k: d[k].strip() for k in ("question_type", "topic", "question")})
    if not out:
        raise ValueError(f"{path}: no seed questions")
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().strip(" .;:").split())


def brainstorm_topics(teacher: Teacher, seeds: Sequence[dict], *, seed: int,
                      config: AlignerDataConfig = AlignerDataConfig(),
                      templates: Mapping[str, str | Template] | None = None
                      ) -> tuple[dict[str, list[str]], list[dict]]:
    """New topics per question type over `config.rounds` rounds, de-duplicated.

    Args:
      teacher: any Teacher.
      seeds: seed triples (their topics are the starting examples).
      seed: sampling seed.
      config: settings.
      templates: override for "aligner_topics".
    Returns:
      (question type -> new topics in order of discovery, rejects).
    """
    tpl = resolve_templates({"aligner_topics": TEMPLATES["aligner_topics"]},
                            {k: v for k, v in (templates or {}).items() if k == "aligner_topics"}
                            )["aligner_topics"].require(["question_type"])
    types = list(dict.fromkeys(s["question_type"] for s in seeds))
    known = {t: [s["topic"] for s in seeds if s["question_type"] == t] for t in types}
    seen = {t: {_norm(x) for x in known[t]} for t in types}
    new: dict[str, list[str]] = {t: [] for t in types}
    rejects = []
    for r in range(config.rounds):
        prompts = [tpl.render(question_type=t, n=config.topics_per_round,
                              examples="\n".join(known[t])) for t in types]
        outs = ask(teacher, prompts, use_chat=config.use_chat, temperature=config.temperature,
                   top_p=config.top_p, max_tokens=config.topic_max_tokens,
                   seed=derive_seed(seed, f"topics/{r}"))
        for t, out in zip(types, outs):
            items = parsing.parse_list_items(out)
            if not items:
                rejects.append({"reason": "no_items", "text": out[:200], "step": "topics"})
            for topic in items[:config.topics_per_round]:
                topic = topic.strip().rstrip(".")
                problem = parsing.text_problem(topic, markers=("{", "}"))
                if problem is None and len(topic.split()) > config.max_topic_words:
                    problem = "topic_too_long"
                if problem is None and _norm(topic) in seen[t]:
                    problem = "duplicate_topic"
                if problem:
                    rejects.append({"reason": problem, "text": topic[:200], "step": "topics"})
                    continue
                seen[t].add(_norm(topic))
                known[t].append(topic)
                new[t].append(topic)
    return new, rejects


def write_questions(teacher: Teacher, seeds: Sequence[dict], topics: Mapping[str, Sequence[str]],
                    *, seed: int, concurrency: int = 8,
                    config: AlignerDataConfig = AlignerDataConfig(),
                    templates: Mapping[str, str | Template] | None = None
                    ) -> tuple[list[dict], list[dict]]:
    """Questions from (type, topic) hints, de-duplicated (exact and near).

    Calls go out in waves of `concurrency` prompts; each wave's examples are the seeds
    plus the latest questions of earlier waves, as in self-instruct.

    Args:
      teacher: any Teacher.
      seeds: seed triples (always among the examples; never returned).
      topics: question type -> topics to write questions about.
      seed: sampling seed.
      concurrency: prompts per teacher call.
      config: settings.
      templates: override for "aligner_questions".
    Returns:
      (questions as {question_type, topic, question, question_id}, rejects).
    """
    tpl = resolve_templates({"aligner_questions": TEMPLATES["aligner_questions"]},
                            {k: v for k, v in (templates or {}).items()
                             if k == "aligner_questions"})["aligner_questions"]
    tpl.require(["hints"])
    hints = [(t, topic) for t, ts in topics.items() for topic in ts]
    calls = [hints[i:i + config.questions_per_call]
             for i in range(0, len(hints), config.questions_per_call)]
    generated: list[dict] = []
    rejects: list[dict] = []
    for w in range(0, len(calls), max(1, concurrency)):
        wave = calls[w:w + max(1, concurrency)]
        keep = max(0, config.max_examples - len(seeds))
        recent = generated[-keep:] if keep else []
        examples = "\n".join(json.dumps({k: e[k] for k in ("question_type", "topic", "question")},
                                        ensure_ascii=False) for e in list(seeds) + recent)
        prompts = [tpl.render(n=len(call), examples=examples,
                              hints="\n".join(f"{t} | {topic}" for t, topic in call))
                   for call in wave]
        outs = ask(teacher, prompts, use_chat=config.use_chat, temperature=config.temperature,
                   top_p=config.top_p, max_tokens=config.question_max_tokens,
                   seed=derive_seed(seed, f"questions/{w}"))
        for call, out in zip(wave, outs):
            items, bad = parsing.parse_json_records(
                out, required=("question",), optional=("question_type", "topic"),
                list_key="question")
            rejects.extend({**r, "step": "questions"} for r in bad)
            for n, item in enumerate(items[:len(call)]):
                problem = parsing.text_problem(item["question"], markers=("{", "Hints:"))
                if problem:
                    rejects.append({"reason": problem, "text": item["question"][:200],
                                    "step": "questions"})
                    continue
                # Hints are numbered in order, so a missing type/topic falls back to it.
                q_type, topic = call[n]
                generated.append({"question_type": item.get("question_type", q_type),
                                  "topic": item.get("topic", topic),
                                  "question": item["question"],
                                  "question_id": question_id(item["question"])})
    seed_rows = [{"question": s["question"]} for s in seeds]
    kept, removed = dedup_records(seed_rows + generated, ("question",),
                                  near_threshold=config.near_duplicate_questions)
    rejects.extend({"reason": r["reason"], "text": r["question"][:200], "step": "questions"}
                   for r in removed)
    if config.similarity_encoder:
        keep = similar_by_embedding([q["question"] for q in kept], config.similarity_encoder,
                                    threshold=config.embedding_similarity)
        rejects.extend({"reason": "similar_embedding", "text": q["question"][:200],
                        "step": "questions"} for q, k in zip(kept, keep) if not k)
        kept = [q for q, k in zip(kept, keep) if k]
    return [q for q in kept if "question_id" in q], rejects


def similar_by_embedding(texts: Sequence[str], encoder_dir: str, *,
                         threshold: float = 0.9) -> list[bool]:
    """Which texts to keep: each is dropped when its sentence embedding (mean-pooled,
    normalised; `models.encoder.embed_sentences`) has cosine >= threshold with a kept earlier one.
    """
    # Local: `import align_jax.sdg` stays free of jax; only this option embeds.
    from align_jax.models import encoder
    if not texts:
        return []
    config, params = encoder.load_encoder(encoder_dir)
    emb = encoder.embed_sentences(config, params, load_tokenizer(encoder_dir), list(texts))
    keep: list[bool] = []
    kept_rows: list[int] = []
    for i in range(len(texts)):
        ok = not kept_rows or float(np.max(emb[kept_rows] @ emb[i])) < threshold
        keep.append(ok)
        if ok:
            kept_rows.append(i)
    return keep


def rewrite_cosines(responses: Sequence[str], aligned: Sequence[str], encoder_dir: str
                    ) -> np.ndarray:
    """cosine(embed(y), embed(y')) per pair, with mean-pooled normalised sentence embeddings
    (`models.encoder.embed_sentences`) of `encoder_dir` (a dir or a named model)."""
    # Local: `import align_jax.sdg` stays free of jax; only this option embeds.
    from align_jax.models import encoder
    from align_jax.models.named import resolve_model_path
    if len(responses) != len(aligned):
        raise ValueError(f"rewrite_cosines: {len(responses)} responses, {len(aligned)} rewrites")
    if not responses:
        return np.zeros(0)
    path = resolve_model_path(encoder_dir)
    config, params = encoder.load_encoder(path)
    emb = encoder.embed_sentences(config, params, load_tokenizer(path),
                                  list(responses) + list(aligned))
    n = len(responses)
    return np.sum(emb[:n] * emb[n:], axis=-1).astype(np.float64)


def filter_rewrites(triples: Sequence[Mapping], encoder_dir: str, *,
                    max_cosine: float = 0.9) -> tuple[list[Mapping], list[Mapping]]:
    """Aligner triples split by cosine(y, y'): (kept, dropped), each dropped one with its
    `cosine`; a triple is dropped when the cosine is >= max_cosine."""
    cos = rewrite_cosines([t["initial_response"] for t in triples],
                          [t["aligned_response"] for t in triples], encoder_dir)
    kept = [t for t, c in zip(triples, cos) if c < max_cosine]
    dropped = [{**t, "cosine": float(c)} for t, c in zip(triples, cos) if c >= max_cosine]
    return kept, dropped


def clean_triple(x: str, y: str, critique: str, y_aligned: str, *,
                 max_similarity: float = 0.9) -> str | None:
    """Why an (x, y, critique, y') example is unusable, or None.

    Returns:
      A text_problem reason for any field ("leaked_marker", "non_text", ...),
      "identity_rewrite" when y' equals y up to case/space, "near_identical_rewrite"
      when their difflib ratio is >= max_similarity.
    """
    for value in (x, y, critique, y_aligned):
        problem = parsing.text_problem(value, markers=_MARKERS)
        if problem:
            return problem
    a, b = _norm(y), _norm(y_aligned)
    if a == b:
        return "identity_rewrite"
    if difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= max_similarity:
        return "near_identical_rewrite"
    return None


def generate_aligner(teacher: Teacher, questions: Sequence[dict], *, criterion: str, seed: int,
                     config: AlignerDataConfig = AlignerDataConfig(),
                     templates: Mapping[str, str | Template] | None = None
                     ) -> list[UnitResult]:
    """Aligner and inspector records for a batch of questions under one criterion.

    Args:
      teacher: any Teacher.
      questions: {question, question_id, ...} each; one unit per question.
      criterion: one of CRITERIA, or any name with a template "aligner_<name>" given in
        `templates`.
      seed: the batch seed.
      config: settings.
      templates: override for "aligner_<criterion>".
    Returns:
      One UnitResult per question with kinds "aligner" ({input, initial_response,
      critique, aligned_response, criterion, question_id}) and "inspector" ({input,
      response, label, criterion, question_id}: label 0 for y, 1 for y').
    """
    role = f"aligner_{criterion}"
    overrides = {k: v for k, v in (templates or {}).items() if k == role}
    if role not in TEMPLATES and role not in overrides:
        raise ValueError(f"unknown criterion {criterion!r}: give a template for {role!r}")
    tpl = resolve_templates({role: TEMPLATES.get(role, role)}, overrides)[role].require(["input"])
    results = [UnitResult(unit=f"aligner/{criterion}/{q['question_id']}") for q in questions]
    outs = ask(teacher, [tpl.render(input=q["question"]) for q in questions],
               use_chat=config.use_chat, temperature=config.response_temperature,
               top_p=config.top_p if config.response_temperature > 0 else 1.0,
               max_tokens=config.response_max_tokens, seed=derive_seed(seed, role),
               repetition_penalty=config.response_repetition_penalty, owners=results)
    # With an encoder the embedding cosine replaces the difflib ratio (> 1: never).
    max_ratio = config.max_rewrite_similarity if config.rewrite_encoder is None else 2.0
    parsed = []
    for res, q, out in zip(results, questions, outs):
        sections, why = parsing.parse_sections(out, SECTIONS, stop_labels=("Question",))
        if sections is None:
            res.reject(why, out, criterion=criterion)
            continue
        y, critique, y2 = (sections[s] for s in SECTIONS)
        problem = clean_triple(q["question"], y, critique, y2, max_similarity=max_ratio)
        if problem:
            res.reject(problem, out, criterion=criterion)
            continue
        parsed.append((res, q, out, y, critique, y2))
    if config.rewrite_encoder is not None and parsed:
        cos = rewrite_cosines([p[3] for p in parsed], [p[5] for p in parsed],
                              config.rewrite_encoder)
        similar = [p for p, c in zip(parsed, cos) if c >= config.max_rewrite_cosine]
        for res, _, out, *_ in similar:
            res.reject("similar_rewrite_embedding", out, criterion=criterion)
        parsed = [p for p, c in zip(parsed, cos) if c < config.max_rewrite_cosine]
    for res, q, _, y, critique, y2 in parsed:
        common = {"criterion": criterion, "question_id": q["question_id"]}
        res.add("aligner", {"input": q["question"], "initial_response": y, "critique": critique,
                            "aligned_response": y2, **common})
        res.add("inspector", {"input": q["question"], "response": y, "label": 0, **common})
        res.add("inspector", {"input": q["question"], "response": y2, "label": 1, **common})
    return results
