"""Timing helpers shared by the benchmark sections."""

import json
import os
import pathlib
import platform
import statistics
import time

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


def timeit(fn, *, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of `fn()` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hardware() -> str:
    import jax
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {kind}"


def save(section: str, rows: list[dict], *, note: str = "", machine: str | None = None) -> None:
    """Writes results/<section>.json; `machine` defaults to this process's jax device (a
    parent that imports no framework passes its own)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    payload = {"section": section, "date": time.strftime("%Y-%m-%d"),
               "hardware": machine or hardware(), "rows": rows}
    if note:
        payload["note"] = note
    (RESULTS_DIR / f"{section}.json").write_text(json.dumps(payload, indent=1) + "\n")


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(
            f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(out)
