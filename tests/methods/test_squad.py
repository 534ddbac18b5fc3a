"""The aligner squad on a worked example with scripted inspectors and aligners."""

import numpy as np
import pytest

from align_jax.methods.aligners import squad

# Initial scores of each base response; a response carrying "+<criterion>" scores 0.95 on it.
TABLE = {
    "a": {"ethical": 0.1, "factuality": 0.5, "helpful": 0.2},   # factuality exactly 0.5: passes
    "b": {"ethical": 0.3, "factuality": 0.4, "helpful": 0.9},
    "c": {"ethical": 0.8, "factuality": 0.9, "helpful": 0.6},   # passes everything: untouched
    "d": {"ethical": 0.2, "factuality": 0.45, "helpful": 0.3},
}
# Means: ethical 0.35, helpful 0.5, factuality 0.5625 -> order ethical, helpful, factuality.


def _inspector(criterion, calls):
    def inspect(inputs, responses):
        calls.append((criterion, list(responses)))
        return [0.95 if f"+{criterion}" in r else TABLE[r.split(" ")[0]][criterion]
                for r in responses]
    return inspect


def _aligner(criterion, calls):
    def align(inputs, responses):
        calls.append((criterion, list(inputs), list(responses)))
        out = []
        for x, y in zip(inputs, responses):
            # The ethical rewrite of q0 happens to make it helpful too: only re-scoring sees it.
            extra = "+helpful" if criterion == "ethical" and x == "q0" else ""
            out.append(f"{y} +{criterion}{extra}")
        return out
    return align


def test_squad_worked_example():
    inspector_calls, aligner_calls = [], []
    criteria = ("helpful", "factuality", "ethical")  # given out of order on purpose
    inspectors = {c: _inspector(c, inspector_calls) for c in criteria}
    aligners = {c: _aligner(c, aligner_calls) for c in criteria}
    inputs = ["q0", "q1", "q2", "q3"]
    result = squad(inputs, ["a", "b", "c", "d"], inspectors=inspectors, aligners=aligners)

    # Order by ascending initial mean, fixed once: after the ethical stage helpful's mean is
    # 0.6625 > factuality's 0.5625, and a re-sorting squad would run factuality second.
    assert result.order == ("ethical", "helpful", "factuality")
    # Each aligner saw only its failing rows, in row order, with the current responses.
    assert aligner_calls == [
        ("ethical", ["q0", "q1", "q3"], ["a", "b", "d"]),
        ("helpful", ["q3"], ["d +ethical"]),            # q0 was fixed by the ethical rewrite
        ("factuality", ["q1", "q3"], ["b +ethical", "d +ethical +helpful"]),  # a (0.5) passes
    ]
    assert result.responses == ["a +ethical+helpful", "b +ethical +factuality", "c",
                                "d +ethical +helpful +factuality"]
    assert result.applied == [("ethical",), ("ethical", "factuality"), (),
                              ("ethical", "helpful", "factuality")]
    # Scored once initially and once after each of the three stages, by every inspector.
    assert len(inspector_calls) == 3 * 4
    assert [s.rows for s in result.stages] == [(0, 1, 3), (3,), (1, 3)]
    np.testing.assert_allclose(result.initial_scores["helpful"], [0.2, 0.9, 0.6, 0.3])
    np.testing.assert_allclose(result.stages[0].scores_after["helpful"], [0.95, 0.9, 0.6, 0.3])
    np.testing.assert_allclose(result.stages[1].scores_before["helpful"], [0.95, 0.9, 0.6, 0.3])
    np.testing.assert_allclose(result.final_scores["factuality"], [0.5, 0.95, 0.9, 0.95])
    np.testing.assert_allclose(result.final_scores["ethical"], [0.95, 0.95, 0.8, 0.95])
    trace = result.trace(0)
    assert [t["ran"] for t in trace] == [True, False, False]
    assert trace[0]["before"]["ethical"] == 0.1 and trace[0]["after"]["helpful"] == 0.95
    assert result.trace(2) and not any(t["ran"] for t in result.trace(2))


def test_squad_threshold_is_strict_and_errors():
    calls = []
    result = squad(["q"], ["a"], inspectors={"factuality": _inspector("factuality", [])},
                   aligners={"factuality": _aligner("factuality", calls)}, threshold=0.5)
    assert calls == [] and result.responses == ["a"]
    result = squad(["q"], ["a"], inspectors={"factuality": _inspector("factuality", [])},
                   aligners={"factuality": _aligner("factuality", calls)}, threshold=0.51)
    assert result.responses == ["a +factuality"]
    with pytest.raises(ValueError, match="no inspector"):
        squad(["q"], ["a"], inspectors={}, aligners={"helpful": _aligner("helpful", [])})
    with pytest.raises(ValueError, match="2 responses"):
        squad(["q"], ["a", "b"], inspectors={}, aligners={})
