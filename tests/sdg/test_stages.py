"""Each SDG stage driven by scripted teachers, including garbage that must be counted."""

import collections
import json

import pytest
from scripted_teacher import ScriptedTeacher

from align_jax.data.documents import Chunk, chunk_id
from align_jax.sdg import aligner_data, instruct, preference, principles, templates
from align_jax.sdg.teacher import Teacher


class FunctionTeacher(ScriptedTeacher):
    """Answers with fn(role, prompt) and records every prompt it was sent."""

    def __init__(self, fn, **kw):
        super().__init__(**kw)
        self.fn = fn
        self.prompts = []

    def complete(self, prompts, *, temperature, top_p=1.0, max_tokens, seed=None,
                 repetition_penalty=1.0):
        self.calls.append({"n": len(prompts), "temperature": temperature, "top_p": top_p,
                           "max_tokens": max_tokens, "seed": seed,
                           "repetition_penalty": repetition_penalty})
        self.prompts.extend(prompts)
        return [self.fn(self.role_of(p), p) for p in prompts]


def _chunk(text):
    return Chunk(id=chunk_id(text), source="doc.md", text=text, start=0, end=len(text),
                 num_tokens=len(text.split()))


def _reasons(results):
    return collections.Counter(r["reason"] for res in results for r in res.rejects)


def test_scripted_teacher_satisfies_protocol():
    assert isinstance(ScriptedTeacher(), Teacher)


def test_templates_load_render_and_validate(tmp_path):
    roles = [*instruct.TEMPLATES, *preference.TEMPLATES, *aligner_data.TEMPLATES]
    for role in roles:
        t = templates.load_template(role)
        assert t.fields and "{" not in t.render(**{f: "X" for f in t.fields}).replace("{\"", "")
    t = templates.load_template("instruct_questions")
    assert t.fields == {"passage", "nex", "keyword"}
    with pytest.raises(ValueError, match=r"instruct_questions.txt: no value .*'passage'"):
        t.render(nex=1, keyword="k")
    custom = tmp_path / "mine.txt"
    custom.write_text("# doc\n#   {x}: thing\n---\nAsk {x} about {{json}}\n")
    t = templates.load_template(custom)
    assert t.name == "mine" and t.fields == {"x"} and t.render(x="1") == "Ask 1 about {json}\n"
    with pytest.raises(ValueError, match="must use placeholder"):
        t.require(["passage"])
    bad = tmp_path / "bad.txt"
    bad.write_text("unbalanced {brace")
    with pytest.raises(ValueError, match="bad.txt"):
        templates.load_template(bad)
    with pytest.raises(FileNotFoundError, match="no SDG template"):
        templates.load_template("does_not_exist")
    with pytest.raises(ValueError, match="unknown template role"):
        templates.resolve_templates({"a": "instruct_answer"}, {"b": custom}, strict=True)


def test_instruct_stage_counts_every_question():
    chunks = [_chunk("Rule one: be honest in every record."), _chunk("Rule two: wear a helmet.")]

    def fn(role, prompt):
        if role == "instruct_questions":
            if "honest" in prompt:
                return ('Sure:\n```json\n{"question": "Can I round my hours up?"}\n'
                        '{"question": "Who fixes a wrong record?"}\n'
                        '{"question": "Must I log travel time?"}\n'
                        '{"question": "Another one over nex?"}\n{"question": "cut o')
            return "1. Is a helmet required on roofs?\n2. @@ ## %% !! ** && ^^ ~~ ++"
        assert role == "instruct_answer"
        assert "Using only the context above" in prompt
        if "travel time" in prompt:
            return ""
        return "Answer: Yes, the context requires it."

    teacher = FunctionTeacher(fn)
    results = instruct.generate_instruct(
        teacher, chunks, seed=3, config=instruct.InstructConfig(nex=3, keyword="rights"))
    assert [r.unit for r in results] == [f"instruct/{c.id}" for c in chunks]
    sft = [rec for r in results for rec in r.records.get("sft", [])]
    assert [s["prompt"] for s in sft] == ["Can I round my hours up?", "Who fixes a wrong record?",
                                          "Is a helmet required on roofs?"]
    assert all(s["completion"] == "Yes, the context requires it." for s in sft)
    assert [s["chunk_id"] for s in sft] == [chunks[0].id] * 2 + [chunks[1].id]
    assert _reasons(results) == {"invalid_json": 1, "extra_question": 1, "empty": 1,
                                 "non_text": 1}
    # One sampled call for questions, one greedy call for answers, across both chunks.
    q_call, a_call = teacher.calls
    assert q_call["n"] == 2 and q_call["temperature"] > 0 and q_call["top_p"] < 1
    assert a_call["n"] == 4 and a_call["temperature"] == 0.0
    assert "probe the rights" in teacher.prompts[0]
    assert "3 different questions" in teacher.prompts[0]


def test_instruct_rejects_prompts_that_overflow_the_context():
    chunk = _chunk("word " * 50)
    teacher = FunctionTeacher(
        lambda role, p: '{"question": "' + "long " * 200 + '?"}' if role == "instruct_questions"
        else "fine answer", context_length=800)
    results = instruct.generate_instruct(
        teacher, [chunk], seed=0, config=instruct.InstructConfig(answer_max_tokens=600))
    assert _reasons(results) == {"prompt_too_long": 1} and not results[0].records
    teacher.context_length = 2000
    results = instruct.generate_instruct(
        teacher, [chunk], seed=0, config=instruct.InstructConfig(answer_max_tokens=600))
    assert not results[0].rejects and len(results[0].records["sft"]) == 1


def test_preference_stage_filters_and_pairs():
    chunks = [_chunk("Gifts over thirty euros must be refused."), _chunk("Contents page 1 2 3"),
              _chunk("Unclear passage here.")]

    def fn(role, prompt):
        if role == "values_filter":
            if "Gifts" in prompt:
                return "Yes. It sets a limit on gifts."
            if "Contents" in prompt:
                return "No - just a table of contents."
            return "I am not sure."
        assert role == "preference_pairs" and "Gifts" in prompt
        return "\n".join([
            json.dumps({"question": "A supplier offers me a 50 euro voucher. OK?",
                        "faithful": "No, refuse it: gifts over thirty euros are not allowed.",
                        "unfaithful": "Sure, vouchers are always fine to keep."}),
            json.dumps({"question": "Same answers?", "faithful": "Refuse the gift politely.",
                        "unfaithful": "Refuse the gift politely."}),
            json.dumps({"question": "Missing one", "faithful": "x"}),
        ])

    teacher = FunctionTeacher(fn)
    results = preference.generate_preference(teacher, chunks, seed=1)
    filters = [r.records["values_filter"][0] for r in results]
    assert [f["passes"] for f in filters] == [True, False, None]
    assert filters[0]["reason"] == "It sets a limit on gifts."
    assert filters[1]["reason"] == "just a table of contents."
    pref = results[0].records["preference"]
    assert pref == [{"prompt": "A supplier offers me a 50 euro voucher. OK?",
                     "chosen": "No, refuse it: gifts over thirty euros are not allowed.",
                     "rejected": "Sure, vouchers are always fine to keep.",
                     "chunk_id": chunks[0].id, "source": "doc.md"}]
    assert "preference" not in results[1].records and "preference" not in results[2].records
    assert _reasons(results) == {"chosen_equals_rejected": 1, "missing_field:unfaithful": 1,
                                 "no_verdict": 1}
    assert [c["n"] for c in teacher.calls] == [3, 1]  # only the passing chunk gets pairs


def test_principles_and_constitutions(tmp_path):
    teacher = ScriptedTeacher()
    found, rejects = principles.write_principles(
        teacher, task="answering user questions", principles=["helpful", "concise", "honest"])
    assert [p["name"] for p in found] == ["helpful", "concise", "honest"] and rejects == []
    cons = principles.make_constitutions(found)
    assert len(cons) == 8 and len({c["id"] for c in cons}) == 8
    assert cons[0]["negated"] == [False] * 3 and cons[0]["id"] == "c000"
    for c in cons:
        for text, neg, p in zip(c["principles"], c["negated"], found):
            assert text == (p["antithesis"] if neg else p["definition"])
        assert c["id"] == "c" + "".join(str(int(n)) for n in c["negated"])
    assert {tuple(c["negated"]) for c in cons} == {(a, b, d) for a in (False, True)
                                                  for b in (False, True) for d in (False, True)}
    # A writer that returns too few principles is an error that shows its output.
    one = '{"principle": "helpful", "definition": "d", "antithesis": "a"}'
    bad = FunctionTeacher(lambda role, p: one)
    with pytest.raises(ValueError, match="1 usable principles, 2 wanted"):
        principles.write_principles(bad, task="t", principles=["helpful", "concise"])
    # User-written principles.
    f = tmp_path / "p.jsonl"
    f.write_text('{"name": "concise", "definition": "Be brief.", "antithesis": "Ramble."}\n'
                 '{"principle": "kind", "definition": "Be kind.", "antithesis": "Be cruel."}\n')
    loaded = principles.load_principles(f)
    assert [p["name"] for p in loaded] == ["concise", "kind"]
    assert len(principles.make_constitutions(loaded)) == 4
    f.write_text('{"name": "concise", "definition": "Be brief."}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'antithesis'"):
        principles.load_principles(f)


def test_aligner_inputs_topics_and_questions():
    seeds = aligner_data.load_seed_questions()
    assert len(seeds) == 20 and len({s["question_type"] for s in seeds}) == 20
    cfg = aligner_data.AlignerDataConfig(rounds=2, topics_per_round=10, questions_per_call=7)
    teacher = ScriptedTeacher()
    topics, rejects = aligner_data.brainstorm_topics(teacher, seeds[:3], seed=0, config=cfg)
    reasons = collections.Counter(r["reason"] for r in rejects)
    # Each round and type: one repeat of a known topic and one over-long topic are dropped.
    assert reasons["duplicate_topic"] >= 6 and reasons["topic_too_long"] == 6
    for t, ts in topics.items():
        norm = [x.lower() for x in ts]
        assert len(norm) == len(set(norm))
        assert not set(norm) & {s["topic"].lower() for s in seeds if s["question_type"] == t}
    assert len(teacher.calls) == 2 and all(c["n"] == 3 for c in teacher.calls)
    questions, q_rejects = aligner_data.write_questions(teacher, seeds[:3], topics, seed=0,
                                                        concurrency=2, config=cfg)
    n_hints = sum(len(v) for v in topics.values())
    assert len(questions) + sum(r["reason"].endswith("duplicate") for r in q_rejects) == n_hints
    for q in questions:
        assert q["question_id"] == aligner_data.question_id(q["question"])
        assert q["topic"] in topics[q["question_type"]]


def test_aligner_triples_and_inspector_labels():
    questions = [{"question": f"Question number {i} about ethics?",
                  "question_id": aligner_data.question_id(f"q{i}")} for i in range(4)]
    outputs = {
        0: "You are an idiot.\nCritique: Rude, breaks principle 2.\nAligned response: Here is "
           "a respectful answer with the facts.\n\nQuestion:\ninvented\nFirst response:\nmore",
        1: "The same answer.\nCritique: Nothing to change.\nAligned response: The same answer.",
        2: "Bad.\nCritique: Bad.\nAligned response: Better answer. Critique: leaked marker",
        3: "Only a response, no critique.",
    }

    def fn(role, prompt):
        assert role == "aligner_factuality" and prompt.rstrip().endswith("First response:")
        i = int(prompt.split("Question number ")[-1].split()[0])
        return outputs[i]

    teacher = FunctionTeacher(fn)
    results = aligner_data.generate_aligner(teacher, questions, criterion="factuality", seed=0)
    # The paper's decoding for triples: greedy, repetition penalty 2, 1500 new tokens.
    assert [(c["temperature"], c["repetition_penalty"], c["max_tokens"]) for c in teacher.calls
            ] == [(0.0, 2.0, 1500)]
    assert results[0].records["aligner"] == [{
        "input": questions[0]["question"], "initial_response": "You are an idiot.",
        "critique": "Rude, breaks principle 2.",
        "aligned_response": "Here is a respectful answer with the facts.",
        "criterion": "factuality", "question_id": questions[0]["question_id"]}]
    assert [(r["response"], r["label"]) for r in results[0].records["inspector"]] == [
        ("You are an idiot.", 0), ("Here is a respectful answer with the facts.", 1)]
    assert _reasons(results) == {"identity_rewrite": 1, "leaked_marker": 1,
                                 "missing_section:Critique": 1}
    assert aligner_data.clean_triple("x?", "The cat sat on the mat today.", "c",
                                     "The cat sat on the mat today!") == "near_identical_rewrite"
    with pytest.raises(ValueError, match="unknown criterion"):
        aligner_data.generate_aligner(ScriptedTeacher(), questions, criterion="funny", seed=0)


def test_pair_similarity_filter_is_optional():
    chunks = [_chunk("Gifts over thirty euros must be refused.")]
    minimal = {"question": "May I keep a 50 euro voucher from a supplier?",
               "faithful": "No, you must refuse gifts over thirty euros from a supplier.",
               "unfaithful": "Yes, you may keep gifts over thirty euros from a supplier."}
    same = {"question": "Same?", "faithful": "Refuse it.", "unfaithful": "refuse  it."}

    def fn(role, prompt):
        if role == "values_filter":
            return "Yes. Gifts."
        return "\n".join(json.dumps(x) for x in (minimal, same))

    # Independent check that the minimal contrast is above the default threshold.
    def bigrams(text):
        w = text.lower().split()
        return set(zip(w, w[1:]))
    a, b = bigrams(minimal["faithful"]), bigrams(minimal["unfaithful"])
    assert len(a & b) / len(a | b) < 0.8 <= 1.0  # sanity of the fixture itself
    strict = preference.PreferenceConfig(max_pair_similarity=0.4)
    results = preference.generate_preference(FunctionTeacher(fn), chunks, seed=1, config=strict)
    assert "preference" not in results[0].records
    assert _reasons(results) == {"chosen_similar_to_rejected": 1, "chosen_equals_rejected": 1}
    off = preference.PreferenceConfig(max_pair_similarity=None)
    results = preference.generate_preference(FunctionTeacher(fn), chunks, seed=1, config=off)
    assert [r["prompt"] for r in results[0].records["preference"]] == [minimal["question"]]
    assert _reasons(results) == {"chosen_equals_rejected": 1}  # identical texts always go


def test_copies_of_the_templates_example_placeholders_are_rejected():
    # What SmolLM2-135M wrote for 5 of the 7 pairs it kept on the example document.
    pair_tpl = templates.load_template("preference_pairs")
    assert pair_tpl.example_values == {
        "a situation or dilemma", "an answer that respects the passage",
        "a wrong answer that goes against the passage"}
    assert templates.load_template("values_filter").example_values == frozenset()
    chunks = [_chunk("Gifts over thirty euros must be refused.")]
    echo = {"question": "Why we have a code", "faithful": "An answer that respects the passage.",
            "unfaithful": "a wrong answer that goes against  the passage"}
    good = {"question": "A supplier offers me a 50 euro voucher. OK?",
            "faithful": "No, refuse it: gifts over thirty euros are not allowed.",
            "unfaithful": "Sure, vouchers are always fine to keep."}
    partly = dict(good, question="A situation or dilemma")

    def pairs(role, prompt):
        if role == "values_filter":
            return "Yes. It sets a limit on gifts."
        return "\n".join(json.dumps(x) for x in (echo, good, partly))

    results = preference.generate_preference(FunctionTeacher(pairs), chunks, seed=1)
    assert [p["prompt"] for p in results[0].records["preference"]] == [good["question"]]
    assert _reasons(results) == {"template_echo": 2}

    def questions(role, prompt):
        if role == "instruct_questions":
            return ('{"question": "A question, ideally set in a concrete situation."}\n'
                    '{"question": "Can I keep a 50 euro voucher from a supplier?"}')
        return "No, refuse it."

    results = instruct.generate_instruct(FunctionTeacher(questions), chunks, seed=3,
                                         config=instruct.InstructConfig(nex=3))
    assert [s["prompt"] for s in results[0].records["sft"]] == [
        "Can I keep a 50 euro voucher from a supplier?"]
    assert _reasons(results) == {"template_echo": 1}
