"""SAMI as published: the paper's prompt layout, seeded principle shuffles, response filters and
the held-out MI bound over all C constitutions with summed log-probs."""

import math
import random

import jax
import numpy as np
import pytest

from align_jax.methods import sami, sami_prompts


def test_plain_prompt_is_the_papers_layout():
    got = sami_prompts.plain_prompt(["Be kind.", "Be brief."], "How do I bake bread?")
    assert got == (
        "System: Write a response for the assistant that follows the principles in the "
        "constitution.\n"
        "\n"
        "Assistant Constitution:\n"
        "1. Be kind.\n"
        "2. Be brief.\n"
        "\n"
        "Human: How do I bake bread?\n"
        "\n"
        "Assistant:")
    with_example = sami_prompts.plain_prompt(["Be kind."], "Hi", example_format=True)
    assert with_example.startswith(
        "System: Write a response for the assistant that follows the principles in the "
        "constitution.\n\nExample Format\nAssistant Constitution: [insert constitution here]\n"
        "Human: [insert query here]\nAssistant: [insert response here]\n\nMain Task\n"
        "Assistant Constitution:\n1. Be kind.\n")
    chat = sami_prompts.sami_prompt(["Be kind."], "Hi", fmt="chat", rng=None)
    assert chat == [{"role": "system", "content": sami_prompts.SYSTEM
                     + "\n\nAssistant Constitution:\n1. Be kind."},
                    {"role": "user", "content": "Hi"}]
    assert sami_prompts.stop_strings("plain")[0] == "\nHuman:"
    with pytest.raises(ValueError, match="prompt_format"):
        sami_prompts.sami_prompt(["a"], "q", fmt="xml", rng=None)


def test_principle_shuffles_are_seeded_and_independent_per_constitution():
    cons = [[f"principle {k}" for k in range(6)], [f"rule {k}" for k in range(6)]]

    def rows(seed):
        return sami.make_prompts(["q1", "q2", "q3"], cons, [[0, 1]] * 3, prompt_format="plain",
                                 rng=random.Random(seed))

    a, b, other = rows(3), rows(3), rows(4)
    assert a == b
    assert a != other
    orders = [[int(line.split()[-1]) for line in text.splitlines()]
              for r in a for text in r["constitutions"]]
    assert all(sorted(o) == list(range(6)) for o in orders)
    # Each (query, constitution) gets its own permutation: the two constitutions of a query
    # differ, and so do the prompts of one constitution across queries.
    assert all(orders[2 * q] != orders[2 * q + 1] for q in range(3))
    assert len({tuple(o) for o in orders[0::2]}) > 1
    # The prompts carry exactly the shuffled constitutions.
    assert a[0]["prompts"][1] == sami_prompts.plain_prompt(
        a[0]["constitutions"][1].replace("1. ", "", 1).split("\n")[0:1]
        + [x.split(". ", 1)[1] for x in a[0]["constitutions"][1].split("\n")[1:]], "q1")
    # Global random state plays no part.
    random.seed(0)
    x = rows(5)
    random.seed(1)
    assert rows(5) == x


@pytest.mark.parametrize("name,dropped,kept", [
    ("empty", [["", "fine"], ["ok", "  \n"]], [["a", "b"], ["sorry to hear", "b"]]),
    ("evasive", [["I'm sorry, I can't help.", "b"], ["a", "I apologize for that."],
                 ["a", "  i am sorry but no"]],
     [["a", "b"], ["Sorry-looking text is fine mid way: I'm sorry.", "b"]]),
    ("template", [["a\nHuman: next", "b"], ["a", "Assistant: hi"], ["<|im_end|>", "b"],
                  ["Assistant Constitution: 1.", "b"]], [["a", "b"], ["humans are", "b"]]),
    ("identical", [["same", "same"], ["same ", " same"]], [["same", "Same"], ["a", "b"]]),
])
def test_each_filter_drops_exactly_its_cases(name, dropped, kept):
    records = [{"texts": t} for t in dropped + kept]
    out, counts = sami_prompts.apply_filters(records, [name])
    assert out == [{"texts": t} for t in kept]
    assert counts == {name: len(dropped)}


def test_filters_count_each_dropped_query_once_by_first_reason():
    records = [{"texts": t} for t in (["", ""], ["I'm sorry", "x"], ["a", "b"], ["Human: x", "y"])]
    out, counts = sami_prompts.apply_filters(records)
    assert out == [{"texts": ["a", "b"]}]
    assert counts == {"empty": 1, "evasive": 1, "template": 1, "identical": 0}
    with pytest.raises(ValueError, match="unknown response filter 'nope'"):
        sami_prompts.apply_filters(records, ["nope"])


def _numpy_bound(m_BCC):
    """Mean over queries and targets j of m[j, j] - log mean_i exp m[i, j]."""
    c = m_BCC.shape[1]
    per = []
    for m in m_BCC.astype(np.float64):
        cols = [m[j, j] - (np.log(np.sum(np.exp(m[:, j] - m[:, j].max()))) + m[:, j].max()
                           - math.log(c)) for j in range(c)]
        per.append(np.mean(cols))
    return np.array(per)


def test_mi_per_query_matches_numpy_and_is_at_most_log_c():
    rng = np.random.default_rng(0)
    for c in (2, 3, 5):
        m = rng.normal(scale=20.0, size=(6, c, c))
        np.testing.assert_allclose(sami.mi_per_query(m), _numpy_bound(m), rtol=1e-5, atol=1e-4)
        assert np.all(sami.mi_per_query(m) <= math.log(c) + 1e-5)
        # A response that ignores the constitution carries no information.
        same = np.repeat(rng.normal(size=(6, 1, c)), c, axis=1)
        np.testing.assert_allclose(sami.mi_per_query(same), 0.0, atol=1e-5)


def test_mi_bound_sums_log_probs_over_response_tokens(tmp_path):
    from align_jax.models.config import get_config
    from align_jax.models.hf import load_hf, save_hf
    from align_jax.models.transformer import forward, init_params
    from align_jax.tokenizer import encode_prompt, load_tokenizer
    from align_jax.tokenizer_training import train_tokenizer
    lines = ["be brief and kind", "answer the question", "how do plants grow",
             "plants grow from seeds with water and light", "System Human Assistant"] * 4
    train_tokenizer(lines, tmp_path, vocab_size=300)
    tok = load_tokenizer(str(tmp_path))
    cfg = get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(1))
    save_hf(cfg, params, str(tmp_path))
    cfg, params = load_hf(str(tmp_path))  # the reference scores what mi_bound loads
    cons = [["be brief"], ["answer the question", "be kind"]]
    rows = sami.make_prompts(["how do plants grow", "answer"], cons, [[0, 1], [1, 0]],
                             prompt_format="plain", rng=random.Random(0))
    responses = [["plants grow", "from seeds with water and light"], ["be kind", "answer"]]
    records = [{**r, "responses": y, "texts": y, "response_tokens": [1, 1]}
               for r, y in zip(rows, responses)]
    got = sami.mi_bound(str(tmp_path), records, seq_len=512, batch_size=2)

    def logp(prompt, response, average):
        p = encode_prompt(tok, prompt, chat_template=False)
        y = list(tok.encode(response, add_bos=False)) + [tok.eos_id]
        ids = np.array([p + y])
        logits = np.asarray(forward(cfg, params, ids), np.float64)[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        lp = [logits[t - 1, ids[0, t]] - logz[t - 1] for t in range(len(p), len(p) + len(y))]
        return np.mean(lp) if average else np.sum(lp)

    for average, key in ((False, "mi_bound"), (True, "mi_bound_token_mean")):
        m = np.array([[[logp(r["prompts"][i], r["responses"][j], average) for j in range(2)]
                       for i in range(2)] for r in records])
        per = _numpy_bound(m)
        assert got[key] == pytest.approx(per.mean(), abs=2e-3)
        assert got[key + "_stderr"] == pytest.approx(per.std(ddof=1) / math.sqrt(2), abs=2e-3)
    assert got["mi_bound"] <= math.log(2) + 1e-5 and got["queries"] == 2


class _Judge:
    """A scripted judge: picks the slot whose response has more words, or always `slot`."""

    context_length = 4096

    def __init__(self, slot=None):
        self.slot = slot

    def count_tokens(self, text):
        return len(text.split())

    def chat(self, conversations, **kw):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            a = text.split("Response A:")[1].split("Response B:")[0]
            b = text.split("Response B:")[1].split("Which response")[0]
            out.append(self.slot or ("A" if len(a.split()) > len(b.split()) else "B"))
        return out

    complete = chat


def _held(texts_by_query):
    return [{"prompt": f"q{i}", "constitution_ids": [0, 1], "texts": list(t),
             "response_tokens": [len(x.split()) for x in t], "truncated": [False, len(t[1]) > 20]}
            for i, t in enumerate(texts_by_query)]


def test_judged_win_rates_lengths_and_the_report():
    from align_jax.methods import sami_eval, sami_report
    queries = ["q0", "q1", "q2", "q3"]
    base = ["a b c", "a b", "a b c d", "a"]
    new = ["a", "a b c", "a b c d e f", "a b"]
    # The longer response wins, in both orders: new is longer in q1, q2, q3.
    got = sami_eval.judged(queries, new, base, principles="1. Be brief.", judge=_Judge(),
                           template="principles_choice", max_tokens=4)
    assert got["win_rate"] == pytest.approx(0.75) and got["position_bias"] == 0.0
    assert got["a_longer_share"] == pytest.approx(0.75)
    # The paper's length correction: new longer -> 1.0, not longer -> 0.0; mean 0.5.
    assert got["lc_stratified"] == pytest.approx(0.5)
    always_a = sami_eval.judged(queries, new, base, principles="1. Be brief.",
                                judge=_Judge("A"), template="principles_choice", max_tokens=4)
    assert always_a["position_bias"] == 1.0 and always_a["win_rate"] == pytest.approx(0.5)
    held = _held([("a", "a b c d e f g h i j k l m n o p"), ("a b c", "a b")])
    lengths = sami.lengths_by_constitution(held, ["concise", "verbose"])
    assert lengths["concise"] == {"mean": 2.0, "stderr": pytest.approx(1.0), "n": 2,
                                  "truncated": 0}
    assert lengths["verbose"]["mean"] == 9.0 and lengths["verbose"]["truncated"] == 1
    assert lengths["verbose"]["stderr"] == pytest.approx(np.std([16, 2], ddof=1) / math.sqrt(2))
    mi = {"mi_constitutions": 2, "mi_bound_stderr": 0.05, "mi_reference": 0.9,
          "mi_reference_stderr": 0.2, "mi_bound_token_mean": 0.01}
    report = {"init": "base", "prompt_format": "chat", "mi_bound_note": "note",
              "constitutions": ["concise", "verbose"], "max_new_tokens": 16,
              "eval_constitution": "concise", "judge": "letters:x",
              "judge_template": "principles_choice", "compare_to": "/ckpt/instruct",
              "compare_to_response_tokens": lengths["verbose"], "iterations": [
                  {"iteration": 0, "mi_bound": 0.1, **mi,
                   "response_tokens_by_constitution": lengths,
                   "eval_response_tokens": lengths["concise"], "win_rate_vs_compare": got,
                   "phase_seconds": {"sample": 3.0, "mi": 1.0},
                   "phase_cpu_seconds": {"sample": 2.0, "mi": 1.0}},
                  {"iteration": 1, "steps": 2, "mi_bound": 0.5, **mi,
                   "response_tokens_by_constitution": lengths,
                   "eval_response_tokens": lengths["concise"], "win_rate_vs_base": always_a,
                   "win_rate_vs_compare": got, "phase_seconds": {"train": 5.0},
                   "phase_cpu_seconds": {"train": 4.0}}]}
    md = sami_report.markdown(report)
    assert "| 1 | 2 | 0.5000 | 0.0500 | 0.9000 | 0.2000 | 0.0100 | 2.0 +- 1.0 (0/2) | " \
           "9.0 +- 7.0 (1/2) | " in md
    assert "| 0 | 2.0 +- 1.0 (0/2) | - | - | - | - | - | - | 0.75 +- 0.25 | 0.50 | " in md
    assert "| 1 | 2.0 +- 1.0 (0/2) | 0.50 +- 0.00 | 0.50 | " in md
    assert "| 0.75 | 1.00 | 0/8 |" in md  # always_a: 3 of 4 longer, position bias 1
    assert "reference estimate (not a bound)" in md and "log K = 0.693" in md
    assert "| 0 | - | 3 / 2 | 1 / 1 | - | 4 / 3 |" in md and "| all |" in md


def test_summary_format_and_example_block_rules():
    ps = ["Be brief.", "Keep every key point."]
    got = sami_prompts.sami_prompt(ps, "I moved to a new city and ...", fmt="summary", rng=None)
    assert got == ("System: " + sami_prompts.SUMMARY_SYSTEM + "\n\nSummarization Constitution:\n"
                   "1. Be brief.\n2. Keep every key point.\n\nPost: I moved to a new city and "
                   "...\n\nSummary:")
    with_example = sami_prompts.sami_prompt(ps, "I moved to a new city and ...", fmt="summary",
                                            rng=None, example_format=True)
    assert "Example Format\nSummarization Constitution: [insert constitution here]" in with_example
    assert with_example.endswith(got.split("\n\n", 1)[1])
    assert sami_prompts.response_prefix("summary") == "The post"
    assert sami_prompts.response_prefix("plain") == ""
    assert "\nHuman:" in sami_prompts.stop_strings("summary")
    rows = sami.make_prompts(["post text"], [ps], [[0]], prompt_format="summary",
                             rng=random.Random(0), example_format=True)
    # Sampling sees the example block and starts the summary; training sees neither.
    assert rows[0]["sample_prompts"][0].endswith("Summary: The post")
    assert "Example Format" in rows[0]["sample_prompts"][0]
    assert rows[0]["prompts"][0].endswith("Summary:") and "Example" not in rows[0]["prompts"][0]
    with pytest.raises(ValueError, match="example_format is for the plain-text formats"):
        sami_prompts.sami_prompt(ps, "q", fmt="chat", rng=None, example_format=True)
    # A summary that copies the template is dropped by the template filter.
    assert sami_prompts.drop_reason(["The post is about x.", "Summarization Constitution: 1."],
                                    ("template",)) == "template"


def test_eval_constitution_is_the_un_negated_one_or_named():
    from align_jax.methods.sami_eval import pick_eval_constitution
    recs = [{"id": "a", "principles": ["x"], "negated": [True]},
            {"id": "b", "principles": ["x"], "negated": [False]}]
    assert pick_eval_constitution(recs, None) == 1
    assert pick_eval_constitution(recs, "a") == 0
    with pytest.raises(ValueError, match="not an id"):
        pick_eval_constitution(recs, "zzz")
    with pytest.raises(ValueError, match="set eval_constitution"):
        pick_eval_constitution(recs + [{"id": "c", "principles": ["y"], "negated": [False]}],
                               None)
