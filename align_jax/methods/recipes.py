"""`align-jax run`: one whole method recipe, chosen and configured in gin.

    align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo
    align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/tiny

A recipe is a sequence of stages, each an `align-jax train` run in its own folder. SIGTERM or
SIGINT during a stage saves that stage's checkpoint and stops the whole recipe (later stages
are not started) with RunInterrupted, exit code 75; during the recipe's other work (data,
evaluation) it stops the same way. Rerunning the same command skips the completed stages
(`train_main` finds them completed with the same settings) and resumes the interrupted one.
"""

from collections.abc import Callable
from typing import Any

from align_jax import distributed
from align_jax.run_lock import run_lock
from align_jax.train import status as status_lib


def run(*, recipe: Callable[..., Any], output_dir: str) -> Any:
    """Calls the recipe bound in gin (e.g. value_alignment.value_alignment) with output_dir.

    The recipe folder's lock is taken before the recipe writes anything (its data files, its
    tokenizer): a second command on a folder in use refuses, and the first one's files stay.

    Args:
      recipe: the recipe function, bound in the run file (`recipes.run.recipe =
        @value_alignment.value_alignment`); its own parameters are listed below.
      output_dir: run folder, passed on to the recipe (`--output_dir`).

    Raises:
      RunFolderBusyError when another live process holds output_dir.
      RunInterrupted (exit code 75) when SIGTERM or SIGINT stopped it; rerun to resume.
    """
    try:
        with run_lock(output_dir if distributed.is_main() else None), \
                status_lib.sigterm_as_keyboard_interrupt():
            return recipe(output_dir=output_dir)
    except KeyboardInterrupt as e:
        # A stage's own interruption arrives as RunInterrupted (its checkpoint saved); this is
        # a signal between stages, where finished stages are all there is to keep.
        raise status_lib.RunInterrupted(
            f"{output_dir}: interrupted ({str(e) or 'SIGINT'}) outside a training stage; completed "
            "stages are kept; rerun the same command to resume") from None
