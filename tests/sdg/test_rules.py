"""Rule clauses of a document: what the heuristics read, and what they leave alone."""

import collections
import os

import pytest

from align_jax.data.documents import load_document
from align_jax.sdg.rules import classify, extract_clauses, sentences

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


@pytest.mark.parametrize("clause, kind", [
    ("Never work on a roof alone.", "prohibits"),
    ("Do not accept cash from a supplier.", "prohibits"),
    ("Personal purchases must never go on a cooperative card.", "prohibits"),
    ("Member lists are never sold, lent or used for private work.", "prohibits"),
    ("Report every near miss within the same working day.", "requires"),
    ("If you make a mistake with a card, report it to the finance coordinator.", "requires"),
    ("Log your hours as you actually worked them, not as they were planned.", "requires"),
    ("Every worker must wear a helmet on site.", "requires"),
    ("Small gifts may be accepted and shared with the team.", "permits"),
    ("You do not have to say what the medicine is.", "permits"),
    ("You are free to talk about your own life in public.", "permits"),
    ("Every worker has the right to stop a job that looks unsafe.", "permits"),
    # Not rules for the reader: the organisation, descriptions, questions, fragments.
    ("We do not offer gifts to public officials.", None),
    ("Our purpose is a cleaner energy system.", None),
    ("Nobody will be blamed for stopping work in good faith.", None),
    ("Respect extends to members and the public.", None),
    ("Is it honest?", None),
    ("if you must open a file", None),
    ("Estimates are estimates.", None),
])
def test_classify(clause, kind):
    assert classify(clause) == kind


def test_sentences_and_clauses_of_a_compound_sentence():
    assert sentences("One rule. Two rules? Three!") == ["One rule.", "Two rules?", "Three!"]
    text = ("## Safety\n\nOn solar sites, wear the listed equipment, follow the lockout "
            "procedure before touching a component, and never work on a roof alone.")
    got = [(c.kind, c.text, c.section) for c in extract_clauses(text)]
    assert got == [
        ("requires", "On solar sites, wear the listed equipment.", "Safety"),
        ("requires", "follow the lockout procedure before touching a component.", "Safety"),
        ("prohibits", "never work on a roof alone.", "Safety")]
    # A leading condition stays with the clause it conditions.
    (c,) = extract_clauses("If refusing a gift would cause offence, accept it for the team.")
    assert c.kind == "requires" and c.text.startswith("If refusing a gift")


def test_example_document_rules():
    doc = load_document(os.path.join(EXAMPLES, "values_document.md")).text
    clauses = extract_clauses(doc)
    kinds = collections.Counter(c.kind for c in clauses)
    # Every kind is found, and most sections hold at least one rule.
    assert set(kinds) == {"prohibits", "requires", "permits"} and len(clauses) >= 50
    sections = {c.section for c in clauses}
    headings = {line.lstrip("#").strip() for line in doc.splitlines() if line.startswith("## ")}
    assert len(sections & headings) >= len(headings) - 2
    by_text = {c.text.lower(): c.kind for c in clauses}
    assert by_text["never work on a roof alone."] == "prohibits"
    assert by_text["you do not have to say what the medicine is."] == "permits"
    assert by_text[("small tokens of thanks, such as a box of biscuits from a grateful member, "
                    "may be accepted and shared with the team.")] == "permits"
    assert not any(t.startswith(("we ", "our ")) for t in by_text)
    # Each clause is a piece of its sentence, and the sentence is in the document.
    for c in clauses:
        assert c.sentence in doc
        assert c.text.rstrip(".").lower()[-20:] in c.sentence.lower()
