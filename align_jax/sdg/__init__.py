"""Synthetic data generation: a teacher LLM turns documents, principles and seed
questions into SFT, preference, aligner/inspector and SAMI constitution records."""

from align_jax.sdg.pipeline import run_aligner_sdg, run_document_sdg, run_principles_sdg
from align_jax.sdg.teacher import Teacher
from align_jax.sdg.templates import load_template

__all__ = ["Teacher", "load_template", "run_aligner_sdg", "run_document_sdg",
           "run_principles_sdg"]
