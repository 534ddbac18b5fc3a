"""Checkpoints with orbax: async saves, keep the latest N, restore the latest with its data state.

A checkpoint step directory holds two items:
  state  the TrainState without ref_params (StandardSave: sharded arrays, restored into the
         shardings of an abstract target)
  data   {"iterator": <the data loader's get_state() dict or null>, "evaluation": <the
         evaluator's best-so-far record or null>} as JSON

With `keep_best`, the step named by `protect(step)` (the best evaluation's) is kept besides the
latest `keep`.
"""

import contextlib
import logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from align_jax import interrupts
from align_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """No checkpoint of the run folder could be read."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def _save_reason(e: BaseException) -> str:
    """The OS's words for a failed write. TensorStore buries the errno at the end of a long
    line whose text before it varies (the words, or a JSON spec), so the words come from the
    errno itself."""
    m = _OS_ERROR.search(str(e))
    if m is None:
        return _reason(e)
    code = int(m.group(1))
    return f"{os.strerror(code)}, errno {code}"


def _not_orbax_error(record: logging.LogRecord) -> bool:
    """Drops orbax's own ERROR records (a failed save logs its stack from each of its
    threads, hundreds of lines); the Checkpointer raises the failure in one line instead."""
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _is_closed_loop_callback(unraisable) -> bool:
    """TensorStore's completion callback for a write that finished after a failed save had
    ended orbax's event loop (orbax gathers the writes, the first failure closes the loop and
    the others complete into it): harmless, the save has already failed and says so."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _quiet_closed_loop_callbacks() -> None:
    """Drops `_is_closed_loop_callback` errors, passing every other one to the previous hook.

    TensorStore reports them from its own threads as unraisable (5 lines of stack each, 0 to
    ~200 lines a failed save depending on thread timing), possibly after the save error has
    been raised, so the hook stays for the life of the process; installed once."""
    if getattr(sys.unraisablehook, "_quiet_closed_loop", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._quiet_closed_loop = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_a_failed_orbax_write)


def _not_a_failed_orbax_write(record: logging.LogRecord) -> bool:
    """Drops asyncio's "Task exception was never retrieved" for orbax's other writes of a save
    that already failed on an OS error (each write fails alike and is garbage collected after
    the first failure was raised, by thread timing; the save error says it once)."""
    exc = record.exc_info[1] if record.exc_info else None
    tb = exc.__traceback__ if exc is not None else None
    from_orbax = False
    while tb is not None:
        from_orbax = from_orbax or "orbax" in tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return not (from_orbax and "os_error_code" in str(exc)
                and str(record.msg).startswith("Task exception was never retrieved"))


def _first_nonfinite(state: TrainState) -> str | None:
    """The path of the first floating-point array of `state` holding a NaN or an infinity.

    Orbax (0.12) keeps no checksums: a bit flip in an exponent restores silently as such a
    value (one in a mantissa is indistinguishable from training)."""
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and \
                not bool(jax.device_get(_all_finite(x))):
            return jax.tree_util.keystr(path)
    return None


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _reason(e: BaseException) -> str:
    """The first line of an error (orbax and TensorStore errors run to pages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class _Protected(ocp.checkpoint_managers.PreservationPolicy):
    """Preserves the steps in a set the Checkpointer updates (the best evaluation's)."""

    def __init__(self):
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints, *, context):
        del context
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` for TrainStates.

    Args:
      directory: where step directories go (created if missing).
      keep: how many of the latest checkpoints to keep.
      async_save: write in a background thread; the device-to-host copy happens before `save`
        returns, so the caller may donate the state to the next step right away.
      keep_best: also keep the step last passed to `protect` (the best evaluation's).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 keep_best: bool = False):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = os.path.abspath(os.fspath(directory))
        policy = ocp.checkpoint_managers.LatestN(n=keep)
        self._protected = _Protected() if keep_best else None
        if self._protected is not None:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, self._protected])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._options = options
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))
        logging.getLogger("absl").addFilter(_not_orbax_error)
        _quiet_closed_loop_callbacks()

    def latest_step(self) -> int | None:
        """The newest finished checkpoint step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def protect(self, step: int | None) -> None:
        """With keep_best: keep `step` (and no longer an earlier protected one) whatever
        `keep` says; an unprotected old step goes at the next save."""
        if self._protected is None:
            raise ValueError("Checkpointer.protect needs Checkpointer(keep_best=True)")
        self._protected.steps = set() if step is None else {int(step)}

    def save(self, step: int, state: TrainState, *, data_state: Any = None,
             evaluation: Any = None) -> None:
        """Starts saving `state` (without ref_params), the data state and the evaluator's
        record (JSON-able) at `step`.

        A signal during the save is recorded and acted on after it (`interrupts.deferred`)."""
        with interrupts.deferred(act=False), interrupts.phase("checkpoint_save"), \
                self._writing():
            self._save(step, state, data_state=data_state, evaluation=evaluation)

    def _save(self, step: int, state: TrainState, *, data_state: Any,
              evaluation: Any = None) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.replace(ref_params=None)),
                data=ocp.args.JsonSave({"iterator": data_state, "evaluation": evaluation})),
            force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, Any]:
        """Restores `step` into `target`'s shapes, dtypes and shardings.

        Args:
          step: a step from `all_steps()`.
          target: unboxed ShapeDtypeStructs with shardings (`state.abstract_arrays`); its
            ref_params are ignored and come back None.
        Returns:
          (state, data_state).
        """
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target.replace(ref_params=None)),
                data=ocp.args.JsonRestore()))
        return out["state"], out["data"]["iterator"]

    def restore_latest(self, target: TrainState, *, say=print) -> tuple[int | None, Any, Any]:
        """Restores the newest readable checkpoint: (step, state, data_state), or Nones.

        An unreadable step (truncated or bit-flipped array files, corrupt metadata, arrays
        holding NaN or infinity) is moved to `<directory>-corrupt/<step>` and the previous one
        is tried, saying so; when every step is unreadable (or only set-aside ones are left) a
        one-line CorruptCheckpointError names the folder.
        """
        tried = []
        while (step := self.latest_step()) is not None:
            try:
                state, data_state = self.restore(step, target)
                bad = _first_nonfinite(state)
            except Exception as e:  # orbax/TensorStore raise many types; each means unreadable
                reason = _reason(e)
            else:
                if bad is None:
                    if tried:
                        say(f"resuming from step {step}, the newest readable checkpoint")
                    return step, state, data_state
                reason = f"non-finite values in {bad}"
            tried.append(step)
            path = os.path.join(self.directory, str(step))
            say(f"checkpoint {path} is unreadable ({reason}); moved it to "
                f"{self.set_aside(step)} and trying the previous step")
        aside = self.directory + "-corrupt"
        if tried or (os.path.isdir(aside) and os.listdir(aside)):
            # Starting from scratch over set-aside checkpoints would hide them.
            steps = sorted(tried) or sorted(os.listdir(aside))
            raise CorruptCheckpointError(
                f"{self.directory}: no readable checkpoint (steps {steps} were moved to "
                f"{aside}); rerun with --overwrite to start over")
        return None, None, None

    def set_aside(self, step: int) -> str:
        """Moves the unreadable or corrupt `step` to `<directory>-corrupt/<step>` (the
        previous step becomes the latest); returns where it went."""
        aside = os.path.join(self.directory + "-corrupt", str(step))
        self._set_aside(step, aside)
        return aside

    def _set_aside(self, step: int, aside: str) -> None:
        self._manager.close()
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                              item_names=("state", "data"))

    def data_state(self, step: int) -> Any:
        """The data loader state saved with `step` (reads only the JSON item)."""
        out = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return out["data"]["iterator"]

    def evaluation_state(self, step: int) -> Any:
        """The evaluator's record saved with `step` (None when the run had no evaluation)."""
        out = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return out["data"].get("evaluation")

    def wait(self) -> None:
        """Blocks until the pending async save is on disk."""
        with interrupts.deferred(act=False), self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        try:
            with interrupts.deferred(act=False), self._writing():
                self._manager.wait_until_finished()
        finally:
            self._manager.close()
            logging.getLogger("absl").removeFilter(_not_orbax_error)

    @contextlib.contextmanager
    def _writing(self):
        """An async save's failure surfaces in a later save or wait: one line naming the
        folder, the OS's reason and the last complete checkpoint."""
        try:
            yield
        except Exception as e:  # orbax/TensorStore raise many types
            steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()] \
                if os.path.isdir(self.directory) else []
            last = f"step {max(steps)}" if steps else "none"
            raise CheckpointSaveError(
                f"{self.directory}: saving a checkpoint failed ({_save_reason(e)}); is the disk "
                f"full? the last complete checkpoint: {last}") from None


def load_params(directory: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """The params of a checkpoint as host numpy arrays (for export and evaluation).

    Only the params are read (a partial restore), whatever the devices at hand.

    Args:
      directory: a Checkpointer directory (`<workdir>/checkpoints`).
      step: the step to read; None for the latest.
    Returns:
      the parameter tree.
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = ocp.CheckpointManager(
        directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint to load")
        if step not in manager.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step} "
                                    f"(steps: {list(manager.all_steps())})")
        try:
            tree = manager.item_metadata(step)["state"].tree
            item = {"params": tree["params"]}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)))
        except Exception as e:  # orbax/TensorStore raise many types; each means unreadable
            others = [s for s in manager.all_steps() if s != step]
            hint = f"; try an older step: {sorted(others)}" if others else ""
            raise CorruptCheckpointError(
                f"checkpoint {directory}/{step} is unreadable ({_reason(e)}){hint}") from e
        return out["state"]["params"]
    finally:
        manager.close()
