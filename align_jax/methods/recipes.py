"""`align-jax run`: one whole method recipe, chosen and configured in gin.

    align-jax run --gin_file=configs/runs/value_alignment_demo.gin --output_dir=runs/demo
    align-jax run --gin_file=configs/runs/value_alignment_tiny.gin --output_dir=runs/tiny

A recipe is a sequence of stages, each an `align-jax train` run in its own folder. SIGTERM or
SIGINT during a stage saves that stage's checkpoint and stops the whole recipe (later stages
are not started) with RunInterrupted, exit code 75; during the recipe's other work (tokenizer,
SDG, sampling, evaluation, a checkpoint save: `align_jax.interrupts`) it stops the same way,
before any report is written; `<output_dir>/status.json` says how the recipe ended. Rerunning
the same command skips the completed stages (`train_main` finds them completed with the same
settings) and resumes the interrupted one.
"""

import os
from collections.abc import Callable
from typing import Any

from align_jax import distributed, interrupts
from align_jax.run_lock import run_lock
from align_jax.train import status as status_lib


def _status(output_dir: str, status: str, message: str | None = None) -> None:
    if distributed.is_main():
        os.makedirs(output_dir, exist_ok=True)
        status_lib.write_status(output_dir, status, step=None, num_steps=None, message=message)


def run(*, recipe: Callable[..., Any], output_dir: str) -> Any:
    """Calls the recipe bound in gin (e.g. value_alignment.value_alignment) with output_dir.

    The recipe folder's lock is taken before the recipe writes anything (its status, data
    files, tokenizer): a second command on a folder in use refuses, and the first one's files
    stay. `<output_dir>/status.json` then says "running", and at the end "completed",
    "interrupted" or "failed".

    Args:
      recipe: the recipe function, bound in the run file (`recipes.run.recipe =
        @value_alignment.value_alignment`); its own parameters are listed below.
      output_dir: run folder, passed on to the recipe (`--output_dir`).

    Raises:
      RunFolderBusyError when another live process holds output_dir.
      RunInterrupted (exit code 75) when SIGTERM or SIGINT stopped it; rerun to resume.
    """
    with run_lock(output_dir if distributed.is_main() else None):
        return _run_locked(recipe, output_dir)


def _run_locked(recipe: Callable[..., Any], output_dir: str) -> Any:
    _status(output_dir, "running")
    try:
        with interrupts.honoured():
            result = recipe(output_dir=output_dir)
            # One that an exception handler on the way swallowed: no "completed" after it.
            interrupts.check()
    except status_lib.RunInterrupted as e:
        _status(output_dir, "interrupted", str(e).split("\n")[0])
        raise
    except KeyboardInterrupt as e:
        # A stage's own interruption arrives as RunInterrupted (its checkpoint saved); this is
        # a signal between stages, where finished stages are all there is to keep.
        message = (f"{output_dir}: interrupted ({str(e) or 'SIGINT'}) outside a training "
                   "stage; completed stages are kept; rerun the same command to resume")
        _status(output_dir, "interrupted", message)
        raise status_lib.RunInterrupted(message) from None
    except BaseException as e:
        _status(output_dir, "failed", f"{type(e).__name__}: {str(e)[:500]}")
        raise
    _status(output_dir, "completed")
    return result
