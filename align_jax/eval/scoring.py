"""Held-out scores of a model: answer log-likelihood and preference accuracy.

Both are exact quantities of the model on records it did not train on. Two ways compute them:

* `answer_nll` / `preference_margins`: one jitted forward per batch of whole rows (the same
  log-prob code as the losses), through the shared scorer (`align_jax.losses.scorer`): one
  compilation per config and bucket shape for the whole process.
* `ScoreSet` + `align_jax.eval.answers.answer_and_score` (what `evaluate_models` uses): the
  records are formatted once for every model, and each prompt is run once, by the same prefill
  that generates the model's answer to it when it is a held-out question
  (`align_jax.generate.score_continuations`); a preference pair's two answers extend that one
  prompt pass. Same numbers (tested against the first way), a fraction of the work.
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from align_jax.data import batching
from align_jax.data.formatting import format_records
from align_jax.data.sources import Record
from align_jax.losses.logprobs import forward_token_logps
from align_jax.losses.scorer import bind, score_examples
from align_jax.models.config import ModelConfig


def _sums(config: ModelConfig, params, batch):
    logps, mask = forward_token_logps(config, params, batch, where="eval")
    return jnp.stack([logps.sum(-1), mask.sum(-1)], axis=-1)


def _sft_batch(examples, **kw):
    return batching.pad_batch([batching.sequence(e.prompt, e.completions[0],
                                                 completion_scored=e.scored)
                               for e in examples], **kw)


def _answer_tokens(example) -> int:
    """Scored tokens (a multi-turn chat's assistant turns only)."""
    scored = example.scored
    return len(example.completions[0]) if scored is None else int(scored.sum())


@dataclasses.dataclass(frozen=True)
class ScoreSet:
    """Held-out records formatted once, for every model: each example's prompt ids and its
    completions (one for "sft", chosen then rejected for "preference").

    kind: "sft" or "preference".
    examples: the records that fit `seq_len` (prompt cut on the left as in `answer_nll`).
    skipped: records that could not be formatted or fitted.
    kept: the index in the given records of each example (so per-example scores line up
      with the records, e.g. with shortcut rules over the same preference pairs).
    """

    kind: str
    examples: Sequence
    skipped: int
    kept: tuple[int, ...] = ()

    @classmethod
    def make(cls, records, *, kind: str, tokenizer, seq_len: int) -> "ScoreSet":
        if kind not in ("sft", "preference"):
            raise ValueError(f"ScoreSet kind must be 'sft' or 'preference', got {kind!r}")
        records = [r if isinstance(r, Record) else Record(data=r, where=f"records[{i}]")
                   for i, r in enumerate(records)]
        index = {r.where: i for i, r in enumerate(records)}
        if len(index) != len(records):
            raise ValueError("ScoreSet.make: records must have distinct `where` provenance")
        examples, skipped = _examples(records, kind=kind, tokenizer=tokenizer, seq_len=seq_len)
        return cls(kind=kind, examples=examples, skipped=skipped,
                   kept=tuple(index[e.where] for e in examples))

    def summary(self, sums: Sequence[Sequence[float]]):
        """From log p(completion | prompt) per example (as `answer_and_score` returns them):
        the `answer_nll` dict for "sft", (margins, skipped) as `preference_margins` for
        "preference"."""
        if len(sums) != len(self.examples):
            raise ValueError(f"{len(sums)} scores for {len(self.examples)} examples")
        if self.kind == "preference":
            m = np.asarray([s[0] - s[1] for s in sums], np.float64)
            return m, self.skipped
        tokens = sum(_answer_tokens(e) for e in self.examples)
        return _nll_summary(float(sum(s[0] for s in sums)), tokens, len(self.examples),
                            self.skipped)

    def per_example(self, sums: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        """For "sft": (answer NLL [N], answer tokens [N]) of each example, whose ratio of sums
        is `summary`'s nll_per_token (what a bootstrap over records resamples)."""
        if self.kind != "sft" or len(sums) != len(self.examples):
            raise ValueError(f"per_example needs the {len(self.examples)} scores of an sft set")
        return (np.array([-s[0] for s in sums], np.float64),
                np.array([_answer_tokens(e) for e in self.examples], np.float64))


def _nll_summary(logp: float, tokens: float, examples: int, skipped: int) -> dict:
    # Nothing scored is no score (nan, "n/a" in the report), not a perfect -0.0.
    nll = -logp / float(tokens) if tokens else float("nan")
    return {"nll_per_token": nll,
            "perplexity": float(np.exp(min(nll, 50.0))) if tokens else float("nan"),
            "examples": examples, "skipped": skipped}


def _examples(records, *, kind, tokenizer, seq_len):
    examples, report, skipped = format_records(records, kind=kind, tokenizer=tokenizer,
                                               seq_len=seq_len,
                                               truncation="truncate_prompt_left",
                                               on_error="skip")
    # Records that could not be formatted, and those too long for seq_len even after the
    # prompt is cut (the truncation report's drops).
    return examples, len(skipped) + len(report.dropped)


def answer_nll(config: ModelConfig, params, tokenizer, records, *, seq_len: int,
               batch_size: int = 8, mesh=None, rules: str = "dp") -> dict[str, float]:
    """Mean negative log-likelihood per answer token of SFT records' completions.

    Args:
      config, params: the model.
      tokenizer: its tokenizer (chat template applied to prompts, as in training).
      records: dicts with `prompt` and `completion`.
      seq_len: rows are truncated on the prompt side to this length.
      batch_size: rows per forward.
      mesh, rules: the device mesh to score over and the sharding preset of the batch and
        the activations (`losses.scorer`); mesh None runs on the default device.
    Returns:
      {"nll_per_token", "perplexity", "examples", "skipped"}.
    """
    examples, skipped = _examples(records, kind="sft", tokenizer=tokenizer, seq_len=seq_len)
    sums = score_examples(bind(_sums, config), params, examples, build=_sft_batch,
                          seq_len=seq_len, batch_size=batch_size, mesh=mesh, rules=rules)
    if not len(sums):
        return _nll_summary(0.0, 0.0, 0, skipped)
    return _nll_summary(float(sums[:, 0].sum()), float(sums[:, 1].sum()), len(examples),
                        skipped)


def preference_margins(config: ModelConfig, params, tokenizer, records, *, seq_len: int,
                       batch_size: int = 8, mesh=None, rules: str = "dp"
                       ) -> tuple[np.ndarray, int]:
    """log p(chosen | x) - log p(rejected | x) per preference record that fits `seq_len`.

    Returns:
      (margins [kept records] in record order, number of records skipped). The kept records
      depend only on the tokenizer and seq_len, so two models' margins align.
    """
    examples, skipped = _examples(records, kind="preference", tokenizer=tokenizer,
                                  seq_len=seq_len)
    if not examples:
        return np.zeros(0), skipped
    s = score_examples(bind(_sums, config), params, examples, build=batching.pad_pair_batch,
                       seq_len=seq_len, batch_size=batch_size, mesh=mesh, rules=rules)[..., 0]
    return s[:, 0] - s[:, 1], skipped


def margin_summary(margins: np.ndarray, skipped: int) -> dict[str, float]:
    """{"accuracy": share of margins > 0, a margin of exactly 0 counting 1/2 (the model
    cannot tell the answers apart), "mean_margin", "examples", "skipped"}."""
    m = np.asarray(margins)
    return {"accuracy": float(np.mean((m > 0) + 0.5 * (m == 0))) if len(m) else float("nan"),
            "mean_margin": float(np.mean(m)) if len(m) else float("nan"),
            "examples": len(m), "skipped": skipped}


def preference_accuracy(config: ModelConfig, params, tokenizer, records, *, seq_len: int,
                        batch_size: int = 8, reference=None, mesh=None, rules: str = "dp"
                        ) -> dict[str, float]:
    """How often the model gives the chosen answer a higher log-likelihood than the rejected.

    With `reference` = (config, params) the comparison uses DPO's implicit reward,
    log p(y|x) - log p_ref(y|x); otherwise raw log-likelihoods. `mesh`, `rules`: as in
    answer_nll.

    Returns:
      {"accuracy", "mean_margin", "examples", "skipped"}.
    """
    kw = dict(tokenizer=tokenizer, records=records, seq_len=seq_len, batch_size=batch_size,
              mesh=mesh, rules=rules)
    m, skipped = preference_margins(config, params, **kw)
    if reference is not None:
        m = m - preference_margins(*reference, **kw)[0]
    return margin_summary(m, skipped)
