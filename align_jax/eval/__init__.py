"""Evaluation: reference metrics (BLEU, ROUGE, BERTScore), the pairwise judge, the SAMI
mutual-information bound, bootstrap intervals, shortcut and yes/no evidence, and the report."""

from align_jax.eval.bertscore import bertscore
from align_jax.eval.bootstrap import mean_interval, paired_difference
from align_jax.eval.evidence import answer_polarity, shortcut_choices
from align_jax.eval.judge import WinRateResult, pairwise_win_rate, win_rate_matrix
from align_jax.eval.metrics import bleu, rouge
from align_jax.eval.mutual_information import mi_lower_bound, mi_lower_bound_matrix

__all__ = ["WinRateResult", "answer_polarity", "bertscore", "bleu", "mean_interval",
           "mi_lower_bound", "mi_lower_bound_matrix", "paired_difference", "pairwise_win_rate",
           "rouge", "shortcut_choices", "win_rate_matrix"]
