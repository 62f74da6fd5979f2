"""Multi-host JAX (one process per host, `jax.distributed`): joining the processes, and reading a global array
back on every host.

After `initialize`, `jax.devices()` lists the devices of every process and `jax.local_devices()` this
process's own; a mesh over `jax.devices()` (`sharding.make_mesh`) spans the whole pod, and each process runs
the same program on the same inputs (multi-controller SPMD). Loading is unchanged: `kimi_jax.load(dir,
mesh=mesh)` places each parameter on the global mesh and every process transfers only its own shards.

On CPU the processes exchange collectives through gloo (jax's default `jax_cpu_collectives_implementation`
since 0.5; earlier versions need `jax.config.update("jax_cpu_collectives_implementation", "gloo")`).
"""

from __future__ import annotations

import jax
import numpy as np


class DistributedError(RuntimeError):
    """The processes could not join; the message names the coordinator, this process and what to check."""


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout_s: int = 120) -> None:
    """Joins this process to the `num_processes` processes that share `coordinator` ("HOST:PORT"; process 0
    serves it there). Call it in every process before anything else touches jax (devices, arrays, jit):
    jax fixes the device list on first use.

    What can be checked here raises DistributedError (a malformed address, a process id out of range, jax
    already started, process 0 unable to bind the port). A process whose peers do not all register within
    `timeout_s` seconds is ended by jax's runtime itself (jax 0.10: abort, with "DEADLINE_EXCEEDED ...
    RegisterTask" on stderr), not by an exception; likewise when a peer dies later (heartbeat timeout)."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialized in this process; initialize only once")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as e:  # RuntimeError, JaxRuntimeError (e.g. the port is taken): say what to check
        first_line = str(e).splitlines()[0] if str(e) else ""
        if "must be called before" in first_line:
            raise DistributedError(
                f"process {process_id}: jax has already created this process's devices, so it can no longer join "
                f"the others; call sharding.distributed.initialize before anything uses jax (jax.devices(), an "
                f"array, a jit)") from None
        raise DistributedError(
            f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} "
            f"({type(e).__name__}: {first_line}). Check that every process was started with the same coordinator "
            f"and num_processes and a distinct process_id in [0, {num_processes}), that process 0 can bind port "
            f"{port}, and that the others can reach {host}") from None


def gather(array) -> np.ndarray:
    """The whole value of a global array (sharded over devices of several processes) as a numpy array, on
    every process. A collective: every process must call it, in the same order."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
