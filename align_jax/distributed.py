"""Multi-process runs: one process per host (TPU VM worker, GPU node), joined by jax.distributed.

    align-jax train --distributed --gin_file=... \
      --gin_param="distributed.initialize.coordinator_address='10.0.0.2'"

Every setting comes, in this order, from a gin binding of `initialize` (a --gin_param on the
command line, or a gin file), an `ALIGN_JAX_*` environment variable, or jax's own detection of
the cluster (SLURM, Open MPI, Cloud TPU VM pods, ...):

  coordinator_address  ALIGN_JAX_COORDINATOR_ADDRESS  host or host:port of process 0
  port                 ALIGN_JAX_COORDINATOR_PORT     TCP port of the coordinator (DEFAULT_PORT)
  num_processes        ALIGN_JAX_NUM_PROCESSES
  process_id           ALIGN_JAX_PROCESS_ID
  init_timeout         ALIGN_JAX_INIT_TIMEOUT         seconds to wait for every process to join
  heartbeat_timeout    ALIGN_JAX_HEARTBEAT_TIMEOUT    seconds of silence after which a process
                                                      counts as dead and the others stop

The coordinator listens on `port` of process 0's host (8476 unless set): every host must reach it
there (a firewall rule for that TCP port between the hosts). The collectives themselves (NCCL,
gloo, ICI) use their own connections.

Process 0 alone writes logs, metrics, reports and exports (`is_main`); orbax writes checkpoints
from every process. `check_same_config` compares a hash of each process's configuration at start
and names the first difference.
"""

import dataclasses
import difflib
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

import align_jax

log = logging.getLogger(__name__)

DEFAULT_PORT = 8476
DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100
_ENV = "ALIGN_JAX_"
# jax's own timeout, past ours: its C++ abort names no cause.
_JAX_TIMEOUT_MARGIN = 30


class DistributedError(RuntimeError):
    """Processes that could not start together, or that run different configurations."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What `jax.distributed.initialize` is called with; None fields are left to jax's
    detection of the cluster."""

    coordinator_address: str | None
    port: int
    num_processes: int | None
    process_id: int | None
    init_timeout: int
    heartbeat_timeout: int
    cluster: str


def _detected_cluster(environ: Mapping[str, str]) -> str:
    """A name for the cluster jax will detect (for messages; jax does the detection)."""
    if "SLURM_JOB_ID" in environ:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        return "Open MPI"
    if "TPU_WORKER_HOSTNAMES" in environ or "TPU_ACCELERATOR_TYPE" in environ:
        return "Cloud TPU"
    return "none found"


def _setting(value, name: str, environ: Mapping[str, str], kind=str):
    if value is not None:
        return value
    raw = environ.get(_ENV + name)
    if raw in (None, ""):
        return None
    try:
        return kind(raw)
    except ValueError:
        raise DistributedError(f"{_ENV}{name}={raw!r} is not a valid {kind.__name__}") from None


def resolve(*, coordinator_address: str | None = None, port: int | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            init_timeout: int | None = None, heartbeat_timeout: int | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of this process: arguments, then ALIGN_JAX_* variables, then defaults.

    Args:
      coordinator_address: "host" or "host:port" of process 0; None: the environment's, else
        jax's detection (SLURM, Open MPI, TPU pods).
      port: the coordinator's port when the address has none (and for detected clusters).
      num_processes, process_id: None: the environment's, else jax's detection.
      init_timeout: seconds `initialize` waits for every process.
      heartbeat_timeout: seconds after which a silent process counts as dead.
      environ: the environment (default os.environ).
    Returns:
      the Settings.
    """
    environ = os.environ if environ is None else environ
    address = _setting(coordinator_address, "COORDINATOR_ADDRESS", environ)
    port = _setting(port, "COORDINATOR_PORT", environ, int)
    if address and address.rpartition(":")[2].isdigit() and not address.endswith("]"):
        host, _, given = address.rpartition(":")
        if port is not None and int(given) != port:
            raise DistributedError(f"coordinator_address {address!r} has port {given} but port "
                                   f"is set to {port}: give one of them")
        port = int(given)
    elif address:
        address = f"{address}:{port or DEFAULT_PORT}"
    settings = Settings(
        coordinator_address=address,
        port=port or DEFAULT_PORT,
        num_processes=_setting(num_processes, "NUM_PROCESSES", environ, int),
        process_id=_setting(process_id, "PROCESS_ID", environ, int),
        init_timeout=_setting(init_timeout, "INIT_TIMEOUT", environ, int) or DEFAULT_INIT_TIMEOUT,
        heartbeat_timeout=(_setting(heartbeat_timeout, "HEARTBEAT_TIMEOUT", environ, int)
                           or DEFAULT_HEARTBEAT_TIMEOUT),
        cluster="given" if address else _detected_cluster(environ))
    n, i = settings.num_processes, settings.process_id
    if n is not None and n < 1 or (n is not None and i is not None and not 0 <= i < n):
        raise DistributedError(f"process_id={i} with num_processes={n}: need 0 <= id < count")
    return settings


def initialize(*, coordinator_address: str | None = None, port: int | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               init_timeout: int | None = None,
               heartbeat_timeout: int | None = None) -> Settings:
    """Joins this process to the others (`jax.distributed.initialize`); call before using jax.

    Arguments as in `resolve`. Processes other than 0 log warnings only.

    Returns:
      the Settings used.
    Raises:
      DistributedError: jax refused the settings. When the processes do not all join within
        init_timeout, the process exits (status 1) naming the settings and what to check.
    """
    settings = resolve(coordinator_address=coordinator_address, port=port,
                       num_processes=num_processes, process_id=process_id,
                       init_timeout=init_timeout, heartbeat_timeout=heartbeat_timeout)
    if settings.coordinator_address is None and "JAX_COORDINATOR_PORT" not in os.environ:
        # jax's detected address (SLURM, Open MPI, TPU) takes its port from this variable:
        # one documented port rather than one derived from the job id.
        os.environ["JAX_COORDINATOR_PORT"] = str(settings.port)
    where = settings.coordinator_address or f"detected ({settings.cluster}), port {settings.port}"
    hint = (f"(coordinator {where}, num_processes={settings.num_processes}, process_id="
            f"{settings.process_id}, init_timeout={settings.init_timeout}s). Check that the same "
            "command started on every host (a job started on one worker only waits here until "
            f"the timeout), that process 0's host is reachable on TCP port {settings.port}, and "
            "that num_processes and process_id are right. Outside SLURM, Open MPI and TPU pods "
            "set ALIGN_JAX_COORDINATOR_ADDRESS, ALIGN_JAX_NUM_PROCESSES and ALIGN_JAX_PROCESS_ID.")

    def give_up():
        # jax aborts the process from C++ when its own timeout passes, with a message about a
        # "task that died": exit first, saying what to check.
        sys.stderr.write(f"align-jax: the processes did not all join within "
                         f"{settings.init_timeout}s {hint}\n")
        sys.stderr.flush()
        os._exit(1)

    sys.stderr.write(f"align-jax: process {settings.process_id} of {settings.num_processes} "
                     f"joining (coordinator {where}, init_timeout {settings.init_timeout}s)\n")
    watchdog = threading.Timer(settings.init_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            settings.coordinator_address, settings.num_processes, settings.process_id,
            initialization_timeout=settings.init_timeout + _JAX_TIMEOUT_MARGIN,
            heartbeat_timeout_seconds=settings.heartbeat_timeout)
    except Exception as e:  # jax raises RuntimeError, ValueError or XlaRuntimeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(f"jax.distributed.initialize failed: {first} {hint}") from e
    finally:
        watchdog.cancel()
    if jax.process_index() != 0:
        logging.getLogger("align_jax").setLevel(logging.WARNING)
    log.info("process %d of %d joined (coordinator %s); %d local of %d devices",
             jax.process_index(), jax.process_count(), settings.coordinator_address or "detected",
             jax.local_device_count(), jax.device_count())
    return settings


def is_main() -> bool:
    """True on the process that writes logs, metrics, reports and exports (process 0)."""
    return jax.process_index() == 0


_BARRIER_TIMEOUT_S = 3600
_barrier_uses: dict[str, int] = {}


def barrier(name: str, *, timeout_s: int = _BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches `name` (a no-op with one process).

    The wait goes through the coordination service, not a device collective, so it can also
    line processes up before their first collective (e.g. after compiling a step).

    Args:
      name: the same on every process, reached in the same order.
      timeout_s: how long to wait for the slowest process.
    """
    if jax.process_count() == 1:
        return
    _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
    # Local: a private jax module, needed only here (multi-process barriers).
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(f"{name}:{_barrier_uses[name]}", timeout_s * 1000)
    else:
        multihost_utils.sync_global_devices(name)


def config_difference(texts: list[str]) -> str | None:
    """None when every process's config text is the same; else the first difference, named.

    Args:
      texts: the config text of each process, in process order.
    Returns:
      None, or a message naming the process and the differing lines.
    """
    for index, text in enumerate(texts[1:], start=1):
        if text == texts[0]:
            continue
        diff = [line for line in difflib.unified_diff(texts[0].splitlines(), text.splitlines(),
                                                      lineterm="", n=0)
                if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        shown = "; ".join(f"{d[0]} {d[1:]}" for d in diff[:6]) + ("; ..." if len(diff) > 6 else "")
        return (f"process {index} runs a different configuration from process 0 "
                f"(- process 0, + process {index}): {shown or 'whitespace differs'}")
    return None


def _allgather_bytes(data: bytes) -> list[bytes]:
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    rows = multihost_utils.process_allgather(buf)
    return [bytes(row[:int(n)]) for row, n in zip(rows, sizes, strict=True)]


def check_same_config(text: str) -> None:
    """Compares a hash of `text` across processes; raises naming the difference if any differ.

    Only the 32-byte hashes travel unless they differ; then the texts are gathered so that
    every process reports the same, named difference.

    Args:
      text: this process's configuration (command, gin bindings, library versions).
    Raises:
      DistributedError: some process runs a different configuration.
    """
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(text.encode()).digest()
    digests = _allgather_bytes(digest)
    if len(set(digests)) == 1:
        return
    texts = _allgather_bytes(text.encode())
    message = config_difference([t.decode(errors="replace") for t in texts])
    raise DistributedError(message or "the processes' configurations differ")


def config_text(command: str, gin_config: str) -> str:
    """What `check_same_config` compares: the command, library versions and gin bindings."""
    # The process id is the one binding that differs between processes by design.
    bindings = "\n".join(line for line in gin_config.splitlines()
                         if not re.match(r"\s*(distributed\.)?initialize\.process_id\s*=", line))
    return (f"command = {command!r}\nalign_jax = {align_jax.__version__}\n"
            f"jax = {jax.__version__}\n{bindings}")
