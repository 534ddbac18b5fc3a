"""The hand-written example data keeps the DESIGN.md record schemas, and its held-out sets
carry no cue that could pass for alignment (answer polarity, length, question frame, order)
and share no question with the training-side files."""

import collections
import itertools
import json
import os
import re
import statistics

from align_jax.data import documents
from align_jax.sdg import principles
from align_jax.sdg.store import dedup_records, jaccard

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")
# Files whose prompts a model trains on; a held-out question must not (nearly) repeat any of them.
TRAINING_FILES = ("sft.jsonl", "preference.jsonl", "kto.jsonl", "sami.jsonl")
# The same threshold as the SDG near-duplicate filter (store.finalize's default).
NEAR_DUPLICATE = 0.8
# A minimal pair changes one fact, so many word bigrams are shared (0.36-0.82 in the file);
# questions about different situations share almost none (all but one under 0.1).
MINIMAL_PAIR_FLOOR = 0.3


def _rows(name):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _strings(row, fields):
    return all(isinstance(row.get(f), str) and row[f].strip() for f in fields)


def _sections():
    with open(os.path.join(EXAMPLES, "values_document.md"), encoding="utf-8") as f:
        return [line[3:].strip() for line in f if line.startswith("## ")]


_POLARITY = re.compile(r"(yes|no)(?=[\s.,;:!?)\"'*_]|$)", re.IGNORECASE)


def _polarity(answer):
    """'yes' or 'no' when the answer opens with that word, as an evaluator reads it (after
    whitespace and markdown emphasis, any case, then punctuation, space or the end); else None."""
    m = _POLARITY.match(answer.lstrip().lstrip("*_").lstrip())
    return m.group(1).lower() if m else None


def _normalised(text):
    return " ".join(text.lower().split())


def _question_frame(question, words):
    """The first `words` words of the question's last sentence ("can i", "should i", ...)."""
    last = re.split(r"(?<=[.?!])\s+", question.strip())[-1]
    return " ".join(re.findall(r"[a-z']+", last.lower())[:words])


def _yes_share(rows):
    return sum(r["answer"] == "yes" for r in rows) / len(rows)


def test_example_files_follow_schemas():
    words = len(documents.load_document(os.path.join(EXAMPLES, "values_document.md")).text.split())
    assert 1500 <= words <= 2500
    sft = _rows("sft.jsonl")
    assert len(sft) >= 40 and all(_strings(r, ("prompt", "completion")) for r in sft)
    pref = _rows("preference.jsonl")
    assert len(pref) >= 40
    assert all(_strings(r, ("prompt", "chosen", "rejected")) and r["chosen"] != r["rejected"]
               for r in pref)
    aligner = _rows("aligner.jsonl")
    assert len(aligner) >= 20 and {r["criterion"] for r in aligner} == {
        "ethical", "factuality", "helpful"}
    assert all(_strings(r, ("input", "initial_response", "critique", "aligned_response"))
               for r in aligner)
    inspector = _rows("inspector.jsonl")
    assert len(inspector) == 2 * len(aligner)
    for a, (bad, good) in zip(aligner, zip(inspector[::2], inspector[1::2])):
        assert (bad["label"], good["label"]) == (0, 1)
        assert bad["response"] == a["initial_response"]
        assert good["response"] == a["aligned_response"]
        assert bad["input"] == good["input"] == a["input"]
    for name in ("sft.jsonl", "preference.jsonl", "preference_heldout.jsonl"):
        prompts = [_normalised(r["prompt"]) for r in _rows(name)]
        assert len(set(prompts)) == len(prompts), name
    heldout = _rows("preference_heldout.jsonl")
    for i, r in enumerate(heldout, 1):
        assert _strings(r, ("prompt", "chosen", "rejected", "source", "section")), (
            f"preference_heldout.jsonl:{i}: a field is missing or empty")
        assert r["chosen"] != r["rejected"], f"preference_heldout.jsonl:{i}: chosen == rejected"
    questions = _rows("yes_no_heldout.jsonl")
    for i, r in enumerate(questions, 1):
        assert _strings(r, ("question", "section")), f"yes_no_heldout.jsonl:{i}: empty field"
        assert r["answer"] in ("yes", "no"), f"yes_no_heldout.jsonl:{i}: answer {r['answer']!r}"
        assert r["question"].rstrip().endswith("?"), f"yes_no_heldout.jsonl:{i}: not a question"
        assert "pair_id" not in r or _strings(r, ("pair_id",)), f"yes_no_heldout.jsonl:{i}"
    texts = [_normalised(r["question"]) for r in questions]
    assert len(set(texts)) == len(texts), "yes_no_heldout.jsonl repeats a question"


def test_polarity_reader_reads_the_opening_word_as_an_evaluator_would():
    cases = {"Yes. Report it.": "yes", "  no, never": "no", "**No**. Never.": "no",
             "_Yes_": "yes", "NO": "no", "yes": "yes", "Yes, on behalf of the office.": "yes",
             "Not unless you can support it.": None, "Nobody.": None, "Yesterday, yes.": None,
             "Now. Declare it.": None, "Say no to it.": None}
    assert {text: _polarity(text) for text in cases} == cases


def test_held_out_example_sets_share_no_prompt_with_training_data():
    heldout = _rows("preference_heldout.jsonl")
    questions = _rows("yes_no_heldout.jsonl")
    training = [(name, i, r["prompt"]) for name in TRAINING_FILES
                for i, r in enumerate(_rows(name), 1)]
    # The two held-out sets are independent of each other as well as of the training files.
    held = ([("preference_heldout.jsonl", i, r["prompt"]) for i, r in enumerate(heldout, 1)] +
            [("yes_no_heldout.jsonl", i, r["question"]) for i, r in enumerate(questions, 1)])
    others = training + held[:len(heldout)]
    for name, i, text in held:
        for other_name, j, other in others:
            if other_name == name:
                continue
            assert _normalised(text) != _normalised(other), (
                f"{name}:{i} repeats {other_name}:{j}: {text!r}")
            sim = jaccard(text, other)
            assert sim < NEAR_DUPLICATE, (
                f"{name}:{i} nearly repeats {other_name}:{j} (bigram Jaccard {sim:.2f}): "
                f"{text!r} ~ {other!r}")
    # The SDG dedup path (MinHash candidates, then exact Jaccard) agrees: run over the training
    # prompts and the preference prompts first, it keeps every question of each held-out file.
    # (Within the yes/no file, minimal pairs are meant to be close; checked in their own test.)
    for name in ("preference_heldout.jsonl", "yes_no_heldout.jsonl"):
        before = [t for other_name, _, t in others if other_name != name]
        texts = before + [t for held_name, _, t in held if held_name == name]
        records = [{"prompt": t, "line": k - len(before) + 1} for k, t in enumerate(texts)]
        _, removed = dedup_records(records, ("prompt",), near_threshold=NEAR_DUPLICATE)
        leaked = [(r["line"], r["reason"], texts[r["duplicate_of"]]) for r in removed
                  if r["line"] >= 1 and r["duplicate_of"] < len(before)]
        assert not leaked, f"{name}: (line, reason, training-side prompt): {leaked}"
    squad = _rows("squad_heldout.jsonl")
    assert len(squad) >= 18 and all(_strings(r, ("input", "response")) for r in squad)
    assert not {r["input"] for r in squad} & {r["input"] for r in _rows("aligner.jsonl")}


def test_held_out_preference_pairs_carry_no_polarity_or_length_cue():
    rows = _rows("preference_heldout.jsonl")
    assert len(rows) >= 80, f"only {len(rows)} held-out preference pairs"
    polar = [r for r in rows if _polarity(r["chosen"]) or _polarity(r["rejected"])]
    # Some pairs have no yes/no opening at all ("Which number goes on my timesheet?"), but
    # most do, since that is how a worker's questions are answered.
    open_share = 1 - len(polar) / len(rows)
    assert 0 < open_share <= 0.3, f"{len(rows) - len(polar)} of {len(rows)} pairs are open"
    counts = {side: collections.Counter(_polarity(r[side]) for r in polar)
              for side in ("chosen", "rejected")}
    for side, word in (("chosen", "no"), ("chosen", "yes"), ("rejected", "no"),
                       ("rejected", "yes")):
        share = counts[side][word] / len(polar)
        assert 0.45 <= share <= 0.55, (
            f"polarity cue: the {side} answer opens with {word!r} in {counts[side][word]} of "
            f"{len(polar)} pairs with a yes/no opening")

    # "Prefer the answer that opens with X" must score about chance on either word.
    def rule_accuracy(word):
        scores = [1.0 if c != r and c == word else 0.0 if c != r and r == word else 0.5
                  for c, r in ((_polarity(p["chosen"]), _polarity(p["rejected"])) for p in polar)]
        return statistics.fmean(scores)

    for word in ("yes", "no"):
        acc = rule_accuracy(word)
        assert 0.45 <= acc <= 0.55, f"polarity cue: 'prefer the answer that opens with " \
                                    f"{word!r}' scores {acc:.3f}"
    shorter = [r for r in rows if len(r["chosen"]) < len(r["rejected"])]
    assert 0.4 <= len(shorter) / len(rows) <= 0.6, (
        f"length cue: the chosen answer is the shorter one in {len(shorter)} of {len(rows)}")
    # The length balance holds on each polarity, so polarity and length together carry no cue.
    for word in ("yes", "no"):
        group = [r for r in polar if _polarity(r["chosen"]) == word]
        share = sum(len(r["chosen"]) < len(r["rejected"]) for r in group) / len(group)
        assert 0.35 <= share <= 0.65, (
            f"length cue within pairs whose chosen answer opens with {word!r}: chosen is "
            f"shorter in {share:.2f}")
    mean_chosen = statistics.fmean(len(r["chosen"]) for r in rows)
    mean_rejected = statistics.fmean(len(r["rejected"]) for r in rows)
    assert abs(mean_chosen / mean_rejected - 1) <= 0.15, (
        f"length cue: mean chosen {mean_chosen:.0f} vs rejected {mean_rejected:.0f} characters")


def test_held_out_sets_cover_every_section_of_the_document():
    sections = _sections()
    assert len(sections) == 14 and len(set(sections)) == len(sections)
    for name, least in (("preference_heldout.jsonl", 3), ("yes_no_heldout.jsonl", 2)):
        rows = _rows(name)
        for i, r in enumerate(rows, 1):
            assert r["section"] in sections, (
                f"{name}:{i}: section {r['section']!r} is not a '## ' heading of the document")
        count = collections.Counter(r["section"] for r in rows)
        thin = {s: count[s] for s in sections if count[s] < least}
        assert not thin, f"{name}: sections with fewer than {least} records: {thin}"


def test_held_out_yes_no_questions_carry_no_answer_cue():
    rows = _rows("yes_no_heldout.jsonl")
    assert len(rows) >= 60, f"only {len(rows)} held-out yes/no questions"
    yes = sum(r["answer"] == "yes" for r in rows)
    assert abs(2 * yes - len(rows)) <= 1, f"{yes} of {len(rows)} answers are yes"
    # Opening frame: "Can I ..." / "Should I ..." must not predict the answer. Checked on the
    # first word and the first two words of the question's last sentence.
    for words in (1, 2):
        frames = collections.defaultdict(list)
        for i, r in enumerate(rows, 1):
            frames[_question_frame(r["question"], words=words)].append((i, r))
        for frame, group in frames.items():
            if len(group) >= 6:
                share = _yes_share([r for _, r in group])
                assert 0.4 <= share <= 0.6, (
                    f"frame cue {frame!r}: yes in {share:.2f} of lines "
                    f"{[i for i, _ in group]}")
    # Words that could carry the answer on their own: a negation ("without", "not", ...), a
    # condition ("if I return it clean"), "only", "even".
    cues = {"negation": r"\b(not|never|no|none|nobody|nothing|without|cannot)\b|n't",
            "condition": r"\bif\b", "only": r"\bonly\b", "even": r"\beven\b",
            "because": r"\bbecause\b", "number": r"\d"}
    for cue, pattern in cues.items():
        group = [(i, r) for i, r in enumerate(rows, 1)
                 if re.search(pattern, r["question"], re.IGNORECASE)]
        if len(group) >= 6:
            share = _yes_share([r for _, r in group])
            assert 0.3 <= share <= 0.7, (
                f"{cue} cue: yes in {share:.2f} of lines {[i for i, _ in group]}")
    lengths = {a: statistics.fmean(len(r["question"]) for r in rows if r["answer"] == a)
               for a in ("yes", "no")}
    assert abs(lengths["yes"] / lengths["no"] - 1) <= 0.15, f"length cue: mean {lengths}"
    # Order: no long runs of one answer, and both halves of the file balanced.
    answers = [r["answer"] for r in rows]
    line = 1
    for answer, run in itertools.groupby(answers):
        n = len(list(run))
        assert n <= 3, f"order cue: lines {line}-{line + n - 1} are all {answer!r}"
        line += n
    half = len(rows) // 2
    for part, lines in (("first", rows[:half]), ("second", rows[half:])):
        assert 0.4 <= _yes_share(lines) <= 0.6, (
            f"order cue: yes in {_yes_share(lines):.2f} of the {part} half")


def test_held_out_yes_no_minimal_pairs_flip_the_answer():
    rows = _rows("yes_no_heldout.jsonl")
    pairs = collections.defaultdict(list)
    for i, r in enumerate(rows, 1):
        if "pair_id" in r:
            pairs[r["pair_id"]].append((i, r))
    assert len(pairs) >= 10, f"only {len(pairs)} minimal pairs"
    for pair_id, members in pairs.items():
        assert len(members) == 2, f"pair {pair_id!r} has lines {[i for i, _ in members]}"
        (i, a), (j, b) = members
        assert {a["answer"], b["answer"]} == {"yes", "no"}, (
            f"pair {pair_id!r} (lines {i}, {j}) does not flip the answer")
        assert a["section"] == b["section"], f"pair {pair_id!r} spans two sections"
        assert _normalised(a["question"]) != _normalised(b["question"]), pair_id
        sim = jaccard(a["question"], b["question"])
        assert sim >= MINIMAL_PAIR_FLOOR, (
            f"pair {pair_id!r} (lines {i}, {j}) shares too little wording to differ in one "
            f"fact: bigram Jaccard {sim:.2f}")
    # Outside its pair, no question nearly repeats another one.
    for (i, a), (j, b) in itertools.combinations(enumerate(rows, 1), 2):
        if a.get("pair_id") is not None and a.get("pair_id") == b.get("pair_id"):
            continue
        assert jaccard(a["question"], b["question"]) < NEAR_DUPLICATE, (
            f"yes_no_heldout.jsonl lines {i} and {j} nearly repeat each other")


def test_example_constitutions_are_all_combinations_of_the_principles():
    found = principles.load_principles(os.path.join(EXAMPLES, "principles.jsonl"))
    cons = _rows("constitutions.jsonl")
    assert cons == principles.make_constitutions(found)
    assert len(cons) == 2 ** len(found)
    for c in cons:
        assert set(c) >= {"id", "principles", "negated"}
        assert all(isinstance(n, bool) for n in c["negated"])
