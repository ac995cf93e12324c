"""Data parallelism over every device with ``jax.sharding``; multi-host start-up.

One mesh axis, "data". Parameters and optimizer state are replicated; a batch is split along
its first axis. jit then inserts the gradient all-reduce itself, so the train step is written
as for one device. Each host feeds only its own rows of the global batch.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# Set by cluster launchers (or by hand) when several processes should form one JAX runtime.
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize`` when the environment asks for several hosts.

    Asked for by ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0, with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), or by a SLURM / Open MPI / Cloud TPU launch
    with more than one task, which ``jax.distributed.initialize()`` detects by itself. Must run
    before anything touches a device. Safe to call twice.

    On CPU, processes exchange gradients through gloo collectives: jax 0.4.34 starts its CPU
    backend without cross-process collectives unless ``jax_cpu_collectives_implementation``
    says otherwise, and a multi-process step then fails (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``
    chooses MPI instead). GPU and TPU backends ignore the flag.

    Returns:
      True when a multi-process runtime was started.

    Raises:
      ValueError: JAX_COORDINATOR_ADDRESS is set without a valid JAX_NUM_PROCESSES and
        JAX_PROCESS_ID.
    """
    if getattr(maybe_initialize_distributed, "_done", False):
        return True
    address = next((os.environ[k] for k in _DISTRIBUTED_ENV if os.environ.get(k)), None)
    launched = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
        int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if address is None and not launched:
        return False
    if address is not None:
        num_processes, process_id = _process_env()  # checked before any global change
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):  # the user's choice wins
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address is not None:
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    maybe_initialize_distributed._done = True
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
             jax.process_count(), jax.device_count())
    return True


def _process_env() -> tuple[int, int]:
    try:
        num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
        raise ValueError(
            "JAX_COORDINATOR_ADDRESS is set, so this process expects to join a multi-process "
            "run: also set JAX_NUM_PROCESSES (the number of processes) and JAX_PROCESS_ID "
            f"(0 .. JAX_NUM_PROCESSES-1); got JAX_NUM_PROCESSES="
            f"{os.environ.get('JAX_NUM_PROCESSES')!r}, JAX_PROCESS_ID="
            f"{os.environ.get('JAX_PROCESS_ID')!r}.") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={num}).")
    return num, pid


def make_mesh() -> Mesh:
    """A one-axis ("data") mesh over all global devices."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the first (batch) axis over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError when a global batch cannot be split evenly over the devices."""
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {mesh.size} devices; "
                         f"use a multiple of {mesh.size}.")


def local_rows(batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    per_host = batch_size // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global numpy batch (every host holds the same one) on the mesh.

    Args:
      batch: dict of arrays with the global batch on axis 0.
      mesh: the data mesh.

    Returns:
      The same dict as global ``jax.Array``s split along axis 0.
    """
    sharding = data_sharded(mesh)
    rows = local_rows(next(iter(batch.values())).shape[0])
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[rows],
                                                      np.asarray(v).shape)
            for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array as numpy."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; every process in a 1-process run)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches ``sync(name)`` (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_params(tree):
    """Numpy copies of replicated params, also when they span several processes.

    ``jax.device_get`` refuses an array with devices in other processes; a replicated one
    holds its whole value on each local device, so the first local copy is the value.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.array(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)
