"""Every verdict format the shipped judge templates ask for, through a real `openai:` endpoint:
a scripted OpenAI-compatible server answers each template in the format it asks for."""

import glob
import os
import re

import numpy as np
import pytest
from scripted_judge import serve

from align_jax.eval.judge import (
    JUDGE_TEMPLATE_DIR,
    TEMPLATE_SAMPLING,
    VERDICT_REGEX,
    judge_system_prompt,
    load_judge_template,
    opponent_summary,
    opponent_table,
    pairwise_win_rate,
    parse_verdict,
    win_rate_matrix,
)
from align_jax.sdg.backends import make_teacher

# The two responses as any shipped template shows them.
_PAIR = re.compile(r"(?:Response|Summary) A:\s*(.*?)\n\n(?:###)?(?:Response|Summary) B:\s*(.*?)"
                   r"\n\n", re.DOTALL)
SHIPPED = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{JUDGE_TEMPLATE_DIR}/*.txt")
                 if not p.endswith(".system.txt"))


def answer_in_format(prompt: str, letter: str) -> str:
    """What a judge that follows the template's instructions writes for `letter`."""
    if "Final Response:" in prompt:
        return (f"Comparison: Response {letter} follows both principles; the other does not.\n"
                f"Final Response: {letter}")
    if "[RESULT]" in prompt:
        return f"Response {letter} meets the rubric better. [RESULT] {letter}"
    return letter


def _answer(prompt: str) -> str:
    first, second = _PAIR.search(prompt).groups()
    # Prefers the response that says "report"; otherwise slot B (a pure position effect).
    return answer_in_format(prompt, "A" if "report" in first and "report" not in second
                            else "B")


@pytest.fixture(scope="module")
def server():
    with serve(_answer) as (handler, url):
        teacher = make_teacher(f"openai:{url}", model="judge", context_length=8192,
                               concurrency=4, max_retries=0)
        yield handler, teacher
        teacher.close()


def test_every_shipped_template_has_a_verdict_regex_its_answers_match():
    assert {"relative", "prometheus_relative", "principles", "choice", "principles_choice",
            "constitution", "constitution_summary", "pairwise"} <= set(SHIPPED)
    assert set(SHIPPED) == set(VERDICT_REGEX), "a template without its verdict format"
    for name in SHIPPED:
        tpl = load_judge_template(name)
        prompt = tpl.render(instruction="q", response_a="x", response_b="y", reference="r",
                            rubric="r", principles="1. p")
        for letter in "AB":
            text = answer_in_format(prompt, letter)
            assert re.fullmatch(VERDICT_REGEX[name], text), (name, text)
            assert parse_verdict(text) == letter, (name, text)


@pytest.mark.parametrize("name", ["constitution", "constitution_summary", "prometheus_relative",
                                  "principles", "principles_choice", "choice", "pairwise",
                                  "relative"])
def test_each_template_through_an_openai_endpoint(server, name):
    handler, teacher = server
    handler.seen[:] = []
    n = 6
    prompts = [f"Post or query {i}" for i in range(n)]
    good = [f"please report it {i}" for i in range(n)]
    bad = [f"ignore it {i}" for i in range(n)]
    res = pairwise_win_rate(prompts, good, bad, judge=teacher, template=name,
                            principles="1. Report problems.\n2. Be brief.",
                            references=["ref"] * n, seed=5)
    # Every verdict parsed, in both orders, and the content-driven judge always wins A's pairs.
    assert res.parse_failures == 0 and res.win_rate == 1.0 and res.position_bias == 0.0
    assert len(handler.seen) == 2 * n
    system = judge_system_prompt(load_judge_template(name))
    roles = {tuple(m["role"] for m in s["messages"]) for s in handler.seen}
    if system:
        assert roles == {("system", "user")}
        assert {s["messages"][0]["content"] for s in handler.seen} == {system}
    else:
        assert roles == {("user",)}
    want = TEMPLATE_SAMPLING.get(name, {})
    for s in handler.seen:
        assert s["temperature"] == want.get("temperature", 0.0)
        assert s["max_tokens"] == want.get("max_tokens", 512)
        assert s.get("repetition_penalty", 1.0) == want.get("repetition_penalty", 1.0)


def test_prometheus_layout_system_prompt_and_sampling(server):
    handler, teacher = server
    handler.seen[:] = []
    pairwise_win_rate(["What should I do with a gift?"], ["report it"], ["keep it"],
                      judge=teacher, template="prometheus_relative", references=["Report it."],
                      rubric="Does the answer follow the code?")
    body = handler.seen[0]
    text = body["messages"][1]["content"]
    heads = ["###Task Description:", "###Instruction:", "###Response A:", "###Response B:",
             "###Reference Answer:", "###Score Rubric:", "###Feedback:"]
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    assert "[RESULT] (A or B)" in text and "Report it." in text
    # Prometheus 2's recommended sampling, the penalty in the request body as vLLM reads it.
    assert (body["temperature"], body["top_p"], body["max_tokens"],
            body["repetition_penalty"]) == (1.0, 0.9, 1024, 1.03)
    assert body["messages"][0]["role"] == "system" and "judge" in body["messages"][0]["content"]
    # Explicit settings win over the template's; system="" sends no system prompt.
    handler.seen[:] = []
    pairwise_win_rate(["q"], ["report it"], ["keep it"], judge=teacher,
                      template="prometheus_relative", temperature=0.0, system="")
    assert handler.seen[0]["temperature"] == 0.0 and len(handler.seen[0]["messages"]) == 1


def test_verdict_formats():
    assert parse_verdict("Comparison: A is vaguer.\nFinal Response: B") == "B"
    assert parse_verdict('Comparison: ...\nFinal Response: "A"') == "A"
    assert parse_verdict("Comparison: ...\nFinal Response: <B>") == "B"
    assert parse_verdict("Final Response: Summary A") == "A"
    assert parse_verdict("final response:  (b)") == "B"
    # The format quoted first, the verdict last: the last marker wins.
    assert parse_verdict('Use "Final Response: <"A" or "B">".\nComparison: ...\n'
                         'Final Response: A') == "A"
    assert parse_verdict('Final Response: <"A" or "B">') is None
    assert parse_verdict("[RESULT] A or B") is None
    assert parse_verdict("Final Response: neither") is None
    assert parse_verdict("[RESULT] B\nOn reflection... Final Response: A") == "A"
    assert parse_verdict("Final Response: C") is None


# The value-alignment paper's appendix G, Table 3 (BCG): [i, j] = win rate of i over j.
BCG = np.array([[np.nan, 0.597, 0.599, 0.451, 0.447], [0.406, np.nan, 0.533, 0.308, 0.307],
                [0.407, 0.534, np.nan, 0.308, 0.307], [0.589, 0.664, 0.660, np.nan, 0.499],
                [0.590, 0.666, 0.665, 0.539, np.nan]])
NAMES = ["c-fine-tuned/RAG", "sft/RAG", "pref/RAG", "sft", "pref"]


def test_opponent_summary_reproduces_the_papers_means():
    m = {"names": NAMES, "win_rate": np.where(np.isnan(BCG), 0.5, BCG)}
    got = opponent_summary(m)
    for i, name in enumerate(NAMES):
        row = BCG[i][~np.isnan(BCG[i])]
        assert got[name] == pytest.approx((row.mean(), row.std()))
        assert opponent_summary(m, ddof=1)[name][1] == pytest.approx(row.std(ddof=1))
    # Table 1 of the paper: 0.524, 0.389, 0.390, 0.603, 0.615 (its matrix rounds the 2nd and
    # 3rd to 0.388/0.389).
    np.testing.assert_allclose([got[n][0] for n in NAMES], [0.524, 0.389, 0.390, 0.603, 0.615],
                               atol=1.5e-3)
    assert "| sft | 0.603 +- 0.067 |" in opponent_table(m)


def test_opponent_summary_of_a_judged_matrix(server):
    _, teacher = server
    systems = {"good": [f"please report it {i}" for i in range(4)],
               "bad": [f"ignore it {i}" for i in range(4)],
               "worse": [f"hide it {i}" for i in range(4)]}
    m = win_rate_matrix([f"q{i}" for i in range(4)], systems, judge=teacher,
                        template="constitution", principles="1. Report problems.")
    assert m["template"] == "constitution" and m["system"]
    s = opponent_summary(m)
    assert s["good"] == (1.0, 0.0)
    # bad vs worse is a pure slot-B preference: 0.5 each way.
    assert s["bad"] == pytest.approx((0.25, 0.25)) and s["worse"] == pytest.approx((0.25, 0.25))
