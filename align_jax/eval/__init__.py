"""Evaluation: the SAMI mutual-information bound (metrics, judges and reports build on it)."""

from align_jax.eval.mutual_information import mi_lower_bound, mi_lower_bound_matrix

__all__ = ["mi_lower_bound", "mi_lower_bound_matrix"]
