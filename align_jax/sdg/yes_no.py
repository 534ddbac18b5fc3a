"""Grounded yes/no questions from a document's rules: D_sft and D_pref, balanced by construction.

For every rule clause of a chunk (`align_jax.sdg.rules`) and every round, the teacher writes
yes/no questions about the rule. The stage opens each question with a frame it picks ("Can I",
"Do I have to", ...) and the answer follows from the rule's wording, so no teacher is trusted
with a verdict (a 135M model says "Yes" to almost anything); the teacher only writes the rest
of the question in the rule's words. With the default "direct" frames the answer is the
rule's kind (a forbidden action "no", a required or permitted one "yes") and the rules of the
rarer answer get more questions, so "yes" and "no" are balanced by construction; "mixed"
frames add inverted ones, so every rule gets both answers:

    rule (prohibits): "Never work on a roof alone."
    "Is it OK if I" + teacher: " work on the roof alone?"   -> answer "no"
    "Should I avoid" + teacher: " working on a roof alone?" -> answer "yes"  (mixed only)

The faithful answer (SFT completion, D_pref chosen) is the verdict followed by the rule as
the document words it: grounded by construction. The unfaithful answer (D_pref rejected) is
the opposite verdict and the opposite stance ("Yes. You can", "No. You do not need to"),
which the teacher completes with the action, so it contradicts the chunk by construction.
Both teacher calls are constrained (a question ending in "?", the rest of one sentence) when
the teacher applies constraints; otherwise the first line is cut at the first "?" / ".".

Every record keeps its grounding (chunk_id, source, rule, rule_kind, frame, answer). Checks,
each a reject reason that the SDG summary counts:
  incomplete / no_question / no_sentence   the teacher's output cannot be read (parse failure)
  off_rule            the question's content words are mostly not the rule's
  negation_added      the teacher put a negation into the question that the rule does not have
                      (it would flip the answer the frame implies)
  not_grounded        encoder cosine(question, rule) below `min_cosine`
  unfaithful_self_contradicting   the teacher negated the stance it was given
  unfaithful_off_topic            its words are neither the rule's nor the question's
Balance across the whole run (answers 50/50, chosen shorter than rejected in 40-60% of pairs)
is applied after deduplication by `balance_records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence

from align_jax.data.documents import Chunk
from align_jax.sdg.rules import NOT_REQUIRED, Clause, extract_clauses
from align_jax.sdg.store import UnitResult, derive_seed
from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import Template, resolve_templates

STAGE = "yes_no"
TEMPLATES = {"yes_no_question": "yes_no_question", "yes_no_unfaithful": "yes_no_unfaithful"}

# Frames that ask whether one may or must do what the rule is about: the answer is the rule's
# kind alone (a forbidden action "no", a required or permitted one "yes"), whatever the frame.
# The default ("direct"): a small student learns which actions the document allows, not a
# frame-times-kind rule; balance comes from asking more about the rarer kind.
DIRECT_FRAMES: dict[str, tuple[str, ...]] = {
    "prohibits": ("Can I", "Should I", "May I", "Is it OK if I", "Do I have to", "Can we",
                  "Am I allowed to", "Is it fine if I", "Could I"),
    "requires": ("Should I", "Do I have to", "Can I", "Do I need to", "Must I", "Is it OK if I"),
    "permits": ("Can I", "May I", "Is it OK if I", "Am I allowed to", "Can we"),
}
DIRECT_ANSWER = {"prohibits": "no", "requires": "yes", "permits": "yes"}
# All frames ("mixed"): frame -> the answer per kind of rule (absent: not used); the inverted
# ones ("Is it against the code to", "Should I avoid", ...) give every rule both answers.
FRAMES: dict[str, dict[str, str]] = {
    "Can I": {"prohibits": "no", "requires": "yes", "permits": "yes"},
    "Is it OK if I": {"prohibits": "no", "requires": "yes", "permits": "yes"},
    "May I": {"prohibits": "no", "permits": "yes"},
    "Do I have to": {"prohibits": "no", "requires": "yes", "permits": "no"},
    "Should I": {"prohibits": "no", "requires": "yes"},
    "Is it OK not to": {"requires": "no"},
    "Can I skip": {"requires": "no"},
    "Is it against the code to": {"prohibits": "yes", "requires": "no", "permits": "no"},
    "Should I avoid": {"prohibits": "yes"},
    "Do I need to": {"requires": "yes"},
    "Must I": {"requires": "yes"},
    "Can we": {"prohibits": "no", "permits": "yes"},
    "Am I allowed to": {"prohibits": "no", "permits": "yes"},
    "Is it fine if I": {"prohibits": "no", "permits": "yes"},
    "Could I": {"prohibits": "no", "permits": "yes"},
}
# How the unfaithful answer's reason opens: the stance opposite to the rule's, so that the
# pair contradicts the chunk by construction; the teacher only names the action.
STANCES: dict[str, tuple[str, ...]] = {
    "prohibits": ("You can", "It is fine to", "You are allowed to"),
    "requires": ("You do not need to", "There is no need to", "It is up to you whether you"),
    "permits": ("You are not allowed to", "You must not", "It is not allowed to"),
    "not_required": ("You must", "You have to", "It is required to"),
}
_NEGATIONS = re.compile(r"\b(not|never|no|without|avoid|skip|refuse|instead|nobody|nothing|"
                        r"don't|doesn't|isn't|aren't|can't|cannot|won't|shouldn't|n't)\b", re.I)
_DEONTIC_NEGATION = re.compile(
    r"\b(?:do not have to|don't have to|need not|do not need to|must never|must not|may not|"
    r"should never|should not|are never|is never|never|do not|don't)\b", re.I)
_STOP = frozenset("""a an the i me my we our you your it its is are was were be been am do does
did to of in on at for with by from as and or but if so that this these those can could may
might must should shall will would have has had not no yes ok okay there here what which who
whom when where why how any every each all some such than then too very just also only even
into out up about over under again once get got go going want let someone something anyone
anything he she they them their his her him code rule rules""".split())


@dataclasses.dataclass(frozen=True, kw_only=True)
class YesNoConfig:
    """Settings of the yes/no stage.

    frames: "direct" (the answer follows the rule's kind; each rule of the rarer answer gets
      more questions, so a batch asks as many "yes" as "no" questions) or "mixed" (every
      rule gets "yes" and "no" frames, inverted ones included).
    questions_per_rule: questions per rule and round (direct: per rule of the commoner
      answer; mixed: alternating "yes" and "no" frames).
    question_temperature, question_top_p: sampling of the question's words in the rounds
      after the first `greedy_rounds` (greedy questions are a small teacher's best; new
      frames each round keep greedy rounds from repeating themselves).
    question_max_tokens, unfaithful_max_tokens: budgets of the two teacher calls.
    min_overlap: share of the question's content words that must be the rule's.
    min_cosine: encoder cosine(question, rule) below which a question is not grounded
      (None skips the encoder check).
    encoder: the sentence encoder for that check (a named model or a checkpoint dir).
    use_chat: send prompts through the chat template (False: raw few-shot completion, what
      small teachers follow best).
    """

    frames: str = "direct"
    questions_per_rule: int = 2
    question_temperature: float = 0.5
    question_top_p: float = 0.9
    greedy_rounds: int = 3
    question_max_tokens: int = 32
    unfaithful_max_tokens: int = 40
    min_overlap: float = 0.5
    min_cosine: float | None = 0.45
    encoder: str = "all-minilm-l6-v2"
    use_chat: bool = False


def unit_id(chunk: Chunk) -> str:
    """The work unit of this stage for a chunk."""
    return f"{STAGE}/{chunk.id}"


def _stems(text: str) -> set[str]:
    out = set()
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in _STOP or len(w) < 3:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if w.endswith(suffix) and len(w) - len(suffix) >= 3:
                w = w[:-len(suffix)]
                break
        out.add(w)
    return out


def pick_frames(clause: Clause, *, key: str, count: int) -> list[str]:
    """`count` frames for a rule, alternating "yes" and "no" answers, chosen by a hash of `key`.

    Args:
      clause: the rule.
      key: what makes the choice differ between rules and rounds (unit id + rule index).
      count: frames wanted (at most one per distinct frame).
    Returns:
      Frames whose answers alternate yes, no, yes, ... as far as the rule's kind allows.
    """
    by_answer = {a: [f for f, m in FRAMES.items() if m.get(clause.kind) == a]
                 for a in ("yes", "no")}
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    out: list[str] = []
    for i in range(count):
        options = [f for f in by_answer["yes" if (i + h) % 2 == 0 else "no"] if f not in out]
        if not options:
            options = [f for f in FRAMES if clause.kind in FRAMES[f] and f not in out]
        if not options:
            break
        out.append(options[(h >> (8 + i)) % len(options)])
    return out


def direct_frames(clause: Clause, *, key: str, count: int, round_index: int = 0) -> list[str]:
    """`count` distinct direct frames for a rule (at most all of its kind's): the rule's
    frames taken in turn from a start given by a hash of key, round after round, so that
    greedy rounds ask new questions until every frame has been used."""
    options = list(DIRECT_FRAMES[clause.kind])
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    start = h + round_index * count
    return [options[(start + i) % len(options)] for i in range(min(count, len(options)))]


def direct_counts(clauses: Sequence[Clause], per_rule: int) -> dict[str, int]:
    """Questions per rule of each kind so that "yes" and "no" questions are about as many:
    the rules of the rarer answer get proportionally more (at most their frames' number)."""
    n = {a: sum(DIRECT_ANSWER[c.kind] == a for c in clauses) for a in ("yes", "no")}
    counts = {}
    for kind, answer in DIRECT_ANSWER.items():
        other = n["no" if answer == "yes" else "yes"]
        mine = max(1, n[answer])
        k = per_rule * max(1.0, other / mine)
        counts[kind] = max(1, min(len(DIRECT_FRAMES[kind]), round(k)))
    return counts


def question_problem(question_body: str, clause: Clause, *, min_overlap: float) -> str | None:
    """Why a question (without its frame) cannot keep the frame's answer, or None.

    Args:
      question_body: what the teacher wrote after the frame, "?" included.
      clause: the rule it is about.
      min_overlap: share of the body's content words that must be the rule's.
    """
    words = _stems(question_body)
    rule = _stems(clause.text)
    shared = words & rule
    if len(shared) < 2 or len(shared) < min_overlap * len(words):
        return "off_rule"
    # The rule's own deontic negation ("Never ...", "do not have to") is what the frame
    # stands for; any other negation the rule has may appear in the question too.
    action = _DEONTIC_NEGATION.sub(" ", clause.text, count=1)
    added = ({m.lower() for m in _NEGATIONS.findall(question_body)}
             - {m.lower() for m in _NEGATIONS.findall(action)})
    if added:
        return "negation_added"
    return None


def faithful_answer(answer: str, clause: Clause) -> str:
    """The verdict, then the rule as the document words it."""
    text = clause.text.strip()
    return f"{answer.capitalize()}. {text[0].upper() + text[1:]}"


def _read_question(text: str, constrained: bool) -> str | None:
    line = text.split("\n", 1)[0]
    if "?" not in line:
        return None
    body = line[:line.index("?") + 1]
    if not constrained:
        body = body.rstrip()
    return body if len(body.strip(" ?")) >= 3 else None


def _read_rest(text: str) -> str | None:
    """The rest of the unfaithful sentence: " <words>." (leading space kept)."""
    m = re.match(r"( [a-z][^\n.!?\"{}]{3,}[.!])", text)
    return m.group(1) if m else None


def stance_of(clause: Clause, *, key: str) -> str:
    """The opening of the unfaithful reason for a rule: the opposite stance (see STANCES)."""
    kind = "not_required" if NOT_REQUIRED.search(clause.text) else clause.kind
    options = STANCES[kind]
    return options[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
                   % len(options)]


def _incomplete(teacher, n: int) -> list[bool]:
    """Which outputs of the teacher's last call were cut by the budget before the
    constraint accepted (a local teacher says; others' texts are checked when read)."""
    flags = getattr(teacher, "last_incomplete", None)
    return list(flags) if flags is not None and len(flags) == n else [False] * n


def _encoder_cosines(name: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
    import numpy as np

    from align_jax.models.encoder import embed_sentences, load_encoder
    from align_jax.models.named import resolve_model_path
    from align_jax.tokenizer import load_tokenizer
    enc = _ENCODERS.get(name)
    if enc is None:
        path = resolve_model_path(name)
        enc = _ENCODERS[name] = (*load_encoder(path), load_tokenizer(path))
    if not pairs:
        return []
    a = embed_sentences(*enc, [p for p, _ in pairs])
    b = embed_sentences(*enc, [r for _, r in pairs])
    return [float(x) for x in np.sum(a * b, axis=1)]


_ENCODERS: dict = {}


def generate_yes_no(teacher: Teacher, chunks: Sequence[Chunk], *, seed: int,
                    config: YesNoConfig = YesNoConfig(),
                    templates: Mapping[str, str | Template] | None = None,
                    round_index: int = 0) -> list[UnitResult]:
    """Yes/no SFT records and preference pairs for a batch of chunks.

    Args:
      teacher: any Teacher (constrained when it `applies_constraints`).
      chunks: the batch; one unit per chunk.
      seed: the batch seed.
      config: settings.
      templates: overrides for "yes_no_question" / "yes_no_unfaithful".
      round_index: the round (frames differ per round; the first `config.greedy_rounds`
        rounds are greedy, later ones sampled).
    Returns:
      One UnitResult per chunk with kinds "sft" and "preference".
    """
    t = resolve_templates(TEMPLATES, templates)
    q_tpl = t["yes_no_question"].require(["rule", "frame"])
    u_tpl = t["yes_no_unfaithful"].require(["rule", "question", "verdict", "stance"])
    results = [UnitResult(unit=unit_id(c)) for c in chunks]
    constrained = bool(getattr(teacher, "applies_constraints", False))
    q_con = q_tpl.output_constraint() if constrained else None
    s_con = u_tpl.output_constraint() if constrained else None
    if config.frames not in ("direct", "mixed"):
        raise ValueError(f"YesNoConfig.frames={config.frames!r}: use 'direct' or 'mixed'")
    rules = [(i, n, c) for i, chunk in enumerate(chunks)
             for n, c in enumerate(extract_clauses(chunk.text))]
    counts = direct_counts([c for *_, c in rules], config.questions_per_rule)
    jobs = []  # (result index, clause, frame, answer, prompt)
    for i, n, clause in rules:
        key = f"{chunks[i].id}/{n}/{round_index}"
        if config.frames == "direct":
            frames = direct_frames(clause, key=f"{chunks[i].id}/{n}", count=counts[clause.kind],
                                   round_index=round_index)
            answers = [DIRECT_ANSWER[clause.kind]] * len(frames)
        else:
            frames = pick_frames(clause, key=key, count=config.questions_per_rule)
            answers = [FRAMES[f][clause.kind] for f in frames]
        for frame, answer in zip(frames, answers):
            jobs.append((i, clause, frame, answer,
                         q_tpl.render(rule=clause.text, frame=frame).rstrip("\n")))
    greedy = round_index < config.greedy_rounds
    outs = ask(teacher, [p for *_, p in jobs], use_chat=config.use_chat,
               temperature=0.0 if greedy else config.question_temperature,
               top_p=config.question_top_p, max_tokens=config.question_max_tokens,
               seed=derive_seed(seed, "questions"), constraint=q_con,
               owners=[results[i] for i, *_ in jobs])
    # Teachers that refused the constraint fall back to plain text: read it either way.
    constrained = constrained and bool(getattr(teacher, "applies_constraints", False))
    cut = _incomplete(teacher, len(outs))
    questions = []  # (result index, clause, frame, answer, question)
    for k, ((i, clause, frame, answer, _), out) in enumerate(zip(jobs, outs)):
        results[i].calls += 1
        if cut[k]:
            results[i].reject("incomplete", out, step="question")
            continue
        body = _read_question(out, constrained)
        if body is None:
            results[i].reject("no_question", out, step="question")
            continue
        problem = question_problem(body, clause, min_overlap=config.min_overlap)
        if problem:
            results[i].reject(problem, frame + body, step="question", rule=clause.text)
            continue
        questions.append((i, clause, frame, answer, frame + " " + body.strip()))
    if config.min_cosine is not None and questions:
        cos = _encoder_cosines(config.encoder, [(q, c.text) for _, c, _, _, q in questions])
        kept = []
        for job, c in zip(questions, cos):
            if c < config.min_cosine:
                results[job[0]].reject("not_grounded", job[4], step="question", cosine=c)
            else:
                kept.append(job)
        questions = kept
    wrong = {"yes": "No", "no": "Yes"}
    stances = [stance_of(c, key=q) for _, c, _, _, q in questions]
    prompts = [u_tpl.render(rule=c.text, question=q, verdict=wrong[a], stance=st).rstrip("\n")
               for (_, c, _, a, q), st in zip(questions, stances)]
    outs = ask(teacher, prompts, use_chat=config.use_chat, temperature=0.0,
               max_tokens=config.unfaithful_max_tokens, seed=derive_seed(seed, "unfaithful"),
               constraint=s_con, owners=[results[i] for i, *_ in questions])
    cut = _incomplete(teacher, len(outs))
    for k, ((i, clause, frame, answer, question), stance, out) in enumerate(
            zip(questions, stances, outs)):
        results[i].calls += 1
        chunk = chunks[i]
        meta = {"chunk_id": chunk.id, "source": chunk.source, "answer": answer,
                "rule": clause.text, "rule_kind": clause.kind, "frame": frame}
        chosen = faithful_answer(answer, clause)
        results[i].add("sft", {"prompt": question, "completion": chosen, **meta})
        rest = None if cut[k] else _read_rest(out)
        problem = None
        if cut[k]:
            problem = "incomplete"
        elif rest is None:
            problem = "no_sentence"
        elif _NEGATIONS.search(rest):
            # "You can" + "not work alone" argues for the rule it should contradict.
            problem = "unfaithful_self_contradicting"
        elif not (_stems(rest) & (_stems(clause.text) | _stems(question))):
            problem = "unfaithful_off_topic"
        if problem:
            results[i].reject(problem, stance + out, step="unfaithful", question=question)
            continue
        rejected = f"{wrong[answer]}. {stance}{rest}"
        results[i].add("preference", {"prompt": question, "chosen": chosen,
                                      "rejected": rejected, **meta})
    return results


def _order(record: Mapping) -> bytes:
    return hashlib.sha256(str(record.get("prompt", "")).encode()).digest()


def balance_records(records: Sequence[dict], *, shorter_range=(0.3, 0.7),
                    max_length_drop: float = 0.5) -> tuple[list[dict], list[dict]]:
    """Keeps as many yes/no records as balance allows (records without "answer" all stay).

    Answers become 50/50 (the larger side is trimmed); for preference records the chosen
    answer is also brought towards being the shorter one in `shorter_range` of each
    polarity's pairs, dropping at most `max_length_drop` of them for it, so that length is a
    weak cue in training. Which records go is decided by a hash of the prompt, so a rerun
    keeps the same ones.

    Args:
      records: deduplicated records of one kind.
      shorter_range: wanted share of pairs whose chosen answer is the shorter one.
      max_length_drop: most of a polarity's pairs the length balance may drop.
    Returns:
      (kept in their original order, removed with "reason": "balance").
    """
    graded = sorted((r for r in records if r.get("answer") in ("yes", "no")), key=_order)
    paired = any("chosen" in r for r in graded)
    lo, hi = shorter_range
    cells = {}
    for answer in ("yes", "no"):
        rows = [r for r in graded if r["answer"] == answer]
        short = [r for r in rows if paired and len(r["chosen"]) < len(r["rejected"])]
        other = [r for r in rows if not (paired and len(r["chosen"]) < len(r["rejected"]))]
        if paired:
            # The largest total whose shorter share lies in [lo, hi], within the drop budget.
            floor = (1 - max_length_drop) * len(rows)
            while short and len(short) > hi * (len(short) + len(other)) and \
                    len(short) + len(other) > floor:
                short.pop()
            while other and len(short) < lo * (len(short) + len(other)) and \
                    len(short) + len(other) > floor:
                other.pop()
        cells[answer] = (short, other)
    n = min(len(s) + len(o) for s, o in cells.values())
    keep = set()
    for short, other in cells.values():
        k = round(n * len(short) / max(1, len(short) + len(other)))
        keep.update(id(r) for r in short[:k] + other[:n - k])
    kept, removed = [], []
    for r in records:
        if r.get("answer") in ("yes", "no") and id(r) not in keep:
            removed.append({**r, "reason": "balance"})
        else:
            kept.append(r)
    return kept, removed
