"""The server's counters, served as Prometheus text at GET /metrics.

Requests are counted by an ASGI middleware (every path and status, the latency up to the last
byte of the answer, streams included); tokens by the answer builders; the queue is read from
the batcher when /metrics is asked.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

# Latency buckets (seconds): from a cached short answer to a long generation.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TIMED = ("/v1/completions", "/v1/chat/completions")


class Metrics:
    """Thread-safe counters (the handlers run on the event loop, the batcher in a thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (path, status) -> n
        self.prompt_tokens = self.completion_tokens = 0
        self.buckets = [0] * len(BUCKETS)
        self.latency_sum, self.latency_count = 0.0, 0
        self.running = 0

    def in_flight(self, change: int) -> None:
        with self._lock:
            self.running += change

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += int(prompt)
            self.completion_tokens += int(completion)

    def request(self, path: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            if seconds is not None:
                i = bisect.bisect_left(BUCKETS, seconds)
                if i < len(BUCKETS):
                    self.buckets[i] += 1
                self.latency_sum += seconds
                self.latency_count += 1

    def render(self, *, queued: int) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP align_jax_requests_total HTTP requests answered, by path and "
                     "status.", "# TYPE align_jax_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'align_jax_requests_total{{path="{_escape(path)}",'
                             f'status="{status}"}} {n}')
            for name, value, what in (
                    ("prompt_tokens", self.prompt_tokens, "Prompt tokens of answered requests."),
                    ("generation_tokens", self.completion_tokens,
                     "Tokens generated for answered requests.")):
                lines += [f"# HELP align_jax_{name}_total {what}",
                          f"# TYPE align_jax_{name}_total counter",
                          f"align_jax_{name}_total {value}"]
            lines += ["# HELP align_jax_queue_requests Requests waiting for generation.",
                      "# TYPE align_jax_queue_requests gauge", f"align_jax_queue_requests {queued}",
                      "# HELP align_jax_requests_in_flight Completion requests being handled "
                      "(queued, generating or streaming).",
                      "# TYPE align_jax_requests_in_flight gauge",
                      f"align_jax_requests_in_flight {self.running}",
                      "# HELP align_jax_request_latency_seconds Time from a completion request "
                      "to the last byte of its answer.",
                      "# TYPE align_jax_request_latency_seconds histogram"]
            total = 0
            for bound, n in zip(BUCKETS, self.buckets):
                total += n
                lines.append(f'align_jax_request_latency_seconds_bucket{{le="{bound}"}} {total}')
            lines += [f'align_jax_request_latency_seconds_bucket{{le="+Inf"}} '
                      f'{self.latency_count}',
                      f"align_jax_request_latency_seconds_sum {self.latency_sum}",
                      f"align_jax_request_latency_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class CountRequests:
    """ASGI middleware: counts each HTTP request in `metrics` once its answer is sent."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, counted = time.perf_counter(), [0], [False]
        timed = scope.get("path") in _TIMED

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if (message["type"] == "http.response.body" and not message.get("more_body")
                    and not counted[0]):
                counted[0] = True
                self._count(scope, status[0], start)

        self.metrics.in_flight(+1 if timed else 0)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.in_flight(-1 if timed else 0)
            if not counted[0]:  # the answer did not complete (the client left)
                self._count(scope, 499, start)

    def _count(self, scope, status: int, start: float) -> None:
        path = scope.get("path", "")
        # Unknown paths are counted as one label: clients cannot grow the label set.
        label = (path if path in _PATHS else "/v1/models/{name}"
                 if path.startswith("/v1/models/") else "other")
        self.metrics.request(label, status,
                             time.perf_counter() - start if path in _TIMED else None)


_PATHS = frozenset(("/health", "/v1/models", "/v1/completions", "/v1/chat/completions",
                    "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize", "/version",
                    "/metrics"))
