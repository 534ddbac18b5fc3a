"""Tolerant parsing of teacher outputs; fuzzed so no input string can make it raise."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_jax.sdg import parsing, principles

Q = ("question",)
P = ("question", "faithful", "unfaithful")


def test_jsonl_in_prose_and_fences_with_truncated_last_line():
    text = ('Sure! Here you go:\n```json\n{"question": "Can I accept a gift?"}\n'
            '{"Question": "  Who decides on conflicts? "}\n```\nand one more\n'
            '{"question": "What about trav')
    items, rejects = parsing.parse_json_records(text, required=Q)
    assert items == [{"question": "Can I accept a gift?"},
                     {"question": "Who decides on conflicts?"}]
    assert [r["reason"] for r in rejects] == ["invalid_json"]
    assert rejects[0]["text"].startswith('{"question": "What about')


def test_json_array_and_field_validation():
    objs = [{"question": "q1", "faithful": "f", "unfaithful": "u"},
            {"question": "q2", "faithful": "f"},
            {"question": "q3", "faithful": "", "unfaithful": "u"},
            {"question": "q4", "faithful": ["f"], "unfaithful": "u"},
            {"question": 5, "faithful": "f", "unfaithful": "u"},
            {"question": "Q1 ", "faithful": "f", "unfaithful": "u"}]
    items, rejects = parsing.parse_json_records(json.dumps(objs), required=P)
    assert [i["question"] for i in items] == ["q1", "5"]
    assert [r["reason"] for r in rejects] == [
        "missing_field:unfaithful", "empty_field:faithful", "non_string_field:faithful",
        "duplicate_in_output"]


def test_list_fallback_only_without_json():
    text = ("Questions:\n1. First one?\n2) \"Second one?\"\n- Question: third one?\n"
            "* **Fourth?**\nnot an item")
    items, rejects = parsing.parse_json_records(text, required=Q, list_key="question")
    assert [i["question"] for i in items] == ["First one?", "Second one?", "third one?", "Fourth?"]
    assert rejects == []
    items, rejects = parsing.parse_json_records("I cannot help with that.", required=Q,
                                                list_key="question")
    assert items == [] and [r["reason"] for r in rejects] == ["no_items"]
    # With JSON present the list is not used.
    items, _ = parsing.parse_json_records('1. a list item\n{"question": "json"}', required=Q,
                                          list_key="question")
    assert items == [{"question": "json"}]


def test_yes_no_with_reason():
    cases = {
        "Yes. It sets rules on gifts.": (True, "It sets rules on gifts."),
        "**No** - only an address list.": (False, "only an address list."),
        "Answer: yes\nReason: it forbids bribes": (True, "it forbids bribes"),
        "no": (False, ""),
        '{"answer": "No", "reason": "a table of contents"}': (False, "a table of contents"),
        '```json\n{"verdict": true, "reason": "values"}\n```': (True, "values"),
        "Final answer: No, because it is boilerplate.": (False, "because it is boilerplate."),
        "Hmm, hard to say.": (None, "no_verdict"),
        "Yesterday it rained.": (None, "no_verdict"),
        "Nobody knows.": (None, "no_verdict"),
    }
    for text, expected in cases.items():
        assert parsing.parse_yes_no(text) == expected, text


def test_sections_with_implicit_first_and_stop_label():
    labels = ("First response", "Critique", "Aligned response")
    text = ("You are wrong.\n**Critique:** rude.\nAligned response: Here is a kind answer.\n\n"
            "Question:\nnext invented example\nFirst response:\nmore")
    out, why = parsing.parse_sections(text, labels, stop_labels=("Question",))
    assert why == "" and out == {"First response": "You are wrong.", "Critique": "rude.",
                                 "Aligned response": "Here is a kind answer."}
    out, why = parsing.parse_sections("First response: a\nCritique: b\n", labels)
    assert out is None and why == "missing_section:Aligned response"
    out, why = parsing.parse_sections("a\nCritique:\nAligned response: c", labels)
    assert out is None and why == "empty_section:Critique"
    # A repeated label starts a new example and ends the parse.
    out, _ = parsing.parse_sections("a\nCritique: b\nAligned response: c\nCritique: d", labels)
    assert out["Aligned response"] == "c"


def test_text_problem():
    assert parsing.text_problem("A fine answer.") is None
    assert parsing.text_problem("206") is None
    assert parsing.text_problem("   ") == "empty"
    assert parsing.text_problem("@@ ## 12 %% !! ** 99 && ^^") == "non_text"
    assert parsing.text_problem("ok\x00bad") == "non_text"
    assert parsing.text_problem("x" * 30, max_chars=10) == "too_long"
    assert parsing.text_problem("see Critique: here", markers=("critique:",)) == "leaked_marker"


_JSONISH = st.text(alphabet=st.sampled_from(list('{}[]":,\\ \n\tabcyesnoQuestion:1.-*`\x00\u00e9')),
                   max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), _JSONISH))
def test_fuzz_parsers_never_raise(text):
    items, rejects = parsing.parse_json_records(text, required=P)
    assert all(set(i) == set(P) for i in items)
    assert all(isinstance(r["reason"], str) for r in rejects)
    items, _ = parsing.parse_json_records(text, required=Q, optional=("topic",),
                                          list_key="question")
    assert all(i["question"] for i in items)
    verdict, reason = parsing.parse_yes_no(text)
    assert verdict in (True, False, None) and isinstance(reason, str)
    out, why = parsing.parse_sections(text, ("A", "Critique", "Aligned response"),
                                      stop_labels=("Question",))
    assert (out is None) == bool(why)
    parsing.parse_list_items(text)
    parsing.text_problem(text, markers=("Critique:",))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"question": st.text(min_size=1, max_size=40)}), max_size=6),
       st.integers(min_value=0, max_value=80))
def test_fuzz_truncated_jsonl_keeps_complete_lines(objs, cut):
    lines = [json.dumps(o) for o in objs]
    text = "\n".join(lines)
    truncated = text[:max(0, len(text) - cut)]
    items, _ = parsing.parse_json_records(truncated, required=Q)
    complete = [json.loads(line) for line in lines
                if truncated.find(line) >= 0 and truncated.find(line) + len(line) <= len(truncated)]
    expected = []
    for o in complete:
        q = o["question"].strip()
        if q and " ".join(q.lower().split()) not in [" ".join(e.lower().split()) for e in expected]:
            expected.append(q)
    # Every complete line's question is recovered (modulo dedup and whitespace-only values).
    assert [i["question"] for i in items][:len(expected)] == expected


def test_question_lines_fallback_for_a_small_teacher():
    # What SmolLM2-135M wrote for the instruct prompt: no JSON, no list, questions on lines.
    text = ('A question:\n```\n[1] "How do we keep a code that is not fair?"\n\nThe answer:\n'
            '[3] "The code is not fair."\n\nQuestion 2:\n[2] "What are the benefits of a code?"'
            '\n**Question:** "Can I keep a gift?"\nWhy?\n')
    items, rejects = parsing.parse_json_records(text, required=("question",),
                                                list_key="question")
    assert [i["question"] for i in items] == ["How do we keep a code that is not fair?",
                                              "What are the benefits of a code?",
                                              "Can I keep a gift?"]
    assert rejects == []
    # A numbered list still wins, and JSON wins over both.
    assert [i["question"] for i in parsing.parse_json_records(
        "1. Is it fair?\nIs this one a question line?", required=("question",),
        list_key="question")[0]] == ["Is it fair?"]
    assert parsing.parse_json_records('{"question": "Q one?"}\nIs it a line question?',
                                      required=("question",), list_key="question")[0] == [
        {"question": "Q one?"}]


def test_deeply_nested_json_is_a_reject_not_a_crash(tmp_path):
    deep = '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for items, rejects in (parsing.json_lines(deep, required=Q),
                           parsing.parse_json_records(deep, required=Q)):
        assert items == [] and [r["reason"] for r in rejects] == ["invalid_json"]
    path = tmp_path / "principles.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"principles.json: JSON nested too deeply"):
        principles.load_principles(path)
