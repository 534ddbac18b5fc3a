"""`align-jax run`: one whole method recipe, chosen and configured in gin.

    align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo
    align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/tiny
"""

from collections.abc import Callable
from typing import Any


def run(*, recipe: Callable[..., Any], output_dir: str) -> Any:
    """Calls the recipe bound in gin (e.g. value_alignment.value_alignment) with output_dir."""
    return recipe(output_dir=output_dir)
