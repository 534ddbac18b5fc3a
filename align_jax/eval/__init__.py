"""Evaluation: reference metrics (BLEU, ROUGE, BERTScore), the pairwise judge, the SAMI
mutual-information bound, and the report."""

from align_jax.eval.bertscore import bertscore
from align_jax.eval.judge import WinRateResult, pairwise_win_rate, win_rate_matrix
from align_jax.eval.metrics import bleu, rouge
from align_jax.eval.mutual_information import mi_lower_bound, mi_lower_bound_matrix

__all__ = ["WinRateResult", "bertscore", "bleu", "mi_lower_bound", "mi_lower_bound_matrix",
           "pairwise_win_rate", "rouge", "win_rate_matrix"]
