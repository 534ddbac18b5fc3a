"""Evaluation: reference metrics (BLEU, ROUGE, BERTScore), the pairwise judge, the SAMI
mutual-information bound, and the report."""

from align_jax.eval.metrics import bleu, rouge
from align_jax.eval.mutual_information import mi_lower_bound, mi_lower_bound_matrix

__all__ = ["bleu", "mi_lower_bound", "mi_lower_bound_matrix", "rouge"]
