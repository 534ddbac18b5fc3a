"""SAMI's held-out evaluation: the MI estimates, response lengths and judged win rates.

Per iteration, on the held-out queries:
  MI         every query's responses under each of the pool's constitutions (all K of them,
             or `mi_constitutions` drawn per query), scored under every one of them: the
             [K, K] matrix of log p(y_j | x, c_i) with log p summed over response tokens.
             `mi_bound` is the InfoNCE lower bound on I(y; c | x) (at most log K);
             `mi_reference` is the SAMI reference code's estimate (target minus the mean
             log-prob over the constitutions), which is NOT a bound (the paper's 1.91 nats
             exceed log 4) and is reported so a run can be set beside the paper's numbers;
             `mi_bound_token_mean` is the bound with per-token mean log-probs, the training
             loss's quantity (not a bound either).
  win rates  every held-out query answered under the one desired constitution
             (`eval_constitution`, as the paper samples its win-rate responses), judged
             against the base model's answers and, with `compare_to`, against a second model
             (an instruct model) under the same constitution: both orders, the judge's
             position bias, and both length controls (`eval.judge`: the paper's stratified
             one and the regression one).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.data import batching
from align_jax.data.formatting import format_records
from align_jax.eval import mi_lower_bound
from align_jax.eval.judge import pairwise_win_rate
from align_jax.eval.mutual_information import mi_reference_estimate
from align_jax.losses import logprobs
from align_jax.losses.scorer import bind, score_examples
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import load_tokenizer

MI_NOTE = ("mi_bound: InfoNCE lower bound on I(y; c | x) over the constitutions each held-out "
           "query was answered under, log p summed over response tokens (at most log K); "
           "mi_reference: the SAMI reference code's estimate (target minus the mean log-prob "
           "over the constitutions), NOT a bound, comparable with the paper's 1.27/1.91; "
           "mi_bound_token_mean: the bound with per-token mean log-probs, as in the training "
           "loss (not a bound)")


def mi_per_query(logps_BCC) -> np.ndarray:
    """InfoNCE bound per query, averaged over its C targets: [b, i, j] = log p(y_j | x, c_i),
    target of column j is row j (`align_jax.eval.mi_lower_bound`, log-mean-exp over all C)."""
    x = jnp.asarray(logps_BCC, jnp.float32)
    c = x.shape[-1]
    per_BC = jax.vmap(jax.vmap(mi_lower_bound, in_axes=(1, 0)), in_axes=(0, None))(
        x, jnp.arange(c))
    return np.asarray(jnp.mean(per_BC, axis=1), np.float64)


def mean_se(x) -> tuple[float, float]:
    """Mean and its standard error (nan for fewer than two values)."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(np.mean(x)), se


def _mi_sums(config, params, batch):
    logps, mask = logprobs.forward_token_logps(config, params, batch, where="sami")
    total = logprobs.masked_sum(logps, mask)
    count = jnp.sum(mask.astype(jnp.float32), axis=-1)
    return jnp.stack([total, count], axis=1)  # [B, 2, C, C]


def mi_bound(model_dir: str, records: Sequence[dict], *, seq_len: int,
             batch_size: int = 8, mesh=None, rules: str = "fsdp") -> dict[str, float]:
    """The held-out MI estimates of SAMI records under a model (scored over `mesh`).

    Args:
      model_dir: the model (HF dir or named model).
      records: SAMI records (`prompts`, `constitutions`, `responses`), all with the same C.
      seq_len: the longest row (prompts are cut on the left to fit).
      batch_size: queries per forward (each is C x C rows).
      mesh, rules: where to score.
    Returns:
      {"mi_bound", "mi_reference", "mi_bound_token_mean", each with "<name>_stderr" over
      queries; "mi_constitutions": C, "queries", "mean_response_tokens"} (module docstring).
    """
    config, params = load_hf(model_dir, mesh=mesh, rules=rules)
    tok = load_tokenizer(resolve_model_path(model_dir))
    examples, _, _ = format_records(records, kind="sami", tokenizer=tok, seq_len=seq_len,
                                    truncation="truncate_prompt_left", on_error="skip")
    if not examples:
        raise ValueError(f"sami: no held-out record fits seq_len {seq_len}")
    rows = score_examples(bind(_mi_sums, config), params, examples, build=batching.sami_batch,
                          seq_len=seq_len, batch_size=batch_size, pad_id=tok.pad_id or 0,
                          mesh=mesh, rules=rules)
    summed, counts = rows[:, 0], rows[:, 1]
    out = {"mi_constitutions": int(summed.shape[-1]), "queries": len(examples)}
    for key, per in (("mi_bound", mi_per_query(summed)),
                     ("mi_reference", np.asarray(mi_reference_estimate(summed), np.float64)),
                     ("mi_bound_token_mean",
                      mi_per_query(summed / np.maximum(counts, 1.0)))):
        out[key], out[f"{key}_stderr"] = mean_se(per)
    lengths = [n for rec in records for n in rec.get("response_tokens", [])]
    out["mean_response_tokens"] = float(np.mean(lengths)) if lengths else float("nan")
    return out


def lengths_by_constitution(records: Sequence[dict], names: Sequence[str]) -> dict[str, dict]:
    """Per constitution (by name): mean response tokens, its standard error, how many
    responses there are and how many were cut at the token budget."""
    groups: dict[int, list[tuple[int, bool]]] = {}
    for rec in records:
        cut = rec.get("truncated", [False] * len(rec["constitution_ids"]))
        for cid, n, t in zip(rec["constitution_ids"], rec["response_tokens"], cut):
            groups.setdefault(cid, []).append((n, bool(t)))
    out = {}
    for cid, rows in sorted(groups.items()):
        mean, se = mean_se([n for n, _ in rows])
        out[names[cid]] = {"mean": mean, "stderr": se, "n": len(rows),
                           "truncated": sum(t for _, t in rows)}
    return out


def judged(queries: Sequence[str], responses: Sequence[str], others: Sequence[str], *,
           principles: str, judge, template: str = "constitution", seed: int = 0,
           max_tokens: int | None = None) -> dict:
    """Win rate of `responses` over `others` (the same queries, one constitution), both
    orders.

    Returns:
      `WinRateResult.summary()`: win_rate (+- stderr, ci), position_bias, lc_stratified (the
      paper's length correction), lc_win_rate (regression), a_longer_share, parse_failures...
    """
    return pairwise_win_rate(list(queries), list(responses), list(others), judge=judge,
                             template=template, seed=seed, principles=principles,
                             max_tokens=max_tokens).summary()


def pick_eval_constitution(records: Sequence[dict], eval_constitution: str | None) -> int:
    """The index of the desired constitution: the record whose `id` is `eval_constitution`, or
    (None) the one record whose principles are all un-negated.

    Raises:
      ValueError naming the ids when there is no such record (or several).
    """
    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    if eval_constitution is not None:
        if str(eval_constitution) not in ids:
            raise ValueError(f"sami: eval_constitution {eval_constitution!r} is not an id of "
                             f"the constitutions ({ids})")
        return ids.index(str(eval_constitution))
    positive = [i for i, r in enumerate(records)
                if r.get("negated") is not None and not any(r["negated"])]
    if len(positive) != 1:
        raise ValueError(f"sami: set eval_constitution to the id of the desired constitution "
                         f"(the one win rates are judged under); {len(positive)} of {ids} have "
                         f"no negated principle")
    return positive[0]
