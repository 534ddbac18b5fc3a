"""Prompt encoding for the server's large request bodies, in a child process.

A fast tokenizer releases the GIL while it splits text, but turning millions of ids into
Python lists (in the tokenizer and again in transformers) holds it for a fraction of a second
per megabyte, and a chat template renders in Python. In the server's process that stalls the
event loop (GET /health) however the work is threaded. Large bodies are therefore encoded in
one child process, `python -m align_jax.generate.encode_pool`, started on first use (a fresh
interpreter: forking a process that runs JAX threads is unsafe, and multiprocessing's 'spawn'
would re-run the caller's main script). It sends the ids back as int32 arrays, which unpickle
as one memory copy, and the server handles them in bounded pieces (`numpy` checks,
`json_ints`). Messages on the pipes are pickles behind an 8-byte length.
"""

from __future__ import annotations

import functools
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np

from align_jax.tokenizer import encode_prompt

# Bodies above this many bytes are encoded in the child process; below it a worker thread
# holds the GIL for a few milliseconds at most.
PROCESS_ENCODE_BYTES = 2**18

_LENGTH = struct.Struct("<Q")


def _encode_text(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    if add_special_tokens:
        return encode_prompt(tokenizer, text, chat_template=False)
    return tokenizer.encode(text)


def text_encoder(*, add_special_tokens: bool) -> Callable:
    """Raw text -> ids as a picklable function of (tokenizer, text): with the tokenizer's own
    special-token rules (`encode_prompt(..., chat_template=False)`, transformers'
    `tokenizer(text)`), or with none at all."""
    return functools.partial(_encode_text, add_special_tokens=add_special_tokens)


def prompt_encoder(*, chat_template: bool) -> Callable:
    """`encode_prompt(tokenizer, prompt, chat_template=...)` as a picklable function of
    (tokenizer, prompt)."""
    return functools.partial(encode_prompt, chat_template=chat_template)


def _send(stream: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO):
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the other end closed the pipe")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other end closed the pipe")
    return pickle.loads(data)


class EncodePool:
    """Encodes prompts in the calling thread, or in a child process when the body is large.

    Blocking (call it from a worker thread). The child is started on first use and encodes
    one request at a time; `close` ends it, as does the end of this process (its stdin
    closes).
    """

    def __init__(self, tokenizer, *, process_bytes: int = PROCESS_ENCODE_BYTES):
        self.tokenizer, self.process_bytes = tokenizer, int(process_bytes)
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def encode(self, encode: Callable, prompts: Sequence, *, body_bytes: int) -> list:
        """`[encode(tokenizer, p) for p in prompts]`: lists of ids, or int32 arrays when the
        body of `body_bytes` bytes was encoded in the child process."""
        if body_bytes <= self.process_bytes or not prompts:
            return [encode(self.tokenizer, p) for p in prompts]
        with self._lock:
            child = self._start()
            try:
                _send(child.stdin, (encode, list(prompts)))
                ok, result = _receive(child.stdout)
            except (EOFError, OSError):  # the child died (killed, out of memory)
                self._stop()
                raise RuntimeError("the tokenizer process stopped while encoding a large "
                                   "request") from None
        if not ok:
            raise result
        return result

    def _start(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._child = subprocess.Popen(
                [sys.executable, "-m", "align_jax.generate.encode_pool"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            _send(self._child.stdin, self.tokenizer)
        return self._child

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            for stream in (child.stdin, child.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def close(self) -> None:
        """Ends the child process; an encoding in progress fails (the server is stopping)."""
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()
        self._stop()


def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child's loop: a tokenizer, then (encode, prompts) requests until stdin closes."""
    try:
        tokenizer = _receive(stdin)
        while True:
            encode, prompts = _receive(stdin)
            try:
                reply = (True, [np.asarray(encode(tokenizer, p), dtype=np.int32)
                                for p in prompts])
            except Exception as e:  # noqa: BLE001 - sent to the server, which answers 400
                reply = (False, e)
            try:
                _send(stdout, reply)
            except (pickle.PicklingError, TypeError, AttributeError):
                _send(stdout, (False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
    except EOFError:
        return


if __name__ == "__main__":
    # The pipe to the server gets its own descriptor; stray prints (of imported libraries)
    # go to stderr instead of corrupting it.
    _pipe = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, _pipe)
