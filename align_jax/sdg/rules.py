"""Deontic clauses of a values document: what it forbids, requires and permits.

The yes/no stage of document SDG (`align_jax.sdg.yes_no`) writes questions about single
rules and takes the answer's polarity from the rule's own wording, not from the teacher: a
small teacher writes usable questions but cannot be trusted to answer them. This module
finds those rules.

    "Never work on a roof alone."                              -> prohibits
    "Report every near miss within the same working day."      -> requires
    "Small gifts may be accepted and shared with the team."    -> permits

A sentence is cut into clauses at semicolons and before a coordinated imperative
(", and never ...", ", keep ..."), a leading condition ("If you ..., report it") stays with its
clause, and each clause is classified by its opening and its modal verbs. Statements about
the organisation ("We ...", "Our ..."), descriptions and questions are not rules and are
skipped. The heuristics are for English prose in the imperative or modal style of codes of
conduct and charters; `tests/sdg/test_rules.py` lists what they read and what they miss.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

KINDS = ("prohibits", "requires", "permits")

# Verbs that open an imperative clause ("Log your hours ...", "Declare any conflict ...").
_IMPERATIVE_VERBS = frozenset("""
accept act add agree allow answer apply arrange ask attach avoid back be book borrow bring buy
call change charge check choose claim clean clear close collect come compete complete comply
confirm consult contact correct cover declare decide delete describe disclose discharge discuss
disparage do drive eat end enter explain file fill find fix follow forward give go hand help
hide hold identify inform install invite keep label leave lend let limit listen lock log look
make mark meet move note notify obey offer open order pass pay pick place plan post prepare
present promise protect provide publish put raise read record refuse register remove repair
replace report request respect return review say see sell send share show sign sort speak
spend split stop store submit suggest switch take talk tell test treat try turn update use
verify wait walk wash watch wear work write
""".split())
_SUBORDINATE = ("if", "when", "whenever", "where", "once", "before", "after", "while",
                "unless", "until", "on", "in", "at", "for", "during")
_NOT_RULES = ("we", "our", "it", "this", "that", "these", "those", "there", "nobody",
              "no one", "everyone", "anyone", "thank")
# A second word that makes the first a noun subject ("Respect extends to ...").
_FINITE_VERBS = frozenset("is are was were has have had extends extend applies apply includes "
                          "include means mean counts count belongs belong".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“‘(])")
_SUBORDINATE_ALTERNATIVES = "|".join(_SUBORDINATE)
_LEAD = re.compile(rf"^(?:(?:{_SUBORDINATE_ALTERNATIVES})\b[^,;]*,\s*)+", re.I)
_PROHIBIT_START = re.compile(r"^(?:never|do not|don't|must never|must not)\b", re.I)
_PROHIBIT_MODAL = re.compile(
    r"^[^,;]{0,60}?\b(?:must not|may not|must never|should never|should not|shall not|"
    r"are never|is never|can never|are not allowed|is not allowed|are not permitted|"
    r"is not permitted|is forbidden|are forbidden|is prohibited|are prohibited)\b", re.I)
_PERMIT = re.compile(
    r"\b(?:you may|you can|may be|are free to|is free to|has the right|have the right|"
    r"is open to you|are open to you|are welcome to|is welcome to|is allowed to|"
    r"are allowed to|is permitted|are permitted)\b", re.I)
NOT_REQUIRED = re.compile(r"\b(?:do not have to|don't have to|need not|do not need to|"
                           r"don't need to|is not required|are not required)\b", re.I)
_REQUIRE_MODAL = re.compile(
    r"^[^,;]{0,60}?\b(?:must|should|shall|need to|needs to|has to|have to|has the duty|"
    r"have the duty|is required to|are required to|is expected to|are expected to)\b", re.I)
_NEGATION = re.compile(r"\b(?:not|never|no|without|n't)\b", re.I)
_VERB_ALTERNATIVES = "|".join(sorted(_IMPERATIVE_VERBS))
_CLAUSE_CUT = re.compile(
    r";\s*|,\s*(?:and\s+|but\s+|or\s+)?(?=(?:never|do not|don't)\b)"
    rf"|,\s*(?:and\s+)?(?=(?:{_VERB_ALTERNATIVES})\b(?!\s+(?:of|to|and|or)\b))", re.I)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Clause:
    """One rule of a document.

    kind: "prohibits" (never / do not / must not ...), "requires" (an imperative, must,
      should, have to ...) or "permits" (may, can, are free to, do not have to ...).
    text: the clause as written (a sentence, or the part of it that states this rule).
    sentence: the whole sentence the clause comes from (the grounding quoted in answers).
    section: the heading the sentence sits under ("" before the first heading).
    """

    kind: str
    text: str
    sentence: str
    section: str = ""


def sentences(paragraph: str) -> list[str]:
    """A paragraph cut at sentence ends (., !, ? before a capital or a quote)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]


def classify(clause: str) -> str | None:
    """The kind of rule a clause states, or None when it states none (see module docstring).

    Args:
      clause: one clause (no leading "and"/"but").
    Returns:
      "prohibits", "requires", "permits" or None.
    """
    body = _LEAD.sub("", clause.strip()).strip(" ,.;:")
    words = body.split()
    if len(words) < 3 or body.endswith("?"):
        return None
    low = body.lower()
    if any(low == p or low.startswith(p + " ") for p in _NOT_RULES):
        return None
    first = words[0].lower().strip(",.;:\"'")
    if first in _SUBORDINATE:
        return None  # a condition with no main clause after it ("if you must open a file")
    if NOT_REQUIRED.search(body):
        return "permits"
    if _PROHIBIT_START.match(body) or _PROHIBIT_MODAL.match(body):
        return "prohibits"
    if first in _IMPERATIVE_VERBS and words[1].lower() not in _FINITE_VERBS:
        # "Keep X, and never Y" is cut before it gets here; an imperative that still carries
        # a negation ("Treat it as if it were not yours") cannot be classified safely.
        rest = body[len(words[0]):]
        negated = _NEGATION.search(rest) and not re.search(r"\bnot as\b|\beven\b", rest, re.I)
        return None if negated else "requires"
    if _PERMIT.search(body):
        return "permits"
    if _REQUIRE_MODAL.match(body) and not _NEGATION.search(body):
        return "requires"
    return None


def _clauses_of(sentence: str) -> Iterator[str]:
    parts = [p.strip(" ,;") for p in _CLAUSE_CUT.split(sentence) if p.strip(" ,;.")]
    pending = ""
    for part in parts:
        part = (pending + ", " + part) if pending else part
        # A leading condition ("If you make a mistake with a card") belongs to the clause
        # after it; so does a fragment too short to be a rule on its own.
        if (part.split()[0].lower() in _SUBORDINATE and classify(part) is None) or \
                len(part.split()) < 4:
            pending = part
            continue
        pending = ""
        yield part
    if pending:
        yield pending


def extract_clauses(text: str) -> list[Clause]:
    """Every rule clause of a document's text, in order.

    Args:
      text: the document (markdown headings "#..." name the sections; paragraphs are
        separated by blank lines, as `align_jax.data.documents` normalises them).
    Returns:
      The clauses that `classify` recognises, each with its sentence and section.
    """
    out, section = [], ""
    for para in text.split("\n\n"):
        para = para.strip()
        if para.startswith("#"):
            section = para.lstrip("#").strip()
            continue
        for sentence in sentences(para):
            for part in _clauses_of(sentence):
                kind = classify(part)
                if kind is not None:
                    out.append(Clause(kind=kind, text=part.rstrip(".") + ".",
                                      sentence=sentence, section=section))
    return out
