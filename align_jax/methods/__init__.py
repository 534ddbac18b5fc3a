"""Recipes that compose the engine: value alignment (document -> SFT -> DPO) and the RAG baseline."""
