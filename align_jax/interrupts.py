"""SIGTERM and SIGINT, honoured the same way by every command and every phase of it.

`align-jax` installs `honoured()` for the whole command. A signal is recorded, then:
  - outside a `deferred()` block it raises `Interrupted` (a KeyboardInterrupt) at once, so a
    long phase (SDG, sampling, evaluation, tokenizer training, GGUF conversion) stops where it
    is; atomic writes leave no half-written file, and a rerun redoes or resumes that phase;
  - inside a `deferred()` block (the train step loop, a checkpoint save) it is only recorded:
    the loop saves and stops, a save completes, and `Interrupted` is raised as the outermost
    block ends (a second Ctrl-C stops at once).
The record outlives an exception swallowed on the way (one raised inside a finalizer is
printed and dropped by Python): `check()` at the start and end of each `phase()` raises it
again, so a recipe never writes its report after a signal. The CLI maps `Interrupted` (and
`train.status.RunInterrupted`) to exit code 75.

Tests make the process signal itself as a named phase starts:
ALIGN_JAX_SIGNAL_AT="NAME[@N][:SIGNAL]" sends SIGNAL (default SIGTERM) on the N-th (default
first) entry into `phase(NAME)`.
"""

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
HOOK_ENV = "ALIGN_JAX_SIGNAL_AT"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the command; what was saved is kept and a rerun resumes."""

    def __init__(self, name: str, where: str | None = None):
        super().__init__(name)
        self.signal_name = name
        self.where = where

    def __str__(self) -> str:
        return self.signal_name + (f" {self.where}" if self.where else "")


class _State:
    def __init__(self):
        self.name: str | None = None  # the first signal received, until honoured() ends
        self.installed = 0
        self.deferred = 0
        self.phases: list[str] = []
        self.entries: dict[str, int] = {}
        self.previous: dict = {}
        # (deferred depth, phases) open when the outermost honoured() began: a recipe called
        # from Python (a notebook) opens phases with no handlers installed, and the train loop
        # inside them installs its own; its end must give those back, not clear them.
        self.outer: tuple[int, int] = (0, 0)


_state = _State()


def _in_finalizer(frame) -> bool:
    """Whether the interrupted code is a finalizer, where Python prints and drops exceptions."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _handle(signum, frame):
    name = signal.Signals(signum).name
    again = _state.name is not None
    if _state.name is None:
        _state.name = name
    if _state.deferred and not (again and signum == signal.SIGINT):
        return  # acted on when the deferred block ends (or polled by the train loop)
    if _in_finalizer(frame):
        return  # recorded; the next check() raises it
    raise Interrupted(name, _during())


@contextlib.contextmanager
def honoured():
    """Installs the handlers for the block (main thread only; nested blocks share them).

    The record of a signal is cleared when the outermost block ends; phases and deferred
    blocks opened before it stay open.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state.installed == 0:
        _state.name = None
        _state.entries = {}
        _state.previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
        _state.outer = (_state.deferred, len(_state.phases))
    _state.installed += 1
    try:
        yield
    finally:
        _state.installed -= 1
        if _state.installed == 0:
            for sig, previous in _state.previous.items():
                signal.signal(sig, previous)
            _state.previous = {}
            _state.name = None
            _state.deferred, depth = _state.outer
            del _state.phases[depth:]


def requested() -> str | None:
    """The name of the signal received ("SIGTERM", "SIGINT"), or None."""
    return _state.name


def _during() -> str | None:
    return f"during {_state.phases[-1]}" if _state.phases else None


def check(where: str | None = None) -> None:
    """Raises Interrupted when a signal was received (a safe point; `where` names it)."""
    if _state.name is not None and not _state.deferred:
        raise Interrupted(_state.name, where or _during())


@contextlib.contextmanager
def deferred(*, act: bool = True):
    """A signal inside the block is recorded, not raised; with `act` the outermost block
    raises it on a normal exit (a checkpoint save completes first). The train loop defers
    without `act`: it polls `requested()`, saves and returns. Signals reach the main thread
    only: elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if act:
        check()


def _hook(name: str) -> None:
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    target, _, sig = spec.partition(":")
    target, _, nth = target.partition("@")
    if target != name:
        return
    _state.entries[name] = count = _state.entries.get(name, 0) + 1
    if count == int(nth or 1):
        print(f"{HOOK_ENV}: sending {sig or 'SIGTERM'} at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, sig or "SIGTERM"))


@contextlib.contextmanager
def phase(name: str):
    """A named long phase: a safe point before and after it, and the test hook's target."""
    check(f"before {name}")
    _state.phases.append(name)
    try:
        _hook(name)
        yield
    finally:
        _state.phases.pop()
    check(f"after {name}")
