"""Recipes that compose the engine: value alignment (document -> SFT -> DPO), RAG baseline."""
